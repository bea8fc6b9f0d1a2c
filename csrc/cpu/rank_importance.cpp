// CPU kernel of the rank importance op (IncreLoRA), templated on the factors' dtype T and accumulating in
// float64. The work is split by sampled row across all modules: each row's sum lands in its own slot, and the
// slots of a module are then added in row order, so the result does not depend on the number of threads.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common/dispatch.h"
#include "../ops.h"

namespace pefttorch {
namespace {

// sum over jj of |dW[i, j] * G[ii, jj]| for one sampled row ii of module d: the row of B diag(E) first (n values),
// then the sampled row of dW as a combination of A's rows, k outer, so that A is read along its rows.
template <typename T>
double row_score(const RankImportanceModule& d, int64_t ii, std::vector<double>& be, std::vector<double>& dw) {
  const T* a = d.a.const_data_ptr<T>();
  const T* b = d.b.const_data_ptr<T>();
  const T* e = d.e.const_data_ptr<T>();
  const float* g = d.g.const_data_ptr<float>();
  const int64_t i = d.row_offset + ii * d.row_stride;
  const int64_t as0 = d.a.stride(0), as1 = d.a.stride(1), bs0 = d.b.stride(0), bs1 = d.b.stride(1),
                es = d.e.stride(0);
  be.resize(d.rank);
  for (int64_t k = 0; k < d.rank; ++k) {
    be[k] = static_cast<double>(b[i * bs0 + k * bs1]) * static_cast<double>(e[k * es]);
  }
  dw.assign(d.cols, 0.0);
  const int64_t step = d.col_stride * as1;  // from one sampled column of A to the next
  for (int64_t k = 0; k < d.rank; ++k) {
    const double bk = be[k];
    const T* ak = a + k * as0 + d.col_offset * as1;
    for (int64_t jj = 0; jj < d.cols; ++jj) dw[jj] += bk * static_cast<double>(ak[jj * step]);
  }
  const int64_t gs0 = d.g.stride(0), gs1 = d.g.stride(1);
  double sum = 0.0;
  for (int64_t jj = 0; jj < d.cols; ++jj) sum += std::abs(dw[jj] * static_cast<double>(g[ii * gs0 + jj * gs1]));
  return sum;
}

void score_cpu(const std::vector<RankImportanceModule>& modules, const at::Tensor& out) {
  // The rows to do, as (module, sampled row); rank-0 modules and empty samples have none and keep their 0.
  std::vector<int64_t> first_row(modules.size() + 1, 0);
  double work = 0.0;
  for (size_t m = 0; m < modules.size(); ++m) {
    const auto& d = modules[m];
    const int64_t rows = (d.rank == 0 || d.cols == 0) ? 0 : d.rows;
    first_row[m + 1] = first_row[m] + rows;
    work += static_cast<double>(rows) * static_cast<double>(d.cols) * static_cast<double>(d.rank + 1);
  }
  const int64_t total = first_row.back();
  if (total == 0) return;
  std::vector<double> row_sums(total);
  // Small problems run on the calling thread: below ~64k multiply-adds, waking the pool costs more than it saves.
  const int64_t grain = work < 65536.0 ? total : 1;
  dispatch_float(modules.front().a.scalar_type(), [&](auto t) {
    using T = decltype(t);
    at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
      std::vector<double> be, dw;  // per chunk: no sharing between threads
      size_t m = std::upper_bound(first_row.begin(), first_row.end(), begin) - first_row.begin() - 1;
      for (int64_t r = begin; r < end; ++r) {
        while (r >= first_row[m + 1]) ++m;
        row_sums[r] = row_score<T>(modules[m], r - first_row[m], be, dw);
      }
    });
  });
  float* o = out.mutable_data_ptr<float>();
  for (size_t m = 0; m < modules.size(); ++m) {
    double sum = 0.0;
    for (int64_t r = first_row[m]; r < first_row[m + 1]; ++r) sum += row_sums[r];
    o[m] += static_cast<float>(modules[m].weight * sum);
  }
}

const RankImportanceKernels kCpuRankImportance{score_cpu};

}  // namespace
}  // namespace pefttorch

TORCH_LIBRARY_IMPL(pefttorch, CPU, m) { pefttorch::register_rank_importance_ops<pefttorch::kCpuRankImportance>(m); }
