// Products and sums rounded as PyTorch's separate element-wise ops round them: each operation rounded on its own,
// never contracted into an FMA (nvcc contracts a * b + c by default). Kernels that promise the reference's bits
// (reversible coupling, rotary embedding) build their arithmetic from these. In the CPU emulation of the device
// code (csrc/tests/*_emulated.cpp) they are plain operators: those tests build for the x86-64 baseline, which has
// no FMA instruction to contract into.
#pragma once

#include <type_traits>

namespace pefttorch::cuda {

template <typename acc_t>
__device__ __forceinline__ acc_t mul_rn(acc_t a, acc_t b) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<acc_t, double>) return __dmul_rn(a, b);
  else return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

template <typename acc_t>
__device__ __forceinline__ acc_t add_rn(acc_t a, acc_t b) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<acc_t, double>) return __dadd_rn(a, b);
  else return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// a * b + c, rounded twice
template <typename acc_t>
__device__ __forceinline__ acc_t mul_add_rn(acc_t a, acc_t b, acc_t c) {
  return add_rn(mul_rn(a, b), c);
}

}  // namespace pefttorch::cuda
