// Counter-based dropout: the mask is a pure function of (seed, element index), so kernels regenerate
// it wherever they need it (forward, backward, CPU, CUDA) instead of storing it.
//
// Element i of x, indexed row-major over its (tokens, in_features) view whatever x's strides, is kept
// when word (i % 4) of Philox4x32-10(counter = (i / 4, 0), key = seed) is >= threshold, where
// threshold = floor(p * 2^32). pefttorch/reference.py implements the same function in PyTorch.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace pefttorch {

struct Philox4 {
  uint32_t w[4];
};

PT_HOST_DEVICE uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32 with 10 rounds (Salmon et al., SC'11), the generator cuRAND and PyTorch use.
PT_HOST_DEVICE Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                     uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mulhi32(kM0, c0), lo0 = kM0 * c0;
    const uint32_t hi1 = mulhi32(kM1, c2), lo1 = kM1 * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// Dropout as every kernel applies it; `active` is false for p == 0 or eval mode. Factors come in the
// kernel's accumulation type T (float, or double for float64 tensors, where a float 1/(1-p) would
// cost precision).
struct Dropout {
  bool active = false;
  uint64_t seed = 0;
  uint32_t threshold = 0;  // keep iff philox word >= threshold
  double scale = 1.0;      // 1 / (1 - p), applied to kept elements

  static Dropout make(double p, uint64_t seed) {
    Dropout d;
    d.active = p > 0.0;
    d.seed = seed;
    d.threshold = static_cast<uint32_t>(std::fmin(std::floor(p * 4294967296.0), 4294967295.0));
    d.scale = 1.0 / (1.0 - p);
    return d;
  }

  // The four Philox words that decide elements 4g .. 4g+3.
  PT_HOST_DEVICE Philox4 block(uint64_t g) const {
    return philox4x32_10(static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), 0u, 0u,
                         static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  }

  template <typename T>
  PT_HOST_DEVICE T factor_of(uint32_t word) const {
    return word >= threshold ? static_cast<T>(scale) : T(0);
  }

  // The factor (0 or scale) of one element.
  template <typename T>
  PT_HOST_DEVICE T factor(uint64_t i) const {
    const Philox4 r = block(i >> 2);
    // A switch instead of r.w[i & 3]: a run-time index would push r to local memory on the GPU.
    switch (i & 3) {
      case 0: return factor_of<T>(r.w[0]);
      case 1: return factor_of<T>(r.w[1]);
      case 2: return factor_of<T>(r.w[2]);
      default: return factor_of<T>(r.w[3]);
    }
  }

  // Factors of elements i .. i+3: one Philox call when i is a multiple of 4 (the common case: the
  // row length is a multiple of 4 and the caller walks aligned quads), one per element otherwise.
  template <typename T>
  PT_HOST_DEVICE void factors4(uint64_t i, T f[4]) const {
    if ((i & 3) == 0) {
      const Philox4 r = block(i >> 2);
      f[0] = factor_of<T>(r.w[0]);
      f[1] = factor_of<T>(r.w[1]);
      f[2] = factor_of<T>(r.w[2]);
      f[3] = factor_of<T>(r.w[3]);
    } else {
      f[0] = factor<T>(i);
      f[1] = factor<T>(i + 1);
      f[2] = factor<T>(i + 2);
      f[3] = factor<T>(i + 3);
    }
  }
};

}  // namespace pefttorch
