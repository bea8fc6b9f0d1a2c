// CUDA launchers of the bottleneck adapter's one-pass steps; the kernels are in bottleneck_adapter_kernels.cuh.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../common/dispatch.h"
#include "../ops.h"
#include "bottleneck_adapter_kernels.cuh"

namespace pefttorch::cuda {
namespace {

// Enough blocks to cover n, at most 8 per SM (a full SM of 256-thread blocks): the grid-stride loops cover the rest.
int64_t adapter_blocks(int64_t n) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::clamp<int64_t>((n + kAdapterThreads - 1) / kAdapterThreads, 1, 8 * sms);
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// One past the largest element offset of a (rows, cols) tensor with unit inner stride (0 when absent).
int64_t extent(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? (t.size(0) - 1) * t.stride(0) + t.size(1) : 0;
}

void residual_sum_cuda(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& b_up, double scale,
                       const at::Tensor& y) {
  const c10::cuda::CUDAGuard guard(y.device());
  const int64_t rows = y.size(0), cols = y.size(1), n = y.numel();
  const int64_t ldx = x.defined() ? x.stride(0) : 0, ldr = residual.defined() ? residual.stride(0) : 0;
  // 32-bit indices when n and every offset stay below 2^31: i + the grid's stride then never wraps
  constexpr int64_t kMax32 = int64_t{1} << 31;
  const bool small = n <= kMax32 && extent(x) <= kMax32 && extent(residual) <= kMax32;
  const int64_t blocks = adapter_blocks(n);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_float(y.scalar_type(), [&](auto t) {
    using T = decltype(t);
    const auto launch = [&](auto index) {
      using index_t = decltype(index);
      adapter_residual_sum_kernel<T, index_t><<<blocks, kAdapterThreads, 0, stream>>>(
          ptr_or_null<T>(x), static_cast<index_t>(ldx), ptr_or_null<T>(residual), static_cast<index_t>(ldr),
          ptr_or_null<T>(b_up), static_cast<at::opmath_type<T>>(scale), y.mutable_data_ptr<T>(),
          static_cast<index_t>(rows), static_cast<index_t>(cols));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (small) {
      launch(uint32_t{});
    } else {
      launch(uint64_t{});
    }
  });
}

void activation_grad_cuda(const at::Tensor& g, const at::Tensor& h, Activation act) {
  const c10::cuda::CUDAGuard guard(g.device());
  const int64_t n = g.numel();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_float(g.scalar_type(), [&](auto t) {
    dispatch_activation(act, [&](auto a) {
      using T = decltype(t);
      adapter_activation_grad_kernel<T, decltype(a)::value><<<adapter_blocks(n), kAdapterThreads, 0, stream>>>(
          g.mutable_data_ptr<T>(), h.const_data_ptr<T>(), n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

const BottleneckAdapterKernels kCudaBottleneckAdapter{residual_sum_cuda, activation_grad_cuda};

}  // namespace
}  // namespace pefttorch::cuda

TORCH_LIBRARY_IMPL(pefttorch, CUDA, m) {
  pefttorch::register_bottleneck_adapter_ops<pefttorch::cuda::kCudaBottleneckAdapter>(m);
}
