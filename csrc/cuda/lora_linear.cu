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

// The kernels take R and K as the row strides of ds, s and lora_a, and 1 as every inner stride:
// lora_linear.cpp hands them fresh or .contiguous() tensors; keep it that way.
void check_layout(const at::Tensor& rows, const at::Tensor& lora_a, const at::Tensor* ds) {
  TORCH_INTERNAL_ASSERT(rows.size(1) <= 1 || rows.stride(1) == 1, "lora kernels: rows need unit inner stride");
  TORCH_INTERNAL_ASSERT(lora_a.is_contiguous(), "lora kernels: lora_a must be contiguous");
  TORCH_INTERNAL_ASSERT(ds == nullptr || ds->is_contiguous(), "lora kernels: ds must be contiguous");
}

void check_rank_grid(int64_t R, int tile) {
  TORCH_CHECK(ceil_div(R, tile) <= 65535, "lora_linear: rank ", R, " is too large for the CUDA kernels");
}

void down_cuda(const at::Tensor& x, const at::Tensor& a, const Dropout& d, at::Tensor& s) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1), R = a.size(0);
  check_layout(x, a, nullptr);
  TORCH_INTERNAL_ASSERT(s.is_contiguous());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_down_dropout", [&] {
    PT_RANK_TILE_SWITCH(R, BN, [&] {
      check_rank_grid(R, BN);
      using acc_t = typename AccType<scalar_t>::type;
      const Split split = down_split(M, K, R, BN, sms);
      at::Tensor ws;  // the splits' partial sums; none with one split
      if (split.splits > 1) ws = at::empty({split.splits, M, R}, x.options().dtype(at::toOpMathType(x.scalar_type())));
      const dim3 grid(ceil_div(M, 64), ceil_div(R, BN), split.splits);
      lora_down_dropout_kernel<scalar_t, BN><<<grid, kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), x.stride(0), a.const_data_ptr<scalar_t>(), s.mutable_data_ptr<scalar_t>(),
          ws.defined() ? ws.mutable_data_ptr<acc_t>() : nullptr, M, K, R, split.per_split, d);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (ws.defined()) s.copy_(ws.sum(0));
    });
  });
}

void expand_accumulate_cuda(at::Tensor& dx, const at::Tensor& ds, const at::Tensor& a, const Dropout& d) {
  const c10::cuda::CUDAGuard guard(dx.device());
  const int64_t M = dx.size(0), K = dx.size(1), R = a.size(0);
  check_layout(dx, a, &ds);
  TORCH_CHECK(ceil_div(K, 64) <= 65535, "lora_linear_backward: in_features = ", K, " is too large for the CUDA kernel");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dx.scalar_type(), "lora_expand_dropout", [&] {
    PT_RANK_TILE_SWITCH(R, TILE, [&] {
      constexpr int RC = rank_tile_for<scalar_t>(TILE);
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
  TORCH_INTERNAL_ASSERT(ds.is_contiguous() && (K <= 1 || x.stride(1) == 1));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  at::Tensor ws;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_grad_a_dropout", [&] {
    PT_RANK_TILE_SWITCH(R, TILE, [&] {
      constexpr int RN = rank_tile_for<scalar_t>(TILE);
      check_rank_grid(R, RN);
      const Split split = grad_a_split(M, K, R, RN, sms);
      ws = at::empty({split.splits, R, K}, x.options().dtype(at::toOpMathType(x.scalar_type())));
      const dim3 grid(ceil_div(K, 64), ceil_div(R, RN), split.splits);
      lora_grad_a_dropout_kernel<scalar_t, RN><<<grid, kThreads, 0, stream>>>(
          ds.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), x.stride(0),
          ws.mutable_data_ptr<typename AccType<scalar_t>::type>(), M, K, R, split.per_split, d);
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
