// What the multi-tensor kernels (rank_importance, component_adamw_) share: one launch serves many tensors through
// a table of per-tensor descriptors, each with the first block of its share of the grid.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace pefttorch::cuda {

// How one tensor's share of the grid is cut: threads in groups of col_threads (a power of two just covering its
// columns, at least min_col_threads), each group taking rows_per_thread rows, a block col_passes group widths of
// columns; enough blocks to cover rows x cols. Few columns give more groups, so more rows per block and no idle
// threads. No blocks for no work.
struct BlockPlan {
  int32_t col_threads, rows_per_block;
  int64_t col_chunks, blocks;
};

inline BlockPlan plan_blocks(int64_t rows, int64_t cols, int32_t min_col_threads, int32_t threads,
                             int32_t rows_per_thread, int32_t col_passes) {
  int32_t col_threads = min_col_threads;
  while (col_threads < cols && col_threads < threads) col_threads *= 2;
  const int32_t rows_per_block = threads / col_threads * rows_per_thread;
  if (rows == 0 || cols == 0) return {col_threads, rows_per_block, 0, 0};
  const int64_t cols_per_block = int64_t{col_threads} * col_passes;
  const int64_t col_chunks = (cols + cols_per_block - 1) / cols_per_block;
  const int64_t row_chunks = (rows + rows_per_block - 1) / rows_per_block;
  return {col_threads, rows_per_block, col_chunks, row_chunks * col_chunks};
}

// The index of the descriptor whose blocks contain `block`: the last one whose first_block is at or before it
// (table sorted by first_block). Every thread of a block searches alike (the same addresses: broadcasts), so no
// barrier is needed to share the answer.
template <typename Desc>
__device__ __forceinline__ int64_t owner_of_block(const Desc* __restrict__ table, int64_t count, int64_t block) {
  int64_t lo = 0, hi = count - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (table[mid].first_block <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}


// The descriptor table on `like`'s device. Tables of a few hundred tensors outgrow a kernel's parameter space, so
// they go through pinned memory, copied on the current stream (ordered before the kernel, no host
// synchronisation); the caching host allocator keeps the pinned buffer until the copy is done.
template <typename Desc>
at::Tensor table_on_device(const std::vector<Desc>& table, const at::Tensor& like) {
  const int64_t bytes = static_cast<int64_t>(table.size() * sizeof(Desc));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.mutable_data_ptr(), table.data(), bytes);
  at::Tensor device = at::empty({bytes}, like.options().dtype(at::kByte));
  device.copy_(host, /*non_blocking=*/true);
  return device;
}

}  // namespace pefttorch::cuda
