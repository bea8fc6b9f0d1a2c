// CUDA launchers of the reversible coupling ops (MEFT); the kernels are in reversible_kernels.cuh.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../common/dispatch.h"
#include "../ops.h"
#include "reversible_kernels.cuh"

namespace pefttorch::cuda {
namespace {

// Enough blocks to cover n in groups of kVec, at most 8 per SM (a full SM of 256-thread blocks): the
// grid-stride loop covers the rest.
template <typename Op>
void launch(const Op& op, int64_t n) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t groups = (n + kVec - 1) / kVec;
  const int64_t blocks = std::clamp<int64_t>((groups + kElementwiseThreads - 1) / kElementwiseThreads, 1, 8 * sms);
  elementwise_kernel<Op><<<blocks, kElementwiseThreads, 0, at::cuda::getCurrentCUDAStream()>>>(op, n, op.aligned());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void forward_cuda(const at::Tensor& x, const at::Tensor& f, double scale, const at::Tensor& y) {
  const c10::cuda::CUDAGuard guard(x.device());
  dispatch_float(x.scalar_type(), [&](auto t) {
    dispatch_float(f.scalar_type(), [&](auto u) {
      using T = decltype(t);
      using F = decltype(u);
      const CouplingForward<T, F> op{x.const_data_ptr<T>(), f.const_data_ptr<F>(), y.mutable_data_ptr<T>(),
                                     static_cast<at::opmath_type<T>>(scale)};
      launch(op, x.numel());
    });
  });
}

void backward_cuda(const ReversibleBackwardArgs& a) {
  const c10::cuda::CUDAGuard guard(a.y.device());
  dispatch_float(a.y.scalar_type(), [&](auto t) {
    dispatch_float(a.f.scalar_type(), [&](auto u) {
      dispatch_float(a.vjp.scalar_type(), [&](auto v) {
        using T = decltype(t);
        using F = decltype(u);
        using V = decltype(v);
        const CouplingBackward<T, F, V> op{a.y.const_data_ptr<T>(),
                                           a.f.const_data_ptr<F>(),
                                           a.grad_y.const_data_ptr<T>(),
                                           a.grad_other.const_data_ptr<T>(),
                                           a.vjp.const_data_ptr<V>(),
                                           a.x.mutable_data_ptr<T>(),
                                           a.grad_x.mutable_data_ptr<T>(),
                                           a.grad_other_out.mutable_data_ptr<T>(),
                                           static_cast<at::opmath_type<T>>(a.scale)};
        launch(op, a.y.numel());
      });
    });
  });
}

const ReversibleKernels kCudaReversible{forward_cuda, backward_cuda};

}  // namespace
}  // namespace pefttorch::cuda

TORCH_LIBRARY_IMPL(pefttorch, CUDA, m) { pefttorch::register_reversible_ops<pefttorch::cuda::kCudaReversible>(m); }
