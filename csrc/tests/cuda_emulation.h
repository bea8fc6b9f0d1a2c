// Just enough of CUDA to run pefttorch's kernels as plain C++ on the CPU, for tests on machines with no
// GPU: each block runs as blockDim.x real threads (so __syncthreads is a real barrier and a missing one
// can show), blocks run one after another (so `__shared__`, which becomes a function-local static, is
// owned by one block at a time). Only 1-D blocks. Of the warp intrinsics, __shfl_xor_sync over full
// warps (each warp exchanges through a slot per lane between two warp barriers).
#pragma once

#if defined(__CUDACC__)
#error "cuda_emulation.h is for host compilers only"
#endif

#include <barrier>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace pt_emu {
inline thread_local dim3 thread_idx, block_idx;
inline dim3 block_dim, grid_dim;
inline thread_local std::barrier<>* block_barrier = nullptr;

struct Warps {
  std::vector<std::unique_ptr<std::barrier<>>> barriers;  // one per warp, of 32 lanes
  std::vector<uint64_t> slots;                            // one per thread
};
inline thread_local Warps* warps = nullptr;

// Runs kernel(args...) over the grid.
template <typename Kernel, typename... Args>
void launch(dim3 grid, unsigned threads, Kernel kernel, Args... args) {
  grid_dim = grid;
  block_dim = dim3(threads);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::barrier<> bar(threads);
        Warps w;
        for (unsigned k = 0; k < (threads + 31) / 32; ++k) w.barriers.push_back(std::make_unique<std::barrier<>>(32));
        w.slots.resize(threads);
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            thread_idx = dim3(t);
            block_idx = dim3(bx, by, bz);
            block_barrier = &bar;
            warps = &w;
            kernel(args...);
          });
        }
        for (auto& th : pool) th.join();
      }
}
}  // namespace pt_emu

template <typename T>
T __shfl_xor_sync(unsigned /*mask: full warps only*/, T value, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  const unsigned tid = pt_emu::thread_idx.x;
  auto& w = *pt_emu::warps;
  std::memcpy(&w.slots[tid], &value, sizeof(T));
  w.barriers[tid / 32]->arrive_and_wait();
  T result;
  std::memcpy(&result, &w.slots[(tid & ~31u) | ((tid & 31u) ^ static_cast<unsigned>(lane_mask))], sizeof(T));
  w.barriers[tid / 32]->arrive_and_wait();
  return result;
}

#define threadIdx (pt_emu::thread_idx)
#define blockIdx (pt_emu::block_idx)
#define blockDim (pt_emu::block_dim)
#define gridDim (pt_emu::grid_dim)
#define __syncthreads() (pt_emu::block_barrier->arrive_and_wait())
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
