// Device-independent body of the rank importance op (IncreLoRA): every argument check, the sampled shapes, and
// the per-module records the kernels get. Kernels per device: csrc/cpu/rank_importance.cpp,
// csrc/cuda/rank_importance.cu.
#include <ATen/ATen.h>

#include <cmath>
#include <string>
#include <vector>

#include "common/checks.h"
#include "ops.h"

namespace pefttorch {

namespace {

constexpr const char* kOp = "rank_importance";

// "name[m]", for messages that say which module's argument is wrong.
std::string item(const char* name, size_t m) { return std::string(name) + "[" + std::to_string(m) + "]"; }

// len(range(offset, dim, stride)) for 0 <= offset < stride: 0 when the offset is at or past the end of the
// dimension. Written without offset + stride - 1, which could overflow for a huge stride.
int64_t sampled(int64_t dim, int64_t offset, int64_t stride) {
  return offset >= dim ? 0 : 1 + (dim - 1 - offset) / stride;
}

// A sampling grid's stride and offset: stride >= 1 and 0 <= offset < stride, so that the offsets 0 .. stride - 1
// (one per sampling round, say) cover every row or column exactly once. An offset at or past the dimension
// (possible when stride > dim) is allowed: the sample is empty and the score 0, which is what the pure-PyTorch
// reference's slice dW[offset::stride] gives.
void check_grid(const char* which, size_t m, int64_t offset, int64_t stride) {
  const std::string s = item((std::string(which) + "_stride").c_str(), m);
  const std::string o = item((std::string(which) + "_offset").c_str(), m);
  TORCH_CHECK(stride >= 1, kOp, ": ", s, " must be >= 1, got ", stride);
  TORCH_CHECK(offset >= 0 && offset < stride, kOp, ": ", o, " must be in [0, ", s, ") = [0, ", stride, "), got ",
              offset);
}

// The factors of every module share one dtype, so that one kernel instance (one launch on CUDA) serves them all.
void check_factor_dtype(const at::Tensor& t, const std::string& name, const at::Tensor& first) {
  check_float_dtype(kOp, t, name.c_str());
  TORCH_CHECK(t.scalar_type() == first.scalar_type(), kOp, ": ", name, " has dtype ", t.scalar_type(),
              " but lora_a[0] has ", first.scalar_type(),
              "; the factors of all modules (lora_a, lora_b, lora_e) must share one dtype: cast them to one (e.g. ",
              name, ".to(lora_a[0].dtype))");
}

}  // namespace

at::Tensor rank_importance(const RankImportanceKernels& k, at::TensorList lora_a, at::TensorList lora_b,
                           at::TensorList lora_e, at::TensorList grad_tiles, at::IntArrayRef row_offset,
                           at::IntArrayRef row_stride, at::IntArrayRef col_offset, at::IntArrayRef col_stride,
                           at::IntArrayRef rank, at::ArrayRef<double> weight) {
  const size_t n = lora_a.size();
  const auto check_len = [&](const char* name, size_t len) {
    TORCH_CHECK(len == n, kOp, ": every list must have one entry per module: lora_a has ", n, " but ", name,
                " has ", len);
  };
  check_len("lora_b", lora_b.size());
  check_len("lora_e", lora_e.size());
  check_len("grad_tiles", grad_tiles.size());
  check_len("row_offset", row_offset.size());
  check_len("row_stride", row_stride.size());
  check_len("col_offset", col_offset.size());
  check_len("col_stride", col_stride.size());
  check_len("rank", rank.size());
  check_len("weight", weight.size());
  // An empty call has no device to put its (empty) result on: the Python wrapper answers it without the op. (Through
  // the dispatcher, which needs a tensor to pick a kernel, such a call fails before it gets here.)
  TORCH_CHECK(n >= 1, kOp, ": needs at least one module, got empty lists (ops.rank_importance returns an empty ",
              "tensor for no modules)");

  const at::Tensor& first = lora_a[0];
  std::vector<RankImportanceModule> modules;
  modules.reserve(n);
  for (size_t m = 0; m < n; ++m) {
    const at::Tensor &a = lora_a[m], &b = lora_b[m], &e = lora_e[m], &g = grad_tiles[m];
    const std::string an = item("lora_a", m), bn = item("lora_b", m), en = item("lora_e", m),
                      gn = item("grad_tiles", m);
    const auto check_device = [&](const at::Tensor& t, const std::string& name) {
      TORCH_CHECK(t.defined(), kOp, ": ", name, " is an undefined tensor");
      check_same_device(kOp, t, name.c_str(), first, "lora_a[0]");
    };
    check_device(a, an);
    check_device(b, bn);
    check_device(e, en);
    check_device(g, gn);
    check_dim(kOp, a, an.c_str(), 2);
    check_dim(kOp, b, bn.c_str(), 2);
    check_factor_dtype(a, an, first);
    check_factor_dtype(b, bn, first);
    check_factor_dtype(e, en, first);
    const int64_t cap = a.size(0), out = b.size(0), in = a.size(1);
    TORCH_CHECK(b.size(1) == cap, kOp, ": ", bn, ".size(1) must equal cap = ", an, ".size(0) (", cap,
                "), got shape ", b.sizes());
    TORCH_CHECK((e.dim() == 1 || (e.dim() == 2 && e.size(1) == 1)) && e.size(0) == cap, kOp, ": ", en,
                " must have shape (cap,) or (cap, 1) with cap = ", an, ".size(0) = ", cap, ", got ", e.sizes());

    check_grid("row", m, row_offset[m], row_stride[m]);
    check_grid("col", m, col_offset[m], col_stride[m]);
    TORCH_CHECK(rank[m] >= 0 && rank[m] <= cap, kOp, ": ", item("rank", m), " must be in [0, cap] with cap = ", an,
                ".size(0) = ", cap, ", got ", rank[m]);
    TORCH_CHECK(std::isfinite(weight[m]), kOp, ": ", item("weight", m), " must be finite, got ", weight[m]);

    const int64_t rows = sampled(out, row_offset[m], row_stride[m]);
    const int64_t cols = sampled(in, col_offset[m], col_stride[m]);
    TORCH_CHECK(g.scalar_type() == at::kFloat, kOp, ": ", gn, " must be float32, got ", g.scalar_type());
    check_dim(kOp, g, gn.c_str(), 2);
    TORCH_CHECK(g.size(0) == rows && g.size(1) == cols, kOp, ": ", gn, " must have the sampled shape [", rows, ", ",
                cols, "] (len(range(row_offset, out, row_stride)) with out = ", bn, ".size(0) = ", out,
                ", len(range(col_offset, in, col_stride)) with in = ", an, ".size(1) = ", in, "), got ", g.sizes());

    modules.push_back({a, b, e.dim() == 2 ? e.select(1, 0) : e, g, row_offset[m], row_stride[m], col_offset[m],
                       col_stride[m], rows, cols, rank[m], weight[m]});
  }

  // zero-filled on the current stream, before the kernel adds to it; modules with no work are left at 0
  at::Tensor out = at::zeros({static_cast<int64_t>(n)}, first.options().dtype(at::kFloat));
  k.score(modules, out);
  return out;
}

}  // namespace pefttorch
