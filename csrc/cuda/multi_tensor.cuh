// What the multi-tensor kernels (rank_importance, component_adamw_) share: one launch serves many tensors through
// a table of per-tensor descriptors, each with the first block of its share of the grid.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace pefttorch::cuda {

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
