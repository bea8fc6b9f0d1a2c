// Device code of the rotary embedding op (launcher: rotary.cu). Kept apart so the CPU emulation test
// (csrc/tests/test_rotary_kernels_emulated.cpp) can compile and run it without a GPU.
//
// One thread per rotated pair (i, i + h) of a row, grid-stride over rows * h pairs: consecutive threads take
// consecutive pairs of a row, so a warp reads and writes contiguous runs of x, cos, sin and out. Memory-bound:
// each element of x and out is touched once, cos and sin are read per row (from L2 when broadcast over heads).
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

#include "../ops.h"
#include "rounding.cuh"

namespace pefttorch::cuda {

constexpr int kRotaryThreads = 256;

template <typename T, typename C, bool Transpose>
__global__ void __launch_bounds__(kRotaryThreads)
    rotary_kernel(const T* __restrict__ x, const C* __restrict__ cos, const C* __restrict__ sin, T* __restrict__ out,
                  RotaryGeometry g, int64_t pairs) {
  using acc_t = at::opmath_type<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < pairs; t += stride) {
    const int64_t r = t / g.half, i = t - r * g.half;
    int64_t xo, co, so;
    g.offsets(r, xo, co, so);
    const acc_t x1 = static_cast<acc_t>(x[xo + i]), x2 = static_cast<acc_t>(x[xo + i + g.half]);
    const acc_t c1 = static_cast<acc_t>(cos[co + i]), c2 = static_cast<acc_t>(cos[co + i + g.half]);
    const acc_t s1 = static_cast<acc_t>(sin[so + i]), s2 = static_cast<acc_t>(sin[so + i + g.half]);
    const acc_t p1 = mul_rn(x1, c1), p2 = mul_rn(x2, c2);
    acc_t o1, o2;
    if constexpr (Transpose) {
      o1 = add_rn(p1, mul_rn(x2, s2));
      o2 = add_rn(p2, -mul_rn(x1, s1));
    } else {
      o1 = add_rn(p1, -mul_rn(x2, s1));
      o2 = add_rn(p2, mul_rn(x1, s2));
    }
    T* o = out + r * 2 * g.half;
    o[i] = static_cast<T>(o1);
    o[i + g.half] = static_cast<T>(o2);
  }
}

}  // namespace pefttorch::cuda
