// Device-independent body of the component AdamW op (IncreLoRA/AdaLoRA's RankAwareAdamW): every argument check,
// and the per-tensor records the kernels get. Kernels per device: csrc/cpu/component_adamw.cpp,
// csrc/cuda/component_adamw.cu; the arithmetic they share: csrc/common/adamw.h.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <cmath>
#include <string>
#include <vector>

#include "common/checks.h"
#include "ops.h"

namespace pefttorch {

namespace {

constexpr const char* kOp = "component_adamw_";

// "name[m]", for messages that say which tensor's argument is wrong.
std::string item(const char* name, size_t m) { return std::string(name) + "[" + std::to_string(m) + "]"; }

void check_finite(const char* name, double v) {
  TORCH_CHECK(std::isfinite(v), kOp, ": ", name, " must be finite, got ", v);
}

// 1 - beta^s is the bias correction the step divides by: beta = 1 would divide by zero, and beta outside [0, 1)
// is no moving average (torch.optim.AdamW rejects the same).
void check_beta(const char* name, double beta) {
  TORCH_CHECK(beta >= 0.0 && beta < 1.0, kOp, ": ", name, " must be in [0, 1), got ", beta);
}

// Every tensor of every m shares one dtype, so that one kernel instance (one launch on CUDA) serves them all;
// a model whose ranked parameters come in several dtypes calls the op once per dtype.
void check_state_dtype(const at::Tensor& t, const std::string& name, const at::Tensor& first) {
  check_float_dtype(kOp, t, name.c_str());
  TORCH_CHECK(t.scalar_type() == first.scalar_type(), kOp, ": ", name, " has dtype ", t.scalar_type(),
              " but params[0] has ", first.scalar_type(),
              "; params, grads, exp_avgs and exp_avg_sqs of all tensors must share one dtype: call the op once per ",
              "dtype");
}

// The kernels read g and write p, m and v element by element: memory shared between two of them would be read
// after it was written (a transposed view of m passed as the gradient), or written twice. An overlap too hard to
// rule out (a broadcast gradient viewing the same storage) is refused as well.
void check_apart(const at::Tensor& a, const std::string& an, const at::Tensor& b, const std::string& bn) {
  const auto status = at::get_overlap_status(a, b);
  const bool shared = status == at::MemOverlapStatus::Full || status == at::MemOverlapStatus::Partial ||
                      (status == at::MemOverlapStatus::TooHard && a.storage().is_alias_of(b.storage()));
  TORCH_CHECK(!shared, kOp, ": ", an, " and ", bn, " share memory; params, exp_avgs and exp_avg_sqs are written ",
              "in place and each needs memory of its own, which the gradient must not share either");
}

}  // namespace

void component_adamw_(const ComponentAdamwKernels& k, at::TensorList params, at::TensorList grads,
                      at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList steps, at::IntArrayRef rows,
                      double lr, double beta1, double beta2, double eps, double weight_decay,
                      at::ArrayRef<double> warmup) {
  const size_t n = params.size();
  const auto check_len = [&](const char* name, size_t len) {
    TORCH_CHECK(len == n, kOp, ": every list must have one entry per tensor: params has ", n, " but ", name, " has ",
                len);
  };
  check_len("grads", grads.size());
  check_len("exp_avgs", exp_avgs.size());
  check_len("exp_avg_sqs", exp_avg_sqs.size());
  check_len("steps", steps.size());
  check_len("rows", rows.size());
  check_len("warmup", warmup.size());
  // Through the dispatcher, which needs a tensor to pick a kernel, an empty call fails before it gets here; the
  // Python wrapper answers it without the op (nothing to update).
  TORCH_CHECK(n >= 1, kOp, ": needs at least one tensor, got empty lists (ops.component_adamw_ does nothing for ",
              "no tensors)");
  check_finite("lr", lr);
  check_finite("beta1", beta1);
  check_finite("beta2", beta2);
  check_finite("eps", eps);
  check_finite("weight_decay", weight_decay);
  check_beta("beta1", beta1);
  check_beta("beta2", beta2);

  const at::Tensor& first = params[0];
  TORCH_CHECK(first.defined(), kOp, ": params[0] is an undefined tensor");
  std::vector<ComponentAdamwTensor> tensors;
  tensors.reserve(n);
  for (size_t m = 0; m < n; ++m) {
    const at::Tensor &p = params[m], &g = grads[m], &ea = exp_avgs[m], &eas = exp_avg_sqs[m], &s = steps[m];
    const std::string pn = item("params", m), gn = item("grads", m), mn = item("exp_avgs", m),
                      vn = item("exp_avg_sqs", m), sn = item("steps", m);
    const auto check_device = [&](const at::Tensor& t, const std::string& name) {
      TORCH_CHECK(t.defined(), kOp, ": ", name, " is an undefined tensor (a parameter without a gradient has no ",
                  "step: leave it out)");
      check_same_device(kOp, t, name.c_str(), first, "params[0]");
    };
    check_device(p, pn);
    check_device(g, gn);
    check_device(ea, mn);
    check_device(eas, vn);
    check_device(s, sn);
    check_dim(kOp, p, pn.c_str(), 2);
    check_state_dtype(p, pn, first);
    for (const auto& [t, name] : {std::pair<const at::Tensor&, const std::string&>{g, gn}, {ea, mn}, {eas, vn}}) {
      check_state_dtype(t, name, first);
      TORCH_CHECK(t.sizes() == p.sizes(), kOp, ": ", name, " must have the shape of ", pn, " ", p.sizes(), ", got ",
                  t.sizes());
    }
    // The optimizer allocates parameters and states contiguous (zeros_like with contiguous_format), so the kernels
    // index them as (rows, cols) row-major and need no strides for them; grads (p.grad, contiguous in practice)
    // are read through their strides, so a transposed or sliced gradient works too.
    for (const auto& [t, name] : {std::pair<const at::Tensor&, const std::string&>{p, pn}, {ea, mn}, {eas, vn}}) {
      TORCH_CHECK(t.is_contiguous(), kOp, ": ", name, " must be contiguous (the optimizer allocates parameters ",
                  "and states so), got strides ", t.strides());
    }
    check_apart(p, pn, ea, mn);
    check_apart(p, pn, eas, vn);
    check_apart(ea, mn, eas, vn);
    for (const auto& [t, name] : {std::pair<const at::Tensor&, const std::string&>{p, pn}, {ea, mn}, {eas, vn}}) {
      check_apart(g, gn, t, name);
    }
    TORCH_CHECK(s.scalar_type() == at::kFloat, kOp, ": ", sn, " must be float32, got ", s.scalar_type());
    check_dim(kOp, s, sn.c_str(), 1);
    TORCH_CHECK(rows[m] >= 0 && rows[m] <= p.size(0), kOp, ": ", item("rows", m), " must be in [0, ", pn,
                ".size(0)] = [0, ", p.size(0), "], got ", rows[m]);
    TORCH_CHECK(s.size(0) >= rows[m], kOp, ": ", sn, " must have at least rows[", m, "] = ", rows[m],
                " entries (one step count per updated row), got ", s.size(0));
    TORCH_CHECK(std::isfinite(warmup[m]) && warmup[m] >= 0.0, kOp, ": ", item("warmup", m),
                " must be finite and >= 0 (0: no warmup), got ", warmup[m]);
    tensors.push_back({p, g, ea, eas, s, rows[m], warmup[m]});
  }
  k.step(tensors, ComponentAdamwHyper{lr, beta1, beta2, eps, weight_decay});
}

}  // namespace pefttorch
