// The activations the ops support, and their derivatives as scalar functions for the kernels of every device
// (CPU loops, CUDA device code, and the CUDA code run on the CPU by the emulation tests). The tensor-level
// forward, apply_activation, and the name parser, parse_activation, are declared in ops.h.
#pragma once

#include <math.h>  // erff, expf, tanhf in the global namespace, as CUDA device code has them

#include <type_traits>

#include "host_device.h"

namespace pefttorch {

enum class Activation { kReLU, kGELU, kGELUTanh, kSiLU };

namespace act_math {
// float and double overloads by name: std:: would not reach device code, and the un-suffixed names are double-only
PT_HOST_DEVICE float erf_(float v) { return erff(v); }
PT_HOST_DEVICE double erf_(double v) { return erf(v); }
PT_HOST_DEVICE float exp_(float v) { return expf(v); }
PT_HOST_DEVICE double exp_(double v) { return exp(v); }
PT_HOST_DEVICE float tanh_(float v) { return tanhf(v); }
PT_HOST_DEVICE double tanh_(double v) { return tanh(v); }
}  // namespace act_math

// d act(v) / dv, in acc_t (float, or double for float64 tensors), by the formulas of PyTorch's own backward
// kernels (threshold_backward, gelu_backward, silu_backward), so a fused kernel's gradient agrees with
// autograd's through the same activation: relu' is 0 at v <= 0 and 1 otherwise (NaN included, as
// threshold_backward lets the gradient through there).
template <Activation A, typename acc_t>
PT_HOST_DEVICE acc_t activation_derivative(acc_t v) {
  static_assert(std::is_floating_point_v<acc_t>, "activation_derivative: acc_t is float or double");
  if constexpr (A == Activation::kReLU) {
    return v <= acc_t(0) ? acc_t(0) : acc_t(1);
  } else if constexpr (A == Activation::kGELU) {
    // cdf + v * pdf of the standard normal
    const acc_t cdf = acc_t(0.5) * (acc_t(1) + act_math::erf_(v * acc_t(0.70710678118654752440)));
    const acc_t pdf = acc_t(0.39894228040143267794) * act_math::exp_(acc_t(-0.5) * v * v);
    return cdf + v * pdf;
  } else if constexpr (A == Activation::kGELUTanh) {
    // gelu_tanh(v) = 0.5 v (1 + tanh(u)), u = sqrt(2/pi) (v + 0.044715 v^3)
    constexpr acc_t kBeta = acc_t(0.79788456080286535588), kKappa = acc_t(0.044715);
    const acc_t v2 = v * v;
    const acc_t t = act_math::tanh_(kBeta * (v + kKappa * v2 * v));
    return acc_t(0.5) * (acc_t(1) + t) + acc_t(0.5) * v * (acc_t(1) - t * t) * kBeta * (acc_t(1) + 3 * kKappa * v2);
  } else {
    static_assert(A == Activation::kSiLU, "activation_derivative: unknown activation");
    const acc_t s = acc_t(1) / (acc_t(1) + act_math::exp_(-v));
    return s * (acc_t(1) + v * (acc_t(1) - s));
  }
}

// Calls fn with std::integral_constant<Activation, act>: a kernel templated on the activation has no switch in
// its loop. Host only (launchers and CPU kernels).
template <typename Fn>
void dispatch_activation(Activation act, Fn&& fn) {
  switch (act) {
    case Activation::kReLU: return fn(std::integral_constant<Activation, Activation::kReLU>{});
    case Activation::kGELU: return fn(std::integral_constant<Activation, Activation::kGELU>{});
    case Activation::kGELUTanh: return fn(std::integral_constant<Activation, Activation::kGELUTanh>{});
    case Activation::kSiLU: return fn(std::integral_constant<Activation, Activation::kSiLU>{});
  }
}

}  // namespace pefttorch
