// Device code of the ranked LoRA factor ops (launchers: ranked_lora.cu). Kept apart so the CPU emulation test
// (csrc/tests/test_ranked_lora_kernels_emulated.cpp) can compile and run it without a GPU.
//
//   ranked_factors_forward:  one block per component k < n: a_n[k] = a[k] * e[k], b_n[:, k] = b_t[k]
//   ranked_factors_backward: one block per storage row k < cap: ga[k], ge[k] (a block reduction), gb[k], zero
//                            where k is past the components in use
//
// The tensors are small (a rank of 1-64 rows of a few thousand elements), so one launch doing all of a layer's
// factor work is what matters, not the access pattern: b_n's column k and grad_b_n's column k are written and read
// with a stride of n elements.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "../common/opmath.h"

namespace pefttorch::cuda {

constexpr int kFactorThreads = 256;  // a power of two: the reduction in ranked_factors_backward halves it

template <typename S, typename C>
__global__ void __launch_bounds__(kFactorThreads)
    ranked_factors_forward_kernel(const S* __restrict__ a, const S* __restrict__ e, const S* __restrict__ b_t,
                                  int64_t n, int64_t in, int64_t out, C* __restrict__ a_n, C* __restrict__ b_n) {
  using acc_t = at::opmath_type<S>;
  const int64_t k = blockIdx.x;
  const acc_t ek = static_cast<acc_t>(e[k]);
  // rounded to S first: the value a[:n] * e[:n] has in the storage dtype, as the reference forms it
  for (int64_t j = threadIdx.x; j < in; j += blockDim.x) {
    a_n[k * in + j] = static_cast<C>(static_cast<S>(static_cast<acc_t>(a[k * in + j]) * ek));
  }
  for (int64_t i = threadIdx.x; i < out; i += blockDim.x) b_n[i * n + k] = static_cast<C>(b_t[k * out + i]);
}

// Outputs that are null are not asked for. blockDim.x must be a power of two, at most kFactorThreads.
template <typename S, typename C>
__global__ void __launch_bounds__(kFactorThreads)
    ranked_factors_backward_kernel(const C* __restrict__ grad_a_n, const C* __restrict__ grad_b_n,
                                   const S* __restrict__ a, const S* __restrict__ e, int64_t n, int64_t e_rows,
                                   int64_t in, int64_t out, S* __restrict__ ga, S* __restrict__ ge,
                                   S* __restrict__ gb) {
  using acc_t = pair_opmath_t<S, C>;
  __shared__ acc_t partial[kFactorThreads];
  const int64_t k = blockIdx.x;
  const bool used = k < n;  // block-uniform, as is every branch below: the barriers stay matched
  if (ga != nullptr) {
    const acc_t ek = static_cast<acc_t>(e[k]);
    for (int64_t j = threadIdx.x; j < in; j += blockDim.x) {
      ga[k * in + j] = used ? static_cast<S>(static_cast<acc_t>(grad_a_n[k * in + j]) * ek) : S(0.f);
    }
  }
  if (gb != nullptr) {
    for (int64_t i = threadIdx.x; i < out; i += blockDim.x) {
      gb[k * out + i] = used ? static_cast<S>(grad_b_n[i * n + k]) : S(0.f);
    }
  }
  if (ge != nullptr) {
    acc_t sum = 0;
    if (k < e_rows) {
      for (int64_t j = threadIdx.x; j < in; j += blockDim.x) {
        sum += static_cast<acc_t>(grad_a_n[k * in + j]) * static_cast<acc_t>(a[k * in + j]);
      }
    }
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int half = static_cast<int>(blockDim.x) / 2; half > 0; half /= 2) {  // fixed order: deterministic
      if (static_cast<int>(threadIdx.x) < half) partial[threadIdx.x] += partial[threadIdx.x + half];
      __syncthreads();
    }
    if (threadIdx.x == 0) ge[k] = static_cast<S>(partial[0]);
  }
}

}  // namespace pefttorch::cuda
