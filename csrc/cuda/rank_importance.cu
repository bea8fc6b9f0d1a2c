// CUDA launcher of the rank importance op (IncreLoRA); the kernel and the descriptor table it reads are in
// rank_importance_kernels.cuh.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstring>

#include "../common/dispatch.h"
#include "../ops.h"
#include "rank_importance_kernels.cuh"

namespace pefttorch::cuda {
namespace {

// One launch for every module. The descriptor table (~180 bytes a module, so several hundred modules would not
// fit the kernel's parameter space) goes to the device through pinned memory, copied on the current stream:
// ordered before the kernel and after the zero fill of out, with no host synchronisation. The caching host
// allocator keeps the pinned buffer until that copy is done.
void score_cuda(const std::vector<RankImportanceModule>& modules, const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(out.device());
  dispatch_float(modules.front().a.scalar_type(), [&](auto t) {
    using T = decltype(t);
    int64_t blocks = 0;
    const std::vector<ImportanceModule<T>> table = importance_table<T>(modules, &blocks);
    if (blocks == 0) return;  // rank 0 or an empty sample everywhere: every score is the 0 already there
    const int64_t bytes = static_cast<int64_t>(table.size() * sizeof(ImportanceModule<T>));
    at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(host.mutable_data_ptr(), table.data(), bytes);
    at::Tensor device = at::empty({bytes}, out.options().dtype(at::kByte));
    device.copy_(host, /*non_blocking=*/true);
    rank_importance_kernel<T><<<static_cast<unsigned>(blocks), kImportanceThreads, 0,
                                at::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const ImportanceModule<T>*>(device.const_data_ptr()), static_cast<int64_t>(table.size()),
        out.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

const RankImportanceKernels kCudaRankImportance{score_cuda};

}  // namespace
}  // namespace pefttorch::cuda

TORCH_LIBRARY_IMPL(pefttorch, CUDA, m) {
  pefttorch::register_rank_importance_ops<pefttorch::cuda::kCudaRankImportance>(m);
}
