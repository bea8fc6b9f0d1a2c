// The ranked LoRA factor CUDA kernels (csrc/cuda/ranked_lora_kernels.cuh) compiled as plain C++ and run on the CPU
// under cuda_emulation.h, against ATen computations of the same formulas. Covered: storage and compute dtypes that
// differ (and float64), one component and more than the block has threads along a row, n = capacity and n < capacity
// (rows past n must come out zero), e_rows < n (reserve rows of e zero), each output asked for alone (the others
// stay null and untouched), and blocks of fewer threads than the launchers use (the strided loops and the
// reduction's halving).
#include "check.h"
#include "cuda_emulation.h"
// clang-format off: the emulation must come first
#include "../cuda/ranked_lora_kernels.cuh"
// clang-format on

#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <string>

using namespace pefttorch::cuda;

namespace {

using pt_test::fail;

double unit(at::ScalarType t) {
  return t == at::kDouble ? 0x1p-53 : t == at::kFloat ? 0x1p-24 : t == at::kBFloat16 ? 0x1p-8 : 0x1p-11;
}

// got equals want exactly (`exact`), or within `ulps` units of got's dtype of |want| plus `abs`.
void expect(const std::string& what, const at::Tensor& got, const at::Tensor& want, bool exact, double ulps = 0,
            double abs = 0) {
  const at::Tensor g = got.to(at::kDouble), w = want.to(at::kDouble);
  if (g.isnan().any().item<bool>()) return fail(what + ": NaN (an element not written)");
  if (exact) {
    if (!at::equal(g, w)) fail(what + ": differs, max " + std::to_string((g - w).abs().max().item<double>()));
    return;
  }
  const at::Tensor bound = w.abs() * ulps * unit(got.scalar_type()) + abs;
  if (!((g - w).abs() <= bound).all().item<bool>()) {
    fail(what + ": max error " + std::to_string((g - w).abs().max().item<double>()));
  }
}

at::Tensor poisoned(at::IntArrayRef sizes, at::ScalarType dtype) { return at::full(sizes, std::nan(""), dtype); }

template <typename S, typename C>
void check(int64_t cap, int64_t in, int64_t out, int64_t n, int64_t e_rows, unsigned threads) {
  using acc_t = pefttorch::pair_opmath_t<S, C>;
  const auto s = c10::CppTypeToScalarType<S>::value, c = c10::CppTypeToScalarType<C>::value;
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const std::string name = std::string(c10::toString(s)) + "/" + c10::toString(c) + " cap=" + std::to_string(cap) +
                           " in=" + std::to_string(in) + " out=" + std::to_string(out) + " n=" + std::to_string(n) +
                           " e_rows=" + std::to_string(e_rows) + " threads=" + std::to_string(threads);
  const at::Tensor a = at::randn({cap, in}).to(s), e = at::randn({cap, 1}).to(s), b_t = at::randn({cap, out}).to(s);

  if (n > 0) {
    at::Tensor a_n = poisoned({n, in}, c), b_n = poisoned({out, n}, c);
    pt_emu::launch(dim3(n), threads, ranked_factors_forward_kernel<S, C>, a.const_data_ptr<S>(), e.const_data_ptr<S>(),
                   b_t.const_data_ptr<S>(), n, in, out, a_n.mutable_data_ptr<C>(), b_n.mutable_data_ptr<C>());
    // the product rounded to S (ATen forms it in float32 too), then cast: exact
    expect("forward a_n " + name, a_n, (a.narrow(0, 0, n) * e.narrow(0, 0, n)).to(c), true);
    expect("forward b_n " + name, b_n, b_t.narrow(0, 0, n).t().to(c), true);
  }

  const at::Tensor grad_a_n = at::randn({n, in}).to(c), grad_b_n = at::randn({out, n}).to(c);
  const at::Tensor zeros_a = at::zeros({cap - n, in}, acc), zeros_b = at::zeros({cap - n, out}, acc);
  const at::Tensor want_ga = at::cat({grad_a_n.to(acc) * e.narrow(0, 0, n).to(acc), zeros_a});
  const at::Tensor want_ge =
      at::cat({(grad_a_n.narrow(0, 0, e_rows).to(at::kDouble) * a.narrow(0, 0, e_rows).to(at::kDouble)).sum(1, true),
               at::zeros({cap - e_rows, 1}, at::kDouble)});
  const at::Tensor want_gb = at::cat({grad_b_n.t().to(acc), zeros_b});
  // the reduction's error: in terms of acc_t, about log2(threads) + in / threads roundings of the sum of |terms|
  const double sum_bound =
      n == 0 ? 0.0
             : (in + 16.0) * unit(acc) *
                   (grad_a_n.to(at::kDouble) * a.narrow(0, 0, n).to(at::kDouble)).abs().sum(1).max().item<double>();
  for (int which = 0; which < 4; ++which) {  // all three outputs, then each alone
    const bool want_a = which == 0 || which == 1, want_e = which == 0 || which == 2, want_b = which == 0 || which == 3;
    at::Tensor ga = poisoned({cap, in}, s), ge = poisoned({cap, 1}, s), gb = poisoned({cap, out}, s);
    pt_emu::launch(dim3(cap), threads, ranked_factors_backward_kernel<S, C>,
                   want_a || want_e ? grad_a_n.const_data_ptr<C>() : nullptr,
                   want_b ? grad_b_n.const_data_ptr<C>() : nullptr, a.const_data_ptr<S>(), e.const_data_ptr<S>(), n,
                   e_rows, in, out, want_a ? ga.mutable_data_ptr<S>() : nullptr,
                   want_e ? ge.mutable_data_ptr<S>() : nullptr, want_b ? gb.mutable_data_ptr<S>() : nullptr);
    const std::string tag = name + " outputs=" + std::to_string(which);
    if (want_a) expect("backward ga " + tag, ga, want_ga.to(s), true);
    if (want_b) expect("backward gb " + tag, gb, want_gb.to(s), true);
    if (want_e) {
      expect("backward ge " + tag, ge, want_ge, false, 1.0, sum_bound);
      if (ge.narrow(0, e_rows, cap - e_rows).to(at::kDouble).abs().sum().item<double>() != 0.0) {
        fail("backward ge " + tag + ": rows past e_rows not zero");
      }
    }
    // outputs not asked for are not written
    if (!want_a && !ga.isnan().all().item<bool>()) fail("backward ga written " + tag);
    if (!want_e && !ge.isnan().all().item<bool>()) fail("backward ge written " + tag);
    if (!want_b && !gb.isnan().all().item<bool>()) fail("backward gb written " + tag);
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  // (cap, in, out, n, e_rows): one of everything; odd sizes below a block; rows longer than two blocks of 32
  // threads with a reserve; n = 0 (every row zero)
  const int64_t shapes[][5] = {{1, 1, 1, 1, 1}, {5, 17, 3, 3, 3}, {7, 130, 67, 6, 4}, {3, 5, 2, 0, 0}};
  for (const auto& sh : shapes) {
    for (const unsigned threads : {32u, 64u}) {
      check<float, c10::BFloat16>(sh[0], sh[1], sh[2], sh[3], sh[4], threads);
      check<float, float>(sh[0], sh[1], sh[2], sh[3], sh[4], threads);
      check<c10::BFloat16, float>(sh[0], sh[1], sh[2], sh[3], sh[4], threads);
      check<double, double>(sh[0], sh[1], sh[2], sh[3], sh[4], threads);
      check<c10::Half, double>(sh[0], sh[1], sh[2], sh[3], sh[4], threads);
    }
  }
  return pt_test::finish("test_ranked_lora_kernels_emulated");
}
