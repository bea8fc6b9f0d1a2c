// The rank importance CUDA kernel (csrc/cuda/rank_importance_kernels.cuh) compiled as plain C++ and run on the
// CPU under cuda_emulation.h, with its descriptor table built by the same host code as the launcher's, against a
// plain float64 loop over the definition. Covered: several modules of different shapes in one launch (the
// binary search from block to module), ranks of several k tiles, more sampled rows than a block holds, more
// columns than a block holds, strided samples with offsets, strided and transposed factors and tiles, rank 0
// and empty samples (no blocks, score left at 0), and every factor dtype.
#include "check.h"
#include "cuda_emulation.h"

#include <mutex>

// The emulation has no atomics; one mutex is enough (blocks run one after another, and one thread a block adds).
inline std::mutex atomic_mutex;
inline float atomicAdd(float* address, float value) {
  const std::lock_guard<std::mutex> lock(atomic_mutex);
  const float old = *address;
  *address = old + value;
  return old;
}

// clang-format off: the emulation must come first
#include "../cuda/rank_importance_kernels.cuh"
// clang-format on

#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

using namespace pefttorch;
using namespace pefttorch::cuda;

namespace {

using pt_test::fail;

struct Spec {
  int64_t out, in, cap, rank, row_offset, row_stride, col_offset, col_stride;
  bool strided = false;  // A transposed, B every other column, E (cap, 1) every other element, G transposed
  double weight = 0.75;
};

int64_t sampled(int64_t dim, int64_t offset, int64_t stride) {
  return offset >= dim ? 0 : 1 + (dim - 1 - offset) / stride;
}

// The module of `spec`, fresh random data (never zeros: zeros hide unread elements), in `dtype`.
RankImportanceModule make(const Spec& s, at::ScalarType dtype) {
  const int64_t rows = sampled(s.out, s.row_offset, s.row_stride), cols = sampled(s.in, s.col_offset, s.col_stride);
  at::Tensor a, b, e, g;
  if (s.strided) {
    a = at::randn({s.in, s.cap}).to(dtype).t();
    b = at::randn({s.out, 2 * s.cap}).to(dtype).slice(1, 0, 2 * s.cap, 2);
    e = at::randn({2 * s.cap, 1}).to(dtype).slice(0, 0, 2 * s.cap, 2).select(1, 0);
    g = at::randn({cols, rows}).t();
  } else {
    a = at::randn({s.cap, s.in}).to(dtype);
    b = at::randn({s.out, s.cap}).to(dtype);
    e = at::randn({s.cap}).to(dtype);
    g = at::randn({rows, cols});
  }
  return {a, b, e, g, s.row_offset, s.row_stride, s.col_offset, s.col_stride, rows, cols, s.rank, s.weight};
}

// weight * sum |dW * G| in float64 straight from the definition, and the same over |terms| (the scale of the
// rounding error of forming each dW element in float32).
std::pair<double, double> plain_score(const RankImportanceModule& d) {
  const at::Tensor a = d.a.to(at::kDouble).contiguous(), b = d.b.to(at::kDouble).contiguous(),
                   e = d.e.to(at::kDouble).contiguous(), g = d.g.to(at::kDouble).contiguous();
  const auto A = a.accessor<double, 2>(), B = b.accessor<double, 2>(), G = g.accessor<double, 2>();
  const auto E = e.accessor<double, 1>();
  double sum = 0.0, mag = 0.0;
  for (int64_t ii = 0; ii < d.rows; ++ii) {
    for (int64_t jj = 0; jj < d.cols; ++jj) {
      const int64_t i = d.row_offset + ii * d.row_stride, j = d.col_offset + jj * d.col_stride;
      double dw = 0.0, dw_abs = 0.0;
      for (int64_t k = 0; k < d.rank; ++k) {
        dw += B[i][k] * E[k] * A[k][j];
        dw_abs += std::abs(B[i][k] * E[k] * A[k][j]);
      }
      sum += std::abs(dw * G[ii][jj]);
      mag += dw_abs * std::abs(G[ii][jj]);
    }
  }
  return {d.weight * sum, std::abs(d.weight) * mag};
}

template <typename T>
void check(const std::string& name, const std::vector<Spec>& specs) {
  const auto dtype = c10::CppTypeToScalarType<T>::value;
  const std::string what = name + " " + c10::toString(dtype);
  std::vector<RankImportanceModule> modules;
  for (const Spec& s : specs) modules.push_back(make(s, dtype));
  int64_t blocks = -1;
  const std::vector<ImportanceModule<T>> table = importance_table<T>(modules, &blocks);

  // the table: modules with work only, in order, their runs of blocks back to back
  int64_t next = 0;
  size_t t = 0;
  for (size_t m = 0; m < modules.size(); ++m) {
    const ImportancePlan p = plan_importance(modules[m].rows, modules[m].cols, modules[m].rank);
    const bool work = modules[m].rows > 0 && modules[m].cols > 0 && modules[m].rank > 0;
    if (work != (p.blocks > 0)) fail(what + ": plan of module " + std::to_string(m));
    if (!work) continue;
    if (t >= table.size() || table[t].out_index != static_cast<int64_t>(m) || table[t].first_block != next) {
      fail(what + ": table entry of module " + std::to_string(m));
      return;
    }
    next += p.blocks;
    ++t;
  }
  if (t != table.size() || blocks != next) fail(what + ": " + std::to_string(blocks) + " blocks in the table");

  // out padded with NaN past the modules: nothing may be written there
  at::Tensor out = at::zeros({static_cast<int64_t>(modules.size()) + 1});
  out[-1] = std::nan("");
  if (blocks > 0) {
    pt_emu::launch(dim3(static_cast<unsigned>(blocks)), kImportanceThreads, rank_importance_kernel<T>, table.data(),
                   static_cast<int64_t>(table.size()), out.mutable_data_ptr<float>());
  }
  if (!std::isnan(out[-1].item<float>())) fail(what + ": wrote past the modules");
  for (size_t m = 0; m < modules.size(); ++m) {
    const auto [want, mag] = plain_score(modules[m]);
    const double got = out[m].item<float>();
    // float32 products and sums (relative 1e-5 of the magnitude: ranks up to 130, a few hundred terms a thread),
    // and the result's rounding to float32
    const double bound = 1e-5 * mag + 1e-7 * std::abs(want);
    if (!(std::abs(got - want) <= bound)) {
      fail(what + ": module " + std::to_string(m) + " got " + std::to_string(got) + ", want " + std::to_string(want));
    }
    if (want == 0.0 && got != 0.0) fail(what + ": module " + std::to_string(m) + " must score exactly 0");
  }
}

template <typename T>
void check_all() {
  // out, in, cap, rank, row_offset, row_stride, col_offset, col_stride[, strided, weight]
  check<T>("mixed", {
                        {17, 3, 5, 5, 0, 1, 0, 1},         // exact; 3 columns: groups of 32, 64 rows a block
                        {70, 20, 70, 70, 0, 1, 0, 1},      // 2 row pieces, 2 k tiles (64 + 6)
                        {1, 1, 1, 1, 0, 1, 0, 1},          // one element
                        {9, 1100, 130, 130, 0, 1, 0, 1},   // 2 column pieces (1024 + 76), 3 k tiles, groups of 256
                        {33, 50, 8, 3, 3, 4, 2, 3, true},  // strided sample, offsets, strided/transposed tensors
                        {12, 7, 4, 0, 0, 1, 0, 1},         // rank 0: no blocks
                        {3, 5, 2, 2, 3, 4, 0, 1},          // offset past the rows: empty sample, no blocks
                        {20, 300, 64, 64, 1, 1, 0, 1, false, -2.5},  // rank = one full k tile; negative weight
                        {6, 40, 9, 1, 1, 2, 3, 5, true},   // rank 1 of cap 9
                    });
  // many modules, each a block or none: the search from block to module over a long table
  std::vector<Spec> many;
  for (int m = 0; m < 41; ++m) {
    many.push_back({1 + m % 5, 1 + m % 7, 3, m % 4, 0, 1 + m % 2, 0, 1 + m % 3, m % 3 == 0, 0.5 + m});
  }
  check<T>("many", many);
  check<T>("only rank 0", {{4, 4, 2, 0, 0, 1, 0, 1}});  // no launch at all
}

void check_plans() {
  const ImportancePlan p1 = plan_importance(1, 1, 1), p2 = plan_importance(100, 33, 4),
                       p3 = plan_importance(9, 1100, 2);
  if (p1.col_threads != 32 || p1.rows_per_block != 64 || p1.blocks != 1) fail("plan for 1 x 1");
  if (p2.col_threads != 64 || p2.rows_per_block != 32 || p2.col_chunks != 1 || p2.blocks != 4) {
    fail("plan for 100 x 33");
  }
  if (p3.col_threads != 256 || p3.rows_per_block != 8 || p3.col_chunks != 2 || p3.blocks != 4) fail("plan 9 x 1100");
  if (plan_importance(0, 5, 5).blocks != 0 || plan_importance(5, 0, 5).blocks != 0 ||
      plan_importance(5, 5, 0).blocks != 0) {
    fail("plans without work");
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  check_plans();
  check_all<float>();
  check_all<double>();
  check_all<c10::Half>();
  check_all<c10::BFloat16>();
  return pt_test::finish("test_rank_importance_kernels_emulated");
}
