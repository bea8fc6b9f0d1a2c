// CPU kernels of the sparse-activation ops: the density loss (one pass forward, one pass backward) and
// the sparse MLP, which reads the up and down projection rows of active neurons only.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "../common/checks.h"
#include "../common/density.h"
#include "../ops.h"

namespace pefttorch {
namespace {

std::tuple<at::Tensor, at::Tensor> density_forward_cpu(const at::Tensor& a, double eps, double threshold) {
  double sum = 0.0;
  int64_t count = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "density_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* p = a.const_data_ptr<scalar_t>();
    const acc_t e = static_cast<acc_t>(eps), thr = static_cast<acc_t>(threshold);
    // Terms in acc_t, summed in double (a float32 running sum over a 32k chunk loses ~1e-5 relative), chunks
    // summed in a fixed order: accurate for any size and deterministic for any thread count.
    constexpr int64_t kChunk = 1 << 15;
    const int64_t chunks = (a.numel() + kChunk - 1) / kChunk;
    std::vector<double> sums(chunks);
    std::vector<int64_t> counts(chunks);
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        double s = 0.0;
        int64_t n = 0;
        const int64_t stop = std::min(a.numel(), (c + 1) * kChunk);
        for (int64_t i = c * kChunk; i < stop; ++i) {
          const acc_t v = static_cast<acc_t>(p[i]);
          s += density_term(v, e);
          n += std::abs(v) > thr;
        }
        sums[c] = s;
        counts[c] = n;
      }
    });
    for (int64_t c = 0; c < chunks; ++c) {
      sum += sums[c];
      count += counts[c];
    }
  });
  return {at::scalar_tensor(sum, at::kDouble), at::scalar_tensor(count, at::kLong)};
}

at::Tensor density_backward_cpu(const at::Tensor& grad, const at::Tensor& a, double eps, double scale) {
  at::Tensor ga = at::empty_like(a);
  const double g = grad.item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "density_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* p = a.const_data_ptr<scalar_t>();
    scalar_t* o = ga.mutable_data_ptr<scalar_t>();
    const acc_t e = static_cast<acc_t>(eps), k = static_cast<acc_t>(2.0 * eps * scale * g);
    at::parallel_for(0, a.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t v = static_cast<acc_t>(p[i]), d = v * v + e;
        o[i] = static_cast<scalar_t>((k / d) * (v / d));  // not / (d * d), which underflows for tiny eps
      }
    });
  });
  return ga;
}

const DensityKernels kCpuDensity{density_forward_cpu, density_backward_cpu};

// Above this many tokens nearly every neuron is active for one of them: the dense path serves.
constexpr int64_t kMaxSparseTokens = 16;

// Share of active neurons above which reading only their rows no longer beats the BLAS GEMMs. Measured on
// the development CPU (bench/results/sparse_mlp-cpu.md): the sparse path stops paying at 28-42% density
// for 1-2 tokens and at 47-72% for 4-16 (where the dense GEMM gets relatively slower), so 0.30 and 0.45
// with a margin; the fallback reuses the gate computed here, so it costs what the dense MLP costs.
double dense_above_density(int64_t tokens) { return tokens <= 3 ? 0.30 : 0.45; }

at::Tensor sparse_mlp_cpu(const SparseMlpArgs& a) {
  const int64_t tokens = a.x.size(0), hidden = a.w_in.size(1), inter = a.w_in.size(0), out = a.w_down_t.size(1);
  if (tokens > kMaxSparseTokens) return {};
  // The gate (or the only) projection is needed for every neuron to know which are active.
  const auto acc = at::toOpMathType(a.x.scalar_type());
  const at::Tensor gate = sparse_mlp_gate(a);                // (tokens, inter), x's dtype
  const at::Tensor g = gate.to(acc).contiguous();             // exact widening: the same values
  // masked where |a| <= threshold, so a NaN counts as active and propagates, as in the dense MLP
  const at::Tensor active = g.abs().le(a.threshold).logical_not().any(0);
  const at::Tensor idx = active.nonzero().view({-1});
  const int64_t n_active = idx.size(0);
  if (n_active > dense_above_density(tokens) * inter) return sparse_mlp_dense_from_gate(a, gate);

  at::Tensor y = at::zeros({tokens, out}, a.x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "sparse_mlp", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t* ids = idx.const_data_ptr<int64_t>();
    const acc_t* gp = g.const_data_ptr<acc_t>();
    const acc_t thr = static_cast<acc_t>(a.threshold);
    // h[j][t]: the masked activation of the j-th active neuron for token t (gated: times its up row).
    std::vector<acc_t> h(n_active * tokens);
    const scalar_t* xp = a.x.const_data_ptr<scalar_t>();
    const int64_t ldx = a.x.stride(0);
    const scalar_t* wup = a.w_up.defined() ? a.w_up.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* bup = a.b_up.defined() ? a.b_up.const_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, n_active, 16, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        const int64_t i = ids[j];
        for (int64_t t = 0; t < tokens; ++t) {
          const acc_t gv = gp[t * inter + i];
          acc_t v = !(std::abs(gv) <= thr) ? gv : acc_t(0);
          if (wup != nullptr && v != acc_t(0)) {  // up projection of active rows only
            const scalar_t* row = wup + i * hidden;
            const scalar_t* xr = xp + t * ldx;
            acc_t dot = bup ? static_cast<acc_t>(bup[i]) : acc_t(0);
            for (int64_t k = 0; k < hidden; ++k) dot += static_cast<acc_t>(row[k]) * static_cast<acc_t>(xr[k]);
            v *= dot;
          }
          h[j * tokens + t] = v;
        }
      }
    });
    // Down projection over the active rows of w_down_t; threads own disjoint slices of the output.
    const scalar_t* wd = a.w_down_t.const_data_ptr<scalar_t>();
    acc_t* yp = y.mutable_data_ptr<acc_t>();
    at::parallel_for(0, out, 256, [&](int64_t begin, int64_t end) {
      for (int64_t j = 0; j < n_active; ++j) {
        const scalar_t* row = wd + ids[j] * out;
        for (int64_t t = 0; t < tokens; ++t) {
          const acc_t hv = h[j * tokens + t];
          if (hv == acc_t(0)) continue;
          acc_t* yr = yp + t * out;
          for (int64_t o = begin; o < end; ++o) yr[o] += hv * static_cast<acc_t>(row[o]);
        }
      }
    });
  });
  if (a.b_down.defined()) y.add_(a.b_down);
  return y.to(a.x.scalar_type());
}

}  // namespace
}  // namespace pefttorch

TORCH_LIBRARY_IMPL(pefttorch, CPU, m) {
  pefttorch::register_sparse_activation_ops<pefttorch::kCpuDensity, pefttorch::sparse_mlp_cpu>(m);
}
