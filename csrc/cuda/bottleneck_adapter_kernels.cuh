// Device code of the bottleneck adapter (launchers: bottleneck_adapter.cu). Kept apart so the CPU emulation test
// (csrc/tests/test_bottleneck_adapter_kernels_emulated.cpp) can compile and run it without a GPU.
//
//   adapter_residual_sum_kernel:    y = x + residual + scale * b_up   (the terms whose pointer is not null)
//   adapter_activation_grad_kernel: g = g * act'(h)                   in place
//
// Both are memory-bound one-pass loops, grid-stride over the elements; values are formed in at::opmath_type<T>
// (float32; float64 for float64) and rounded once. The GEMMs around them are cuBLAS's (csrc/bottleneck_adapter.cpp).
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "../common/activation.h"

namespace pefttorch::cuda {

constexpr int kAdapterThreads = 256;

// y (rows, cols) contiguous; x and residual (rows, cols) with unit inner stride and row strides ldx, ldr; b (cols,).
// index_t: uint32_t when every index and offset fits (the launcher checks), which makes the division that
// splits an element index into (row, col) several times cheaper than in 64 bits; uint64_t otherwise.
template <typename T, typename index_t>
__global__ void __launch_bounds__(kAdapterThreads)
    adapter_residual_sum_kernel(const T* __restrict__ x, index_t ldx, const T* __restrict__ residual, index_t ldr,
                                const T* __restrict__ b, at::opmath_type<T> scale, T* __restrict__ y, index_t rows,
                                index_t cols) {
  using acc_t = at::opmath_type<T>;
  const index_t n = rows * cols;
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  // the null checks are uniform across the grid: no divergence, and cheap next to the memory traffic
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const index_t r = i / cols, c = i - r * cols;
    acc_t v = b != nullptr ? scale * static_cast<acc_t>(b[c]) : acc_t(0);
    if (x != nullptr) v += static_cast<acc_t>(x[r * ldx + c]);
    if (residual != nullptr) v += static_cast<acc_t>(residual[r * ldr + c]);
    y[i] = static_cast<T>(v);
  }
}

// g and h contiguous, n elements.
template <typename T, Activation A>
__global__ void __launch_bounds__(kAdapterThreads)
    adapter_activation_grad_kernel(T* __restrict__ g, const T* __restrict__ h, int64_t n) {
  using acc_t = at::opmath_type<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    g[i] = static_cast<T>(static_cast<acc_t>(g[i]) * activation_derivative<A>(static_cast<acc_t>(h[i])));
  }
}

}  // namespace pefttorch::cuda
