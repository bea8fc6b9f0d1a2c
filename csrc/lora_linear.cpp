// Device-independent bodies of the fused LoRA linear ops. Each backend registers these with its own
// LoraDropoutKernels (csrc/cpu/lora_linear.cpp, csrc/cuda/lora_linear.cu).
//
// Forward:  y = x W^T + b           one GEMM with the bias in its epilogue
//           s = dropout(x) A^T      device kernel (mask regenerated, x never copied) or a GEMM if p = 0
//           y += scaling * s B^T    one GEMM accumulating into y (beta = 1): no separate scale/add/cast
// Backward: ds = scaling * dy B,  dB = scaling * dy^T s,  dbias = sum(dy)
//           dx = dy W, then dx += mask * (ds A) / (1 - p) in place (one buffer),
//           dA = ds^T dropout(x) (both from one device call, which may share the mask),  dW = dy^T x
#include "ops.h"

#include "common/checks.h"

namespace pefttorch {
namespace {

constexpr const char* kFwd = "lora_linear_forward";
constexpr const char* kBwd = "lora_linear_backward";

// Checks shared by forward and backward: shapes of the parameters, and one dtype and device with
// `ref` (x in forward, grad_y in backward).
void check_params(const char* op, const at::Tensor& ref, const char* ref_name, const at::Tensor& weight,
                  const at::Tensor& lora_a, const at::Tensor& lora_b) {
  check_float_dtype(op, ref, ref_name);
  check_dim(op, weight, "weight", 2);
  check_dim(op, lora_a, "lora_a", 2);
  check_dim(op, lora_b, "lora_b", 2);
  TORCH_CHECK(lora_a.size(0) > 0, op, ": the LoRA rank r = lora_a.size(0) must be at least 1, got shape ",
              lora_a.sizes());
  check_size(op, lora_a, "lora_a", 1, weight.size(1), "in_features = weight.size(1)");
  check_size(op, lora_b, "lora_b", 0, weight.size(0), "out_features = weight.size(0)");
  check_size(op, lora_b, "lora_b", 1, lora_a.size(0), "the rank r = lora_a.size(0)");
  check_like(op, weight, "weight", ref, ref_name);
  check_like(op, lora_a, "lora_a", ref, ref_name);
  check_like(op, lora_b, "lora_b", ref, ref_name);
}

Dropout make_dropout(const char* op, double p, const std::optional<at::Tensor>& seed) {
  check_dropout(op, p, seed);
  return Dropout::make(p, p > 0.0 ? static_cast<uint64_t>(seed->item<int64_t>()) : 0);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lora_linear_forward(const LoraDropoutKernels& k, const at::Tensor& x,
                                                       const at::Tensor& weight, const at::Tensor& lora_a,
                                                       const at::Tensor& lora_b,
                                                       const std::optional<at::Tensor>& bias, double scaling,
                                                       double dropout_p, const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(x.dim() >= 1, kFwd, ": x must have at least one dimension (..., in_features), got a scalar");
  check_params(kFwd, x, "x", weight, lora_a, lora_b);
  const int64_t in = weight.size(1), out = weight.size(0);
  check_size(kFwd, x, "x", -1, in, "in_features = weight.size(1)");
  if (bias.has_value() && bias->defined()) {
    check_dim(kFwd, *bias, "bias", 1);
    check_size(kFwd, *bias, "bias", 0, out, "out_features = weight.size(0)");
    check_like(kFwd, *bias, "bias", x, "x");
  }
  const Dropout d = make_dropout(kFwd, dropout_p, seed);

  const at::Tensor x2 = as_rows(x, in);
  const at::Tensor w_t = weight.t();
  at::Tensor y = (bias.has_value() && bias->defined()) ? at::addmm(*bias, x2, w_t) : at::mm(x2, w_t);
  at::Tensor s;
  if (d.active && x2.numel() > 0) {
    s = at::empty({x2.size(0), lora_a.size(0)}, x.options());
    k.down(x2, lora_a.contiguous(), d, s);
  } else {  // also empty inputs, where there is nothing to drop (and no grid to launch)
    s = at::mm(x2, lora_a.t());
  }
  y.addmm_(s, lora_b.t(), /*beta=*/1, /*alpha=*/scaling);
  // Not y.view(): autograd forbids in-place changes to an output of a multi-output Function that is a view, and
  // models do change a linear layer's output in place (Falcon: mlp_output += attention_output).
  return {at::_unsafe_view(y, with_last_dim(x.sizes(), out)), s};
}

LoraGrads lora_linear_backward(const LoraDropoutKernels& k, const at::Tensor& grad_y,
                               const std::optional<at::Tensor>& x, const at::Tensor& weight,
                               const at::Tensor& lora_a, const at::Tensor& lora_b,
                               const std::optional<at::Tensor>& s, double scaling, double dropout_p,
                               const std::optional<at::Tensor>& seed, std::array<bool, 5> output_mask) {
  const auto [need_x, need_w, need_a, need_b, need_bias] = output_mask;
  TORCH_CHECK(grad_y.dim() >= 1, kBwd, ": grad_y must have at least one dimension");
  check_params(kBwd, grad_y, "grad_y", weight, lora_a, lora_b);
  const int64_t in = weight.size(1), out = weight.size(0), r = lora_a.size(0);
  check_size(kBwd, grad_y, "grad_y", -1, out, "out_features = weight.size(0)");
  const Dropout d = make_dropout(kBwd, dropout_p, seed);

  const at::Tensor dy = as_rows(grad_y, out);
  const int64_t tokens = dy.size(0);
  at::Tensor x2;
  if (need_w || need_a) {
    TORCH_CHECK(x.has_value() && x->defined(), kBwd, ": x is needed for the weight or lora_a gradient");
    check_size(kBwd, *x, "x", -1, in, "in_features = weight.size(1)");
    check_like(kBwd, *x, "x", grad_y, "grad_y");
    x2 = as_rows(*x, in);
    TORCH_CHECK(x2.size(0) == tokens, kBwd, ": x has ", x2.size(0), " tokens but grad_y has ", tokens);
  }

  std::optional<at::Tensor> dx, dw, da, db, dbias;
  if (need_b) {
    TORCH_CHECK(s.has_value() && s->defined(), kBwd, ": s is needed for the lora_b gradient");
    check_dim(kBwd, *s, "s", 2);
    TORCH_CHECK(s->size(0) == tokens && s->size(1) == r, kBwd, ": s must have shape (", tokens, ", ", r,
                "), got ", s->sizes());
    check_like(kBwd, *s, "s", grad_y, "grad_y");
    db = mm_scaled(dy.t(), *s, scaling);
  }
  if (need_x || need_a) {
    const at::Tensor ds = mm_scaled(dy, lora_b, scaling);  // (tokens, r), contiguous
    at::Tensor dx2, da_;
    if (need_x) dx2 = at::mm(dy, weight);  // fresh and contiguous: the low-rank term accumulates into it
    if (!d.active || tokens == 0 || in == 0) {  // nothing to drop, and no grid to launch
      if (need_x) dx2.addmm_(ds, lora_a);
      if (need_a) da_ = at::mm(ds.t(), x2);
    } else {
      k.backward(ds, x2, lora_a.contiguous(), d, need_x ? &dx2 : nullptr, need_a ? &da_ : nullptr);
    }
    if (need_x) dx = dx2.view(with_last_dim(grad_y.sizes(), in));
    if (need_a) da = da_;
  }
  if (need_w) dw = at::mm(dy.t(), x2);
  if (need_bias) dbias = dy.sum(0);
  return {dx, dw, da, db, dbias};
}

}  // namespace pefttorch
