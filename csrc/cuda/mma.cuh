// Warp-level 16x16x16 matrix products with one interface for every dtype, so each kernel is written
// once: tensor cores (nvcuda::wmma, fp32 accumulators) for half and bfloat16 on sm_80+, and a plain
// FMA version for float and double (and older GPUs), which keeps fp32/fp64 results at full precision
// instead of silently dropping to tf32.
//
// Usage inside a kernel, per warp:
//   using M = Mma<T>;  typename M::Acc c;  M::fill(c, 0);
//   typename M::template A<row_major> a;  M::load(a, smem_ptr, ld);   // and B likewise
//   M::mma(c, a, b);  ...  M::store(out_ptr, c, ld);                  // row-major accumulator tile
// Operand layouts follow WMMA: A (i, k) is at p[i*ld + k] (row_major) or p[k*ld + i] (col_major);
// B (k, j) is at p[k*ld + j] (row_major) or p[j*ld + k] (col_major). Pointers given to load() must
// stay valid until mma() (the FMA version reads shared memory there), 32-byte aligned, with ld a
// multiple of 8 elements for 16-bit types and of 4 for float accumulators.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

namespace pefttorch::cuda {

#if defined(__CUDACC__)
using row_major = nvcuda::wmma::row_major;
using col_major = nvcuda::wmma::col_major;
#else
// Compiled as plain C++ (csrc/tests/cuda_emulation.h): layout tags only, the FMA version does the rest.
struct row_major {};
struct col_major {};
#endif

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

// FMA version: a fragment of A or B is only a pointer into shared memory; lane l owns accumulator
// elements 8l .. 8l+7 of the 16x16 tile in row-major order.
template <typename T>
struct SimtMma {
  using acc_t = typename AccType<T>::type;
  template <typename Layout>
  struct Operand {
    const T* p;
    int ld;
  };
  template <typename Layout>
  using A = Operand<Layout>;
  template <typename Layout>
  using B = Operand<Layout>;
  struct Acc {
    acc_t v[8];
  };

  static __device__ __forceinline__ void fill(Acc& c, acc_t value) {
#pragma unroll
    for (int i = 0; i < 8; ++i) c.v[i] = value;
  }
  template <typename Layout>
  static __device__ __forceinline__ void load(Operand<Layout>& f, const T* p, int ld) {
    f.p = p;
    f.ld = ld;
  }
  template <typename LA, typename LB>
  static __device__ __forceinline__ void mma(Acc& c, const Operand<LA>& a, const Operand<LB>& b) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int i = (lane * 8 + e) >> 4, j = (lane * 8 + e) & 15;
      acc_t sum = c.v[e];
#pragma unroll
      for (int k = 0; k < 16; ++k) {
        const T av = std::is_same_v<LA, row_major> ? a.p[i * a.ld + k] : a.p[k * a.ld + i];
        const T bv = std::is_same_v<LB, row_major> ? b.p[k * b.ld + j] : b.p[j * b.ld + k];
        sum += static_cast<acc_t>(av) * static_cast<acc_t>(bv);
      }
      c.v[e] = sum;
    }
  }
  static __device__ __forceinline__ void store(acc_t* p, const Acc& c, int ld) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int i = (lane * 8 + e) >> 4, j = (lane * 8 + e) & 15;
      p[i * ld + j] = c.v[e];
    }
  }
};

#if defined(__CUDACC__)
template <typename T>
struct WmmaType;
template <>
struct WmmaType<c10::Half> {
  using type = __half;
};
template <>
struct WmmaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

// Tensor-core version for half and bfloat16 (c10 and CUDA types share their bit layout).
template <typename T>
struct WmmaMma {
  using acc_t = float;
  using W = typename WmmaType<T>::type;
  template <typename Layout>
  using A = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, W, Layout>;
  template <typename Layout>
  using B = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, W, Layout>;
  using Acc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;

  static __device__ __forceinline__ void fill(Acc& c, float value) { nvcuda::wmma::fill_fragment(c, value); }
  template <typename Frag>
  static __device__ __forceinline__ void load(Frag& f, const T* p, int ld) {
    nvcuda::wmma::load_matrix_sync(f, reinterpret_cast<const W*>(p), ld);
  }
  template <typename FA, typename FB>
  static __device__ __forceinline__ void mma(Acc& c, const FA& a, const FB& b) {
    nvcuda::wmma::mma_sync(c, a, b, c);
  }
  static __device__ __forceinline__ void store(float* p, const Acc& c, int ld) {
    nvcuda::wmma::store_matrix_sync(p, c, ld, nvcuda::wmma::mem_row_major);
  }
};

// Kernels size shared memory and workspaces by Mma<T>::acc_t, and the host pass (which sees the FMA
// version) must agree with the device pass (which may see this one).
static_assert(std::is_same_v<WmmaMma<c10::Half>::acc_t, AccType<c10::Half>::type> &&
              std::is_same_v<WmmaMma<c10::BFloat16>::acc_t, AccType<c10::BFloat16>::type>);
#endif  // __CUDACC__

// bf16 WMMA needs sm_80. The choice is made per compilation pass: device code for sm_80+ gets tensor
// cores, older targets (and the host pass, which never runs kernel bodies) the FMA version.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
inline constexpr bool kTensorCores = true;
#else
inline constexpr bool kTensorCores = false;
#endif

#if defined(__CUDACC__)
template <typename T>
using Mma = std::conditional_t<kTensorCores && (std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>),
                               WmmaMma<T>, SimtMma<T>>;
#else
template <typename T>
using Mma = SimtMma<T>;
#endif

}  // namespace pefttorch::cuda
