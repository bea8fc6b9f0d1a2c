// The arithmetic of one AdamW step with per-row step counts (the component_adamw_ op), for the kernels of every
// device: the CPU loop, the CUDA kernel, and that kernel run on the CPU by the emulation test. One definition, so
// the devices cannot drift apart; the order of operations is that of pefttorch.reference.component_adamw_, so in
// the same precision the results agree to the last bits but for contraction into fused multiply-adds.
#pragma once

#include <math.h>  // powf, sqrtf in the global namespace, as CUDA device code has them

#include <type_traits>

#include "host_device.h"

namespace pefttorch {

// float for float32, float16 and bfloat16 tensors, double for float64: the precision of the step.
template <typename T>
using adamw_acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

namespace adamw_math {
// float and double overloads by name: std:: would not reach device code, and the un-suffixed names are double-only
PT_HOST_DEVICE float pow_(float b, float e) { return powf(b, e); }
PT_HOST_DEVICE double pow_(double b, double e) { return pow(b, e); }
PT_HOST_DEVICE float sqrt_(float v) { return sqrtf(v); }
PT_HOST_DEVICE double sqrt_(double v) { return sqrt(v); }
}  // namespace adamw_math

// The hyperparameters in the step's precision, converted once on the host. one_minus_beta* are formed in double
// before the conversion, as the reference's Python floats are.
template <typename acc_t>
struct AdamwScalars {
  acc_t lr, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay;
};

template <typename acc_t>
inline AdamwScalars<acc_t> adamw_scalars(double lr, double beta1, double beta2, double eps, double weight_decay) {
  return {static_cast<acc_t>(lr),           static_cast<acc_t>(beta1), static_cast<acc_t>(beta2),
          static_cast<acc_t>(1.0 - beta1),  static_cast<acc_t>(1.0 - beta2), static_cast<acc_t>(eps),
          static_cast<acc_t>(weight_decay)};
}

// What one row needs, from its step count s (>= 1): computed once per row, not per element.
template <typename acc_t>
struct AdamwRow {
  acc_t decay;      // 1 - lr_k * weight_decay
  acc_t step_size;  // lr_k / (1 - beta1^s)
  acc_t bias2;      // 1 - beta2^s
};

// lr_k = lr * min(1, s / warmup), or lr for warmup 0.
template <typename acc_t>
PT_HOST_DEVICE AdamwRow<acc_t> adamw_row(const AdamwScalars<acc_t>& h, acc_t s, acc_t warmup) {
  acc_t lr_k = h.lr;
  if (warmup > acc_t(0)) {
    const acc_t ramp = s / warmup;
    lr_k = h.lr * (ramp < acc_t(1) ? ramp : acc_t(1));
  }
  const acc_t bias1 = acc_t(1) - adamw_math::pow_(h.beta1, s);
  const acc_t bias2 = acc_t(1) - adamw_math::pow_(h.beta2, s);
  return {acc_t(1) - lr_k * h.weight_decay, lr_k / bias1, bias2};
}

// One element, in place: p, m, v read and written in their storage type T, the step in acc_t, each rounded once.
template <typename T, typename acc_t>
PT_HOST_DEVICE void adamw_element(const AdamwScalars<acc_t>& h, const AdamwRow<acc_t>& r, T& p, T g_in, T& m, T& v) {
  const acc_t g = static_cast<acc_t>(g_in);
  acc_t pv = static_cast<acc_t>(p) * r.decay;
  acc_t mv = static_cast<acc_t>(m);
  mv = mv + h.one_minus_beta1 * (g - mv);
  const acc_t vv = h.beta2 * static_cast<acc_t>(v) + h.one_minus_beta2 * g * g;
  pv = pv - r.step_size * mv / (adamw_math::sqrt_(vv / r.bias2) + h.eps);
  p = static_cast<T>(pv);
  m = static_cast<T>(mv);
  v = static_cast<T>(vv);
}

}  // namespace pefttorch
