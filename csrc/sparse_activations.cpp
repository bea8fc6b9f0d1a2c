// Device-independent bodies of the sparse-activation ops (DEFT): the density loss used in training and
// the sparse MLP used in inference. Kernels per device: csrc/cpu/sparse_activations.cpp, csrc/cuda/.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <limits>

#include "common/checks.h"
#include "ops.h"

namespace pefttorch {

namespace {
constexpr const char* kLoss = "density_loss";
constexpr const char* kMlp = "sparse_mlp";
// eps enters a^2 / (a^2 + eps) in opmath precision (float32; float64 for float64 a): an eps below the smallest
// normal float32 loses precision, and one below the smallest subnormal becomes 0, so an exact zero activation
// (ReLU's) gives 0 / 0 = NaN. An infinite eps (or one beyond float32's range) makes every term 0 and its gradient
// 0 * inf = NaN.
void check_eps(const char* op, const at::Tensor& a, double eps) {
  TORCH_CHECK(eps > 0.0 && std::isfinite(eps), op, ": eps must be positive and finite, got ", eps);
  if (a.scalar_type() != at::kDouble) {
    constexpr double kSmallest = std::numeric_limits<float>::min();
    constexpr double kLargest = std::numeric_limits<float>::max();
    TORCH_CHECK(eps >= kSmallest && eps <= kLargest, op, ": eps = ", eps, " is outside float32's normal range (",
                kSmallest, " to ", kLargest, "), the precision the loss is computed in for ", a.scalar_type(),
                " a: use another eps or float64 a");
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> density_loss(const DensityKernels& k, const at::Tensor& a, double eps,
                                                double threshold) {
  check_float_dtype(kLoss, a, "a");
  check_eps(kLoss, a, eps);
  TORCH_CHECK(threshold >= 0.0, kLoss, ": threshold must be >= 0, got ", threshold);
  TORCH_CHECK(a.numel() > 0, kLoss, ": a is empty: the mean over no activations is undefined");
  const auto out_dtype = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto [sum, count] = k.forward(a.contiguous(), eps, threshold);
  const double n = static_cast<double>(a.numel());
  return {sum.div(n).to(out_dtype), count.to(at::kDouble).div(n).to(out_dtype)};
}

at::Tensor density_loss_backward(const DensityKernels& k, const at::Tensor& grad, const at::Tensor& a, double eps) {
  check_float_dtype("density_loss_backward", a, "a");
  check_eps("density_loss_backward", a, eps);
  TORCH_CHECK(grad.numel() == 1, "density_loss_backward: grad must have one element, got shape ", grad.sizes());
  check_same_device("density_loss_backward", grad, "grad", a, "a");
  TORCH_CHECK(a.numel() > 0, "density_loss_backward: a is empty");
  const at::Tensor ga = k.backward(grad.reshape({}), a.contiguous(), eps, 1.0 / a.numel());
  return ga.view(a.sizes());
}

Activation parse_activation(const char* op, const std::string& name) {
  if (name == "relu") return Activation::kReLU;
  if (name == "gelu") return Activation::kGELU;
  if (name == "gelu_tanh") return Activation::kGELUTanh;
  if (name == "silu") return Activation::kSiLU;
  TORCH_CHECK(false, op, ": unsupported activation '", name, "'; supported: relu, gelu, gelu_tanh, silu");
}

at::Tensor apply_activation(const at::Tensor& h, Activation act) {
  switch (act) {
    case Activation::kReLU: return at::relu(h);
    case Activation::kGELU: return at::gelu(h);
    case Activation::kGELUTanh: return at::gelu(h, "tanh");
    case Activation::kSiLU: return at::silu(h);
  }
  TORCH_CHECK(false, "unreachable");
}

namespace {

// An optional input, contiguous: the kernels index biases and weights as dense arrays (a strided bias was read
// as if it were contiguous)
at::Tensor opt(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

}  // namespace

at::Tensor sparse_mlp_gate(const SparseMlpArgs& a) {
  const at::Tensor pre = a.b_in.defined() ? at::addmm(a.b_in, a.x, a.w_in.t()) : at::mm(a.x, a.w_in.t());
  return apply_activation(pre, a.activation);
}

at::Tensor sparse_mlp_dense(const SparseMlpArgs& a) { return sparse_mlp_dense_from_gate(a, sparse_mlp_gate(a)); }

at::Tensor sparse_mlp_dense_from_gate(const SparseMlpArgs& a, const at::Tensor& g) {
  at::Tensor h = a.w_up.defined() ? g * (a.b_up.defined() ? at::addmm(a.b_up, a.x, a.w_up.t()) : at::mm(a.x, a.w_up.t()))
                                  : g;
  // the mask compares in float32 (float64 for float64), as the CPU kernel does: in half precision the
  // threshold itself would be rounded. (The CUDA kernel compares its float32 gate before rounding to x's
  // dtype, so on CUDA a neuron within rounding of the threshold may fall either way between the paths.)
  // Masked where |g| <= threshold, as in the sparse kernels: a NaN gate counts as active and propagates.
  if (a.threshold > 0.0) {
    const at::Tensor inactive = g.abs().to(at::toOpMathType(g.scalar_type())).le(a.threshold);
    h = at::where(inactive, at::zeros({}, h.options()), h);
  }
  return a.b_down.defined() ? at::addmm(a.b_down, h, a.w_down_t) : at::mm(h, a.w_down_t);
}

at::Tensor sparse_mlp(SparseMlpKernel k, const at::Tensor& x, const at::Tensor& w_in,
                      const std::optional<at::Tensor>& b_in, const std::optional<at::Tensor>& w_up,
                      const std::optional<at::Tensor>& b_up, const at::Tensor& w_down_t,
                      const std::optional<at::Tensor>& b_down, const std::string& activation, double threshold) {
  TORCH_CHECK(x.dim() >= 1, kMlp, ": x must have at least one dimension (..., hidden)");
  check_float_dtype(kMlp, x, "x");
  check_dim(kMlp, w_in, "w_in", 2);
  check_dim(kMlp, w_down_t, "w_down_t", 2);
  const int64_t hidden = w_in.size(1), inter = w_in.size(0), out = w_down_t.size(1);
  TORCH_CHECK(inter > 0, kMlp, ": the MLP has no intermediate neurons (w_in has shape ", w_in.sizes(), ")");
  check_size(kMlp, x, "x", -1, hidden, "hidden = w_in.size(1)");
  check_size(kMlp, w_down_t, "w_down_t", 0, inter, "intermediate = w_in.size(0)");
  TORCH_CHECK(threshold >= 0.0, kMlp, ": threshold must be >= 0, got ", threshold);
  SparseMlpArgs args{as_rows(x, hidden), w_in.contiguous(), opt(b_in), opt(w_up), opt(b_up), w_down_t.contiguous(),
                     opt(b_down), parse_activation(kMlp, activation), threshold};
  check_like(kMlp, w_in, "w_in", x, "x");
  check_like(kMlp, w_down_t, "w_down_t", x, "x");
  const auto check_vector = [&](const at::Tensor& t, const char* name, int64_t size, const char* what) {
    if (!t.defined()) return;
    check_dim(kMlp, t, name, 1);
    check_size(kMlp, t, name, 0, size, what);
    check_like(kMlp, t, name, x, "x");
  };
  check_vector(args.b_in, "b_in", inter, "intermediate = w_in.size(0)");
  check_vector(args.b_up, "b_up", inter, "intermediate = w_in.size(0)");
  check_vector(args.b_down, "b_down", out, "out = w_down_t.size(1)");
  TORCH_CHECK(!args.b_up.defined() || args.w_up.defined(), kMlp, ": b_up given without w_up");
  if (args.w_up.defined()) {
    check_dim(kMlp, args.w_up, "w_up", 2);
    TORCH_CHECK(args.w_up.sizes() == w_in.sizes(), kMlp, ": w_up must have w_in's shape ", w_in.sizes(), ", got ",
                args.w_up.sizes());
    check_like(kMlp, args.w_up, "w_up", x, "x");
    args.w_up = args.w_up.contiguous();
  }

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out;
  at::Tensor y;
  if (args.x.size(0) > 0) y = k(args);
  if (!y.defined()) y = sparse_mlp_dense(args);
  return y.view(out_shape);
}

}  // namespace pefttorch
