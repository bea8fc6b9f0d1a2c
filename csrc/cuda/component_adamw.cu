// CUDA launcher of the component AdamW op (IncreLoRA/AdaLoRA); the kernel and the descriptor table it reads are in
// component_adamw_kernels.cuh.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/adamw.h"
#include "../common/dispatch.h"
#include "../ops.h"
#include "component_adamw_kernels.cuh"

namespace pefttorch::cuda {
namespace {

// One launch for every tensor, reading a descriptor table (~100 bytes a tensor) copied to the device on the
// current stream (see table_on_device).
void step_cuda(const std::vector<ComponentAdamwTensor>& tensors, const ComponentAdamwHyper& hyper) {
  const at::Tensor& first = tensors.front().p;
  const c10::cuda::CUDAGuard guard(first.device());
  dispatch_float(first.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using acc_t = adamw_acc_t<T>;
    int64_t blocks = 0;
    const std::vector<AdamwTensor<T>> table = adamw_table<T>(tensors, &blocks);
    if (blocks == 0) return;  // rows 0 (or no columns) everywhere: nothing to update
    const at::Tensor device = table_on_device(table, first);
    component_adamw_kernel<T><<<static_cast<unsigned>(blocks), kAdamwThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const AdamwTensor<T>*>(device.const_data_ptr()), static_cast<int64_t>(table.size()),
        adamw_scalars<acc_t>(hyper.lr, hyper.beta1, hyper.beta2, hyper.eps, hyper.weight_decay));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

const ComponentAdamwKernels kCudaComponentAdamw{step_cuda};

}  // namespace
}  // namespace pefttorch::cuda

TORCH_LIBRARY_IMPL(pefttorch, CUDA, m) {
  pefttorch::register_component_adamw_ops<pefttorch::cuda::kCudaComponentAdamw>(m);
}
