// Device-independent bodies of the ranked LoRA factor ops (IncreLoRA, AdaLoRA): argument checks and output
// allocation. Kernels per device: csrc/cpu/ranked_lora.cpp, csrc/cuda/ranked_lora.cu.
#include <ATen/ATen.h>

#include "common/checks.h"
#include "ops.h"

namespace pefttorch {

namespace {

constexpr const char* kForward = "ranked_lora_factors";
constexpr const char* kBackward = "ranked_lora_factors_backward";

// The storage of one adapter: a (cap, in), e (cap, 1), b_t (cap, out), of one float dtype, on one device.
void check_storage(const char* op, const at::Tensor& a, const at::Tensor& e, const at::Tensor& b_t) {
  check_float_dtype(op, a, "lora_a");
  check_dim(op, a, "lora_a", 2);
  check_dim(op, e, "lora_e", 2);
  check_dim(op, b_t, "lora_b_t", 2);
  check_size(op, e, "lora_e", 0, a.size(0), "the capacity = lora_a.size(0)");
  check_size(op, e, "lora_e", 1, 1, "1");
  check_size(op, b_t, "lora_b_t", 0, a.size(0), "the capacity = lora_a.size(0)");
  check_like(op, e, "lora_e", a, "lora_a");
  check_like(op, b_t, "lora_b_t", a, "lora_a");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ranked_lora_factors(const RankedFactorsKernels& k, const at::Tensor& a,
                                                       const at::Tensor& e, const at::Tensor& b_t, int64_t n,
                                                       at::ScalarType dtype) {
  check_storage(kForward, a, e, b_t);
  TORCH_CHECK(n >= 0 && n <= a.size(0), kForward, ": n must be in [0, capacity = ", a.size(0), "], got ", n);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble, kForward,
              ": dtype ", dtype, " is not supported; supported are float32, float16, bfloat16, float64");
  const auto options = a.options().dtype(dtype);
  at::Tensor a_n = at::empty({n, a.size(1)}, options), b_n = at::empty({b_t.size(1), n}, options);
  if (n > 0 && (a.size(1) > 0 || b_t.size(1) > 0)) {
    k.forward(a.contiguous(), e.contiguous(), b_t.contiguous(), a_n, b_n);
  }
  return {a_n, b_n};
}

RankedFactorsGrads ranked_lora_factors_backward(const RankedFactorsKernels& k,
                                                const std::optional<at::Tensor>& grad_a_n,
                                                const std::optional<at::Tensor>& grad_b_n, const at::Tensor& a,
                                                const at::Tensor& e, const at::Tensor& b_t, int64_t e_rows,
                                                std::array<bool, 3> output_mask) {
  check_storage(kBackward, a, e, b_t);
  const auto [need_a, need_e, need_b] = output_mask;
  const bool has_ga = grad_a_n.has_value() && grad_a_n->defined(), has_gb = grad_b_n.has_value() && grad_b_n->defined();
  TORCH_CHECK(has_ga || !(need_a || need_e), kBackward, ": grad_a_n is needed for the lora_a and lora_e gradients");
  TORCH_CHECK(has_gb || !need_b, kBackward, ": grad_b_n is needed for the lora_b_t gradient");
  int64_t n = -1;
  if (has_ga) {
    check_float_dtype(kBackward, *grad_a_n, "grad_a_n");
    check_dim(kBackward, *grad_a_n, "grad_a_n", 2);
    check_size(kBackward, *grad_a_n, "grad_a_n", 1, a.size(1), "in_features = lora_a.size(1)");
    check_same_device(kBackward, *grad_a_n, "grad_a_n", a, "lora_a");
    n = grad_a_n->size(0);
  }
  if (has_gb) {
    check_float_dtype(kBackward, *grad_b_n, "grad_b_n");
    check_dim(kBackward, *grad_b_n, "grad_b_n", 2);
    check_size(kBackward, *grad_b_n, "grad_b_n", 0, b_t.size(1), "out_features = lora_b_t.size(1)");
    check_same_device(kBackward, *grad_b_n, "grad_b_n", a, "lora_a");
    if (has_ga) {
      check_size(kBackward, *grad_b_n, "grad_b_n", 1, n, "n = grad_a_n.size(0)");
      check_same_dtype(kBackward, *grad_b_n, "grad_b_n", *grad_a_n, "grad_a_n");
    }
    n = grad_b_n->size(1);
  }
  RankedFactorsBackwardArgs args;
  if (n < 0) return {std::nullopt, std::nullopt, std::nullopt};  // nothing asked for (checked above)
  TORCH_CHECK(n <= a.size(0), kBackward, ": the gradients cover n = ", n, " components, more than the capacity ",
              a.size(0));
  TORCH_CHECK(e_rows >= 0 && e_rows <= n, kBackward, ": e_rows must be in [0, n = ", n, "], got ", e_rows);
  if (has_ga) args.grad_a_n = grad_a_n->contiguous();
  if (has_gb) args.grad_b_n = grad_b_n->contiguous();
  args.a = a.contiguous();
  args.e = e.contiguous();
  if (need_a) args.ga = at::empty(a.sizes(), a.options());
  if (need_e) args.ge = at::empty(e.sizes(), e.options());
  if (need_b) args.gb = at::empty(b_t.sizes(), b_t.options());
  args.n = n;
  args.e_rows = e_rows;
  if (a.size(0) > 0 && (need_a || need_e || need_b)) k.backward(args);
  const auto out = [](const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; };
  return {out(args.ga), out(args.ge), out(args.gb)};
}

}  // namespace pefttorch
