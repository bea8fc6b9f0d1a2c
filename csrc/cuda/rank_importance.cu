// CUDA launcher of the rank importance op (IncreLoRA); the kernel and the descriptor table it reads are in
// rank_importance_kernels.cuh.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/dispatch.h"
#include "../ops.h"
#include "rank_importance_kernels.cuh"

namespace pefttorch::cuda {
namespace {

// One launch for every module, reading a descriptor table (~180 bytes a module) copied to the device on the
// current stream (see table_on_device).
void score_cuda(const std::vector<RankImportanceModule>& modules, const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(out.device());
  dispatch_float(modules.front().a.scalar_type(), [&](auto t) {
    using T = decltype(t);
    int64_t blocks = 0;
    const std::vector<ImportanceModule<T>> table = importance_table<T>(modules, &blocks);
    if (blocks == 0) return;  // rank 0 or an empty sample everywhere: every score is the 0 already there
    const at::Tensor device = table_on_device(table, out);  // after the zero fill of out, on the same stream
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
