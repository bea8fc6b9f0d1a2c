// Device-independent bodies of the reversible coupling ops (MEFT). Kernels per device: csrc/cpu/reversible.cpp,
// csrc/cuda/reversible.cu.
#include <ATen/ATen.h>

#include <cmath>
#include <limits>

#include "common/checks.h"
#include "ops.h"

namespace pefttorch {

namespace {

constexpr const char* kForward = "reversible_coupling";
constexpr const char* kBackward = "reversible_coupling_backward";

// A zero scale would make the layer non-invertible, and the reconstruction x = (y - f) / scale divides by it. The
// kernels compute in float32 (float64 for float64 streams): a scale that is zero or infinite there (1e-46, 1e39) is
// one too, and a subnormal one loses x's low bits, so it must be a normal number of the compute dtype.
void check_scale(const char* op, double scale, const at::Tensor& stream) {
  const bool wide = stream.scalar_type() == at::kDouble;
  const double tiny = wide ? std::numeric_limits<double>::min() : std::numeric_limits<float>::min();
  const double big = wide ? std::numeric_limits<double>::max() : std::numeric_limits<float>::max();
  TORCH_CHECK(std::isfinite(scale) && tiny <= std::abs(scale) && std::abs(scale) <= big, op,
              ": scale must be finite and nonzero", wide ? "" : " in float32, the kernels' compute dtype",
              " (a normal number), got ", scale);
}

// t has a float dtype (its own: f and vjp come in the model's dtype) and ref's shape and device.
void check_operand(const char* op, const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  check_float_dtype(op, t, name);
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " must have the shape of ", ref_name, " ", ref.sizes(),
              ", got ", t.sizes());
  check_same_device(op, t, name, ref, ref_name);
}

}  // namespace

at::Tensor reversible_coupling(const ReversibleKernels& k, const at::Tensor& x, const at::Tensor& f, double scale) {
  check_float_dtype(kForward, x, "x");
  check_operand(kForward, f, "f", x, "x");
  check_scale(kForward, scale, x);
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (x.numel() > 0) k.forward(x.contiguous(), f.contiguous(), scale, y);
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> reversible_coupling_backward(
    const ReversibleKernels& k, const at::Tensor& y, const at::Tensor& f, const at::Tensor& grad_y,
    const at::Tensor& grad_other, const at::Tensor& vjp, double scale) {
  check_float_dtype(kBackward, y, "y");
  check_operand(kBackward, f, "f", y, "y");
  check_operand(kBackward, grad_y, "grad_y", y, "y");
  check_same_dtype(kBackward, grad_y, "grad_y", y, "y");
  check_operand(kBackward, grad_other, "grad_other", y, "y");
  check_same_dtype(kBackward, grad_other, "grad_other", y, "y");
  check_operand(kBackward, vjp, "vjp", y, "y");
  check_scale(kBackward, scale, y);
  const auto out = [&] { return at::empty(y.sizes(), y.options()); };
  ReversibleBackwardArgs a{y.contiguous(), f.contiguous(), grad_y.contiguous(), grad_other.contiguous(),
                           vjp.contiguous(), out(), out(), out(), scale};
  if (y.numel() > 0) k.backward(a);
  return {a.x, a.grad_x, a.grad_other_out};
}

}  // namespace pefttorch
