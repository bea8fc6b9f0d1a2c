// Device-independent body of the rotary embedding op. Kernels per device: csrc/cpu/rotary.cpp, csrc/cuda/rotary.cu.
#include <ATen/ATen.h>

#include "common/checks.h"
#include "ops.h"

namespace pefttorch {

namespace {

constexpr const char* kOp = "rotary_embedding";

// t (cos or sin) has x's last dimension and broadcasts to x's shape; returns it expanded, last dimension contiguous.
at::Tensor broadcast_to_x(const at::Tensor& t, const char* name, const at::Tensor& x) {
  check_float_dtype(kOp, t, name);
  check_same_device(kOp, t, name, x, "x");
  bool fits = t.dim() >= 1 && t.dim() <= x.dim();
  for (int64_t d = 1; fits && d <= t.dim(); ++d) {
    fits = t.size(-d) == x.size(-d) || (d > 1 && t.size(-d) == 1);
  }
  TORCH_CHECK(fits, kOp, ": ", name, " of shape ", t.sizes(), " does not broadcast to x's shape ", x.sizes(),
              " (its last dimension must equal x's, the others x's or 1)");
  const at::Tensor rows = t.stride(-1) == 1 ? t : t.contiguous();
  return rows.expand(x.sizes());
}

}  // namespace

at::Tensor rotary_embedding(const RotaryKernels& k, const at::Tensor& x_in, const at::Tensor& cos,
                            const at::Tensor& sin, bool transpose) {
  check_float_dtype(kOp, x_in, "x");
  TORCH_CHECK(x_in.dim() >= 1 && x_in.dim() <= kRotaryDims + 1, kOp, ": x must have 1 to ", kRotaryDims + 1,
              " dimensions, got shape ", x_in.sizes());
  const int64_t width = x_in.size(-1);
  TORCH_CHECK(width % 2 == 0, kOp, ": x's last dimension (the head size) must be even, got shape ", x_in.sizes());
  check_same_dtype(kOp, sin, "sin", cos, "cos");
  const at::Tensor x = x_in.stride(-1) == 1 || width <= 1 ? x_in : x_in.contiguous();
  const at::Tensor c = broadcast_to_x(cos, "cos", x), s = broadcast_to_x(sin, "sin", x);
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return out;

  RotaryArgs a{x, c, s, out, x.numel() / width, {width / 2, static_cast<int>(x.dim()) - 1, {}, {}, {}, {}}, transpose};
  for (int d = 0; d < a.g.dims; ++d) {
    a.g.sizes[d] = x.size(d);
    a.g.x_strides[d] = x.stride(d);
    a.g.cos_strides[d] = c.stride(d);
    a.g.sin_strides[d] = s.stride(d);
  }
  k.apply(a);
  return out;
}

}  // namespace pefttorch
