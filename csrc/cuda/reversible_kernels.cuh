// Device code of the reversible coupling ops (launchers: reversible.cu). Kept apart so the CPU emulation test
// (csrc/tests/test_reversible_kernels_emulated.cpp) can compile and run it without a GPU.
//
//   CouplingForward:  y = scale * x + f
//   CouplingBackward: x = (y - f) / scale, grad_x = scale * grad_y, grad_other_out = grad_other + vjp
//
// Elementwise over groups of kVec elements, grid-stride. The stream tensors are of type T, f and vjp of
// their own types F and V; each result is formed in at::opmath_type<T> (float32; float64 for float64) and
// rounded once to T.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "rounding.cuh"

namespace pefttorch::cuda {

constexpr int kElementwiseThreads = 256;
constexpr int kVec = 4;  // elements per thread and group: 16-byte loads of float32, 8-byte of 16-bit types

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// True when p can be read in Packs of kVec: every group starts at a multiple of kVec elements.
template <typename T>
bool pack_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % sizeof(Pack<T, kVec>) == 0;
}

// p[i .. i + N) widened to acc_t; one vector load when `vec` (p aligned, i a multiple of N).
template <int N, typename acc_t, typename T>
__device__ __forceinline__ void load(const T* __restrict__ p, int64_t i, bool vec, acc_t out[N]) {
  if (vec) {
    const Pack<T, N> pack = *reinterpret_cast<const Pack<T, N>*>(p + i);
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = static_cast<acc_t>(pack.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = static_cast<acc_t>(p[i + j]);
  }
}

template <int N, typename acc_t, typename T>
__device__ __forceinline__ void store(T* __restrict__ p, int64_t i, bool vec, const acc_t in[N]) {
  if (vec) {
    Pack<T, N> pack;
#pragma unroll
    for (int j = 0; j < N; ++j) pack.v[j] = static_cast<T>(in[j]);
    *reinterpret_cast<Pack<T, N>*>(p + i) = pack;
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) p[i + j] = static_cast<T>(in[j]);
  }
}

template <typename T, typename F>
struct CouplingForward {
  using acc_t = at::opmath_type<T>;
  const T* __restrict__ x;
  const F* __restrict__ f;
  T* __restrict__ y;
  acc_t scale;

  bool aligned() const { return pack_aligned(x) && pack_aligned(f) && pack_aligned(y); }

  template <int N>
  __device__ __forceinline__ void apply(int64_t i, bool vec) const {
    acc_t xv[N], fv[N];
    load<N>(x, i, vec, xv);
    load<N>(f, i, vec, fv);
#pragma unroll
    for (int j = 0; j < N; ++j) xv[j] = mul_add_rn(scale, xv[j], fv[j]);
    store<N>(y, i, vec, xv);
  }
};

template <typename T, typename F, typename V>
struct CouplingBackward {
  using acc_t = at::opmath_type<T>;
  const T* __restrict__ y;
  const F* __restrict__ f;
  const T* __restrict__ grad_y;
  const T* __restrict__ grad_other;
  const V* __restrict__ vjp;
  T* __restrict__ x;
  T* __restrict__ grad_x;
  T* __restrict__ grad_other_out;
  acc_t scale;

  bool aligned() const {
    return pack_aligned(y) && pack_aligned(f) && pack_aligned(grad_y) && pack_aligned(grad_other) &&
           pack_aligned(vjp) && pack_aligned(x) && pack_aligned(grad_x) && pack_aligned(grad_other_out);
  }

  template <int N>
  __device__ __forceinline__ void apply(int64_t i, bool vec) const {
    acc_t a[N], b[N];
    load<N>(y, i, vec, a);
    load<N>(f, i, vec, b);
    // a true division, not a multiplication by 1 / scale: one rounding fewer
#pragma unroll
    for (int j = 0; j < N; ++j) a[j] = (a[j] - b[j]) / scale;
    store<N>(x, i, vec, a);
    load<N>(grad_y, i, vec, a);
#pragma unroll
    for (int j = 0; j < N; ++j) a[j] = scale * a[j];
    store<N>(grad_x, i, vec, a);
    load<N>(grad_other, i, vec, a);
    load<N>(vjp, i, vec, b);
#pragma unroll
    for (int j = 0; j < N; ++j) a[j] = a[j] + b[j];
    store<N>(grad_other_out, i, vec, a);
  }
};

// op.apply<kVec> over the groups of [0, n), grid-stride, then op.apply<1> over the n % kVec elements left.
// `vec`: every pointer of op is pack_aligned.
template <typename Op>
__global__ void __launch_bounds__(kElementwiseThreads) elementwise_kernel(Op op, int64_t n, bool vec) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t groups = n / kVec;
  for (int64_t g = tid; g < groups; g += stride) op.template apply<kVec>(g * kVec, vec);
  for (int64_t i = groups * kVec + tid; i < n; i += stride) op.template apply<1>(i, false);
}

}  // namespace pefttorch::cuda
