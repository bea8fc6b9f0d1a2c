// CUDA launchers of the sparse-activation ops; the kernels are in sparse_activations_kernels.cuh.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../ops.h"
#include "sparse_activations_kernels.cuh"

namespace pefttorch::cuda {
namespace {

int64_t reduce_blocks(int64_t n) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::clamp<int64_t>((n + kReduceThreads - 1) / kReduceThreads, 1, 4 * sms);
}

std::tuple<at::Tensor, at::Tensor> density_forward_cuda(const at::Tensor& a, double eps, double threshold) {
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t n = a.numel(), blocks = reduce_blocks(n);
  at::Tensor sums = at::empty({blocks}, a.options().dtype(at::kDouble));
  at::Tensor counts = at::empty({blocks}, a.options().dtype(at::kLong));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "density_forward", [&] {
    density_forward_kernel<scalar_t><<<blocks, kReduceThreads, 0, stream>>>(
        a.const_data_ptr<scalar_t>(), n, eps, threshold, sums.mutable_data_ptr<double>(),
        reinterpret_cast<long long*>(counts.mutable_data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // the block partials are summed in float64, in a fixed order: deterministic
  return {sums.sum(), counts.sum()};
}

at::Tensor density_backward_cuda(const at::Tensor& grad, const at::Tensor& a, double eps, double scale) {
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t n = a.numel();
  at::Tensor ga = at::empty_like(a);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "density_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor g = grad.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    density_backward_kernel<scalar_t><<<reduce_blocks(n), kReduceThreads, 0, stream>>>(
        g.const_data_ptr<acc_t>(), a.const_data_ptr<scalar_t>(), n, eps, scale, ga.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return ga;
}

const DensityKernels kCudaDensity{density_forward_cuda, density_backward_cuda};

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// The sparse path for decode (up to kMaxSparseTokens tokens); more tokens take the dense path. It runs
// at every density: its weight traffic is the active rows only and, at full density, one read of the
// weights as the dense GEMV does. (Where the dense path is faster is for the first GPU measurement to
// say; see the issue's benchmark.)
at::Tensor sparse_mlp_cuda(const SparseMlpArgs& a) {
  const int64_t tokens = a.x.size(0), hidden = a.w_in.size(1), inter = a.w_in.size(0), out = a.w_down_t.size(1);
  // float64 takes the dense path too: the kernels compute in float32
  // out == 0 too: no columns to split (the launch shape would divide by zero)
  if (tokens > kMaxSparseTokens || hidden == 0 || out == 0 || a.x.scalar_type() == at::kDouble) return {};
  const c10::cuda::CUDAGuard guard(a.x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  at::Tensor h = at::empty({tokens, inter}, a.x.options().dtype(at::kFloat));
  at::Tensor active = at::empty({inter}, a.x.options().dtype(at::kByte));
  const Act act = static_cast<Act>(static_cast<int>(a.activation));
  at::Tensor part;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "sparse_mlp", [&] {
    const int64_t block_cols = down_block_cols<scalar_t>();
    const int64_t splits = down_splits(inter, out, static_cast<int>(tokens), block_cols, sms);
    const int64_t rows_per_split = (inter + splits - 1) / splits;
    TORCH_INTERNAL_ASSERT(rows_per_split <= kDownMaxRows, "sparse_mlp: a split's neuron list overflows");
    part = at::empty({splits, tokens, out}, a.x.options().dtype(at::kFloat));
    const dim3 grid((out + block_cols - 1) / block_cols, splits);
    PT_SPARSE_TOKENS_SWITCH(tokens, TOK, [&] {
      sparse_mlp_in_kernel<scalar_t, TOK><<<(inter + kInWarps - 1) / kInWarps, kInWarps * 32, 0, stream>>>(
          a.x.const_data_ptr<scalar_t>(), a.x.stride(0), static_cast<int>(tokens), hidden,
          a.w_in.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(a.b_in), ptr_or_null<scalar_t>(a.w_up),
          ptr_or_null<scalar_t>(a.b_up), inter, act, static_cast<float>(a.threshold), h.mutable_data_ptr<float>(),
          active.mutable_data_ptr<uint8_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      sparse_mlp_down_kernel<scalar_t, TOK><<<grid, kDownThreads, 0, stream>>>(
          h.const_data_ptr<float>(), active.const_data_ptr<uint8_t>(), static_cast<int>(tokens), inter,
          a.w_down_t.const_data_ptr<scalar_t>(), out, rows_per_split, part.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  at::Tensor y = part.sum(0);
  if (a.b_down.defined()) y.add_(a.b_down);
  return y.to(a.x.scalar_type());
}

static_assert(static_cast<int>(Act::kReLU) == static_cast<int>(Activation::kReLU) &&
              static_cast<int>(Act::kGELU) == static_cast<int>(Activation::kGELU) &&
              static_cast<int>(Act::kGELUTanh) == static_cast<int>(Activation::kGELUTanh) &&
              static_cast<int>(Act::kSiLU) == static_cast<int>(Activation::kSiLU));

}  // namespace
}  // namespace pefttorch::cuda

TORCH_LIBRARY_IMPL(pefttorch, CUDA, m) {
  pefttorch::register_sparse_activation_ops<pefttorch::cuda::kCudaDensity, pefttorch::cuda::sparse_mlp_cuda>(m);
}
