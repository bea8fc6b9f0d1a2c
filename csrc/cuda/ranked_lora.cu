// CUDA launchers of the ranked LoRA factor ops (IncreLoRA, AdaLoRA); the kernels are in ranked_lora_kernels.cuh.
// One launch each: a ranked layer's factor work was about ten small kernels per module and step before.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/dispatch.h"
#include "../ops.h"
#include "ranked_lora_kernels.cuh"

namespace pefttorch::cuda {
namespace {

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

void forward_cuda(const at::Tensor& a, const at::Tensor& e, const at::Tensor& b_t, const at::Tensor& a_n,
                  const at::Tensor& b_n) {
  const c10::cuda::CUDAGuard guard(a.device());
  dispatch_float(a.scalar_type(), [&](auto s) {
    dispatch_float(a_n.scalar_type(), [&](auto c) {
      using S = decltype(s);
      using C = decltype(c);
      const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
      ranked_factors_forward_kernel<S, C><<<static_cast<unsigned>(a_n.size(0)), kFactorThreads, 0, stream>>>(
          a.const_data_ptr<S>(), e.const_data_ptr<S>(), b_t.const_data_ptr<S>(), a_n.size(0), a.size(1),
          b_t.size(1), a_n.mutable_data_ptr<C>(), b_n.mutable_data_ptr<C>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void backward_cuda(const RankedFactorsBackwardArgs& g) {
  const c10::cuda::CUDAGuard guard(g.a.device());
  const at::Tensor& grad = g.grad_a_n.defined() ? g.grad_a_n : g.grad_b_n;
  dispatch_float(g.a.scalar_type(), [&](auto s) {
    dispatch_float(grad.scalar_type(), [&](auto c) {
      using S = decltype(s);
      using C = decltype(c);
      const C* gap = g.grad_a_n.defined() ? g.grad_a_n.const_data_ptr<C>() : nullptr;
      const C* gbp = g.grad_b_n.defined() ? g.grad_b_n.const_data_ptr<C>() : nullptr;
      const int64_t out = g.gb.defined() ? g.gb.size(1) : 0;
      const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
      ranked_factors_backward_kernel<S, C><<<static_cast<unsigned>(g.a.size(0)), kFactorThreads, 0, stream>>>(
          gap, gbp, g.a.const_data_ptr<S>(), g.e.const_data_ptr<S>(), g.n, g.e_rows, g.a.size(1), out,
          ptr_or_null<S>(g.ga), ptr_or_null<S>(g.ge), ptr_or_null<S>(g.gb));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

const RankedFactorsKernels kCudaRankedFactors{forward_cuda, backward_cuda};

}  // namespace
}  // namespace pefttorch::cuda

TORCH_LIBRARY_IMPL(pefttorch, CUDA, m) {
  pefttorch::register_ranked_factors_ops<pefttorch::cuda::kCudaRankedFactors>(m);
}
