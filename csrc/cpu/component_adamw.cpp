// CPU kernel of the component AdamW op (IncreLoRA/AdaLoRA), templated on the tensors' dtype T, the step in
// float32 (float64 for float64) by csrc/common/adamw.h. The work is split by row across all tensors: a row's step
// count is read and its bias corrections formed once, then its elements updated in order. Every element is
// updated by one thread with the same arithmetic, so the result does not depend on the number of threads.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common/adamw.h"
#include "../common/dispatch.h"
#include "../ops.h"

namespace pefttorch {
namespace {

template <typename T>
void step_row(const ComponentAdamwTensor& d, const AdamwScalars<adamw_acc_t<T>>& h, int64_t row) {
  using acc_t = adamw_acc_t<T>;
  const int64_t cols = d.p.size(1);
  const float s = d.steps.const_data_ptr<float>()[row * d.steps.stride(0)];
  const AdamwRow<acc_t> r = adamw_row<acc_t>(h, static_cast<acc_t>(s), static_cast<acc_t>(d.warmup));
  // p, m, v are contiguous (checked by the body): row `row` starts at row * cols
  T* p = d.p.mutable_data_ptr<T>() + row * cols;
  T* m = d.m.mutable_data_ptr<T>() + row * cols;
  T* v = d.v.mutable_data_ptr<T>() + row * cols;
  const T* g = d.g.const_data_ptr<T>() + row * d.g.stride(0);
  const int64_t gs = d.g.stride(1);
  for (int64_t j = 0; j < cols; ++j) adamw_element<T, acc_t>(h, r, p[j], g[j * gs], m[j], v[j]);
}

void step_cpu(const std::vector<ComponentAdamwTensor>& tensors, const ComponentAdamwHyper& hyper) {
  // The rows to do, as (tensor, row); tensors with no rows or no columns have none.
  std::vector<int64_t> first_row(tensors.size() + 1, 0);
  double work = 0.0;
  for (size_t t = 0; t < tensors.size(); ++t) {
    const auto& d = tensors[t];
    const int64_t rows = d.p.size(1) == 0 ? 0 : d.rows;
    first_row[t + 1] = first_row[t] + rows;
    work += static_cast<double>(rows) * static_cast<double>(d.p.size(1));
  }
  const int64_t total = first_row.back();
  if (total == 0) return;
  // Small problems run on the calling thread: below ~32k elements (a few dozen flops each), waking the pool costs
  // more than it saves; above, chunks of about that many elements.
  const int64_t grain =
      work < 32768.0 ? total : std::max<int64_t>(1, static_cast<int64_t>(32768.0 * static_cast<double>(total) / work));
  dispatch_float(tensors.front().p.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using acc_t = adamw_acc_t<T>;
    const AdamwScalars<acc_t> h =
        adamw_scalars<acc_t>(hyper.lr, hyper.beta1, hyper.beta2, hyper.eps, hyper.weight_decay);
    at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
      size_t t = std::upper_bound(first_row.begin(), first_row.end(), begin) - first_row.begin() - 1;
      for (int64_t r = begin; r < end; ++r) {
        while (r >= first_row[t + 1]) ++t;
        step_row<T>(tensors[t], h, r - first_row[t]);
      }
    });
  });
}

const ComponentAdamwKernels kCpuComponentAdamw{step_cpu};

}  // namespace
}  // namespace pefttorch

TORCH_LIBRARY_IMPL(pefttorch, CPU, m) { pefttorch::register_component_adamw_ops<pefttorch::kCpuComponentAdamw>(m); }
