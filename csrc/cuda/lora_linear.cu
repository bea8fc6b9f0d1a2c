// CUDA kernels of the fused LoRA linear: launchers and registration. The kernels themselves are in
// lora_linear_kernels.cuh. Each launch goes to the current stream and is checked. (Without dropout
// these steps are plain GEMMs and go to cuBLAS: see csrc/lora_linear.cpp.)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../ops.h"
#include "lora_linear_kernels.cuh"

namespace pefttorch::cuda {
namespace {

void down_cuda(const at::Tensor& x, const at::Tensor& a, const Dropout& d, at::Tensor& s) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1), R = a.size(0);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_down_dropout", [&] {
    PT_RANK_TILE_SWITCH(R, BN, [&] {
      const dim3 grid(ceil_div(M, 64), ceil_div(R, BN));
      lora_down_dropout_kernel<scalar_t, BN><<<grid, kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), x.stride(0), a.const_data_ptr<scalar_t>(), s.mutable_data_ptr<scalar_t>(),
          M, K, R, d);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void expand_accumulate_cuda(at::Tensor& dx, const at::Tensor& ds, const at::Tensor& a, const Dropout& d) {
  const c10::cuda::CUDAGuard guard(dx.device());
  const int64_t M = dx.size(0), K = dx.size(1), R = a.size(0);
  TORCH_CHECK(ceil_div(K, 64) <= 65535, "lora_linear_backward: in_features = ", K, " is too large for the CUDA kernel");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dx.scalar_type(), "lora_expand_dropout", [&] {
    PT_RANK_TILE_SWITCH(R, TILE, [&] {
      // fp64 tiles of 64 ranks would not fit the 48 KB of static shared memory: loop 32 at a time.
      constexpr int RC = (sizeof(scalar_t) == 8 && TILE > 32) ? 32 : TILE;
      const dim3 grid(ceil_div(M, 64), ceil_div(K, 64));
      lora_expand_dropout_kernel<scalar_t, RC><<<grid, kThreads, 0, stream>>>(
          dx.mutable_data_ptr<scalar_t>(), dx.stride(0), ds.const_data_ptr<scalar_t>(),
          a.const_data_ptr<scalar_t>(), M, K, R, d);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor grad_a_cuda(const at::Tensor& ds, const at::Tensor& x, const Dropout& d) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1), R = ds.size(1);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  at::Tensor ws;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_grad_a_dropout", [&] {
    PT_RANK_TILE_SWITCH(R, RN, [&] {
      const GradASplit split = grad_a_split(M, K, R, RN, sms);
      ws = at::empty({split.splits, R, K}, x.options().dtype(at::toOpMathType(x.scalar_type())));
      const dim3 grid(ceil_div(K, 64), ceil_div(R, RN), split.splits);
      lora_grad_a_dropout_kernel<scalar_t, RN><<<grid, kThreads, 0, stream>>>(
          ds.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), x.stride(0),
          ws.mutable_data_ptr<typename AccType<scalar_t>::type>(), M, K, R, split.rows_per_split, d);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return ws.sum(0).to(x.scalar_type());
}

// Two kernels: on the GPU regenerating the mask costs a few integer instructions per element, less
// than keeping one pass's tiles around for the other.
void backward_cuda(const at::Tensor& ds, const at::Tensor& x, const at::Tensor& lora_a, const Dropout& d,
                   at::Tensor* dx, at::Tensor* da) {
  if (dx) expand_accumulate_cuda(*dx, ds, lora_a, d);
  if (da) *da = grad_a_cuda(ds, x, d);
}

const LoraDropoutKernels kCudaKernels{down_cuda, backward_cuda};

}  // namespace
}  // namespace pefttorch::cuda

TORCH_LIBRARY_IMPL(pefttorch, CUDA, m) { pefttorch::register_lora_linear<pefttorch::cuda::kCudaKernels>(m); }
