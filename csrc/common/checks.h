// Argument checks shared by every op: each failure names the op, the tensor and what was expected.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>

#include <optional>
#include <vector>

namespace pefttorch {

inline void check_dim(const char* op, const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

// t.size(dim) == expected, where `what` says what the expected size is (e.g. "in_features = weight.size(1)").
inline void check_size(const char* op, const at::Tensor& t, const char* name, int64_t dim, int64_t expected,
                       const char* what) {
  TORCH_CHECK(t.size(dim) == expected, op, ": ", name, ".size(", dim, ") must equal ", what, " (", expected,
              "), got shape ", t.sizes());
}

inline void check_same_dtype(const char* op, const at::Tensor& t, const char* name, const at::Tensor& ref,
                             const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
              ref_name, " has ", ref.scalar_type(), "; cast them to one dtype (e.g. ", name, ".to(", ref_name,
              ".dtype))");
}

inline void check_same_device(const char* op, const at::Tensor& t, const char* name, const at::Tensor& ref,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device());
}

// dtype and device of t match those of ref.
inline void check_like(const char* op, const at::Tensor& t, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  check_same_dtype(op, t, name, ref, ref_name);
  check_same_device(op, t, name, ref, ref_name);
}

inline void check_float_dtype(const char* op, const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble, op, ": ",
              name, " has unsupported dtype ", s, "; supported are float32, float16, bfloat16, float64");
}

// Dropout probability and the seed tensor that must come with it when p > 0.
inline void check_dropout(const char* op, double p, const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": dropout_p must be in [0, 1), got ", p);
  if (p > 0.0) {
    TORCH_CHECK(seed.has_value() && seed->defined(), op, ": dropout_p = ", p,
                " needs a seed tensor (int64, one element, on the CPU)");
    TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1 && seed->device().is_cpu(), op,
                ": seed must be an int64 tensor with one element on the CPU, got ", seed->scalar_type(),
                " of shape ", seed->sizes(), " on ", seed->device());
  }
}

// The (tokens, features) view of a (..., features) tensor with unit stride along features: a view when
// the strides allow it (the common case), a copy only when they do not.
inline at::Tensor as_rows(const at::Tensor& t, int64_t features) {
  const int64_t tokens = c10::multiply_integers(t.sizes().begin(), t.sizes().end() - 1);  // not -1: in may be 0
  at::Tensor rows = t.reshape({tokens, features});
  if (rows.size(1) > 1 && rows.stride(1) != 1) rows = rows.contiguous();
  return rows;
}

// The sizes of a (..., features) tensor with the last dimension replaced: the output shape of a (..., in) input.
inline std::vector<int64_t> with_last_dim(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> out(sizes.begin(), sizes.end());
  out.back() = last;
  return out;
}

// out = alpha * a @ b, alpha folded into the GEMM (beta = 0: out's uninitialised contents are ignored).
inline at::Tensor mm_scaled(const at::Tensor& a, const at::Tensor& b, double alpha) {
  if (alpha == 1.0) return at::mm(a, b);
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  return at::addmm_out(out, out, a, b, /*beta=*/0, /*alpha=*/alpha);
}

}  // namespace pefttorch
