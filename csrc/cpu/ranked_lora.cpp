// CPU kernels of the ranked LoRA factor ops (IncreLoRA, AdaLoRA), templated on the storage dtype S and the compute
// dtype C, split by component (row): a few rows of a few thousand elements each, so one row is one task.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/dispatch.h"
#include "../common/opmath.h"
#include "../ops.h"

namespace pefttorch {
namespace {

// Rows per task: each is a few thousand elements at most, so several rows make a task worth a thread.
int64_t grain(int64_t cols) { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, cols)); }

void forward_cpu(const at::Tensor& a, const at::Tensor& e, const at::Tensor& b_t, const at::Tensor& a_n,
                 const at::Tensor& b_n) {
  dispatch_float(a.scalar_type(), [&](auto s) {
    dispatch_float(a_n.scalar_type(), [&](auto c) {
      using S = decltype(s);
      using C = decltype(c);
      using acc_t = at::opmath_type<S>;
      const int64_t n = a_n.size(0), in = a.size(1), out = b_t.size(1);
      const S* ap = a.const_data_ptr<S>();
      const S* ep = e.const_data_ptr<S>();
      const S* bp = b_t.const_data_ptr<S>();
      C* anp = a_n.mutable_data_ptr<C>();
      C* bnp = b_n.mutable_data_ptr<C>();
      at::parallel_for(0, n, grain(in + out), [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          const acc_t ek = static_cast<acc_t>(ep[k]);
          // rounded to S first: the value a[:n] * e[:n] has in the storage dtype, as the reference forms it
          for (int64_t j = 0; j < in; ++j) {
            anp[k * in + j] = static_cast<C>(static_cast<S>(static_cast<acc_t>(ap[k * in + j]) * ek));
          }
          for (int64_t i = 0; i < out; ++i) bnp[i * n + k] = static_cast<C>(bp[k * out + i]);
        }
      });
    });
  });
}

void backward_cpu(const RankedFactorsBackwardArgs& g) {
  const at::Tensor& grad = g.grad_a_n.defined() ? g.grad_a_n : g.grad_b_n;
  dispatch_float(g.a.scalar_type(), [&](auto s) {
    dispatch_float(grad.scalar_type(), [&](auto c) {
      using S = decltype(s);
      using C = decltype(c);
      using acc_t = pair_opmath_t<S, C>;
      const int64_t cap = g.a.size(0), in = g.a.size(1), n = g.n;
      const int64_t out = g.gb.defined() ? g.gb.size(1) : 0;
      const S* ap = g.a.const_data_ptr<S>();
      const S* ep = g.e.const_data_ptr<S>();
      const C* gap = g.grad_a_n.defined() ? g.grad_a_n.const_data_ptr<C>() : nullptr;
      const C* gbp = g.grad_b_n.defined() ? g.grad_b_n.const_data_ptr<C>() : nullptr;
      S* ga = g.ga.defined() ? g.ga.mutable_data_ptr<S>() : nullptr;
      S* ge = g.ge.defined() ? g.ge.mutable_data_ptr<S>() : nullptr;
      S* gb = g.gb.defined() ? g.gb.mutable_data_ptr<S>() : nullptr;
      at::parallel_for(0, cap, grain(2 * in + out), [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          const bool used = k < n;
          if (ga != nullptr) {
            const acc_t ek = static_cast<acc_t>(ep[k]);
            for (int64_t j = 0; j < in; ++j) {
              ga[k * in + j] = used ? static_cast<S>(static_cast<acc_t>(gap[k * in + j]) * ek) : S(0.f);
            }
          }
          if (ge != nullptr) {
            acc_t sum = 0;
            if (k < g.e_rows) {
              for (int64_t j = 0; j < in; ++j) {
                sum += static_cast<acc_t>(gap[k * in + j]) * static_cast<acc_t>(ap[k * in + j]);
              }
            }
            ge[k] = static_cast<S>(sum);
          }
          if (gb != nullptr) {
            for (int64_t i = 0; i < out; ++i) gb[k * out + i] = used ? static_cast<S>(gbp[i * n + k]) : S(0.f);
          }
        }
      });
    });
  });
}

const RankedFactorsKernels kCpuRankedFactors{forward_cpu, backward_cpu};

}  // namespace
}  // namespace pefttorch

TORCH_LIBRARY_IMPL(pefttorch, CPU, m) { pefttorch::register_ranked_factors_ops<pefttorch::kCpuRankedFactors>(m); }
