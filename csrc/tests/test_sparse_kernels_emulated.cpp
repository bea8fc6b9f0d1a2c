// The sparse-activation CUDA kernels (csrc/cuda/sparse_activations_kernels.cuh) compiled as plain C++ and
// run on the CPU under cuda_emulation.h, against ATen computations of the same formulas.
#include "check.h"
#include "cuda_emulation.h"
// clang-format off: the emulation must come first
#include "../cuda/sparse_activations_kernels.cuh"
// clang-format on

#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <string>

using namespace pefttorch::cuda;

namespace {

void expect_close(const std::string& what, const at::Tensor& got, const at::Tensor& want, double tol) {
  const double err = got.numel() ? (got.to(at::kDouble) - want).abs().max().item<double>() : 0.0;
  const double scale = want.numel() ? std::max(1.0, want.abs().max().item<double>()) : 1.0;
  if (!(err <= tol * scale)) {
    std::fprintf(stderr, "FAILED %s: max error %.3g > %.3g\n", what.c_str(), err, tol * scale);
    ++pt_test::failures;
  }
}

template <typename T>
void check_density(at::ScalarType dtype, int64_t n, int64_t blocks, double tol) {
  const std::string name = std::string(c10::toString(dtype)) + " n=" + std::to_string(n);
  at::Tensor a = (at::randn({n}) * 0.01).to(dtype);
  a.index_put_({at::arange(0, n, 7)}, 0);  // exact zeros, as ReLU gives
  const float eps = 1e-5f, thr = 3e-3f;
  at::Tensor sums = at::full({blocks}, std::nan(""), at::kDouble);
  at::Tensor counts = at::full({blocks}, -1, at::kLong);
  pt_emu::launch(dim3(blocks), kReduceThreads, density_forward_kernel<T>, a.const_data_ptr<T>(), n, eps, thr,
                 sums.mutable_data_ptr<double>(), reinterpret_cast<long long*>(counts.mutable_data_ptr<int64_t>()));
  const at::Tensor ad = a.to(at::kDouble), a2 = ad * ad;
  expect_close("density sum " + name, sums.sum().reshape({1}), (a2 / (a2 + eps)).sum().reshape({1}),
               std::min(tol, 1e-6));
  const int64_t want_count = (ad.abs() > thr).sum().item<int64_t>();
  if (counts.sum().item<int64_t>() != want_count) {
    std::fprintf(stderr, "FAILED density count %s\n", name.c_str());
    ++pt_test::failures;
  }
  using acc_t = at::opmath_type<T>;
  at::Tensor grad = at::full({1}, 0.7, c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor ga = at::full({n}, std::nan(""), dtype);
  pt_emu::launch(dim3(blocks), kReduceThreads, density_backward_kernel<T>, grad.const_data_ptr<acc_t>(),
                 a.const_data_ptr<T>(), n, double{eps}, 1.0 / n, ga.mutable_data_ptr<T>());
  const at::Tensor want = 0.7 * 2 * ad * eps / (a2 + eps).pow(2) / n;
  expect_close("density backward " + name, ga, want, tol);
}

double act_ref(double v, Act act) {
  switch (act) {
    case Act::kReLU: return v <= 0 ? 0 : v;
    case Act::kGELU: return 0.5 * v * (1 + std::erf(v / std::sqrt(2.0)));
    case Act::kGELUTanh: return 0.5 * v * (1 + std::tanh(std::sqrt(2.0 / M_PI) * (v + 0.044715 * v * v * v)));
    case Act::kSiLU: return v / (1 + std::exp(-v));
  }
  return v;
}

template <typename T>
void check_mlp(at::ScalarType dtype, int tokens, int64_t hidden, int64_t inter, int64_t out, bool gated, bool bias,
               Act act, float threshold, int64_t pad, double tol) {
  const std::string name = std::string(c10::toString(dtype)) + " T=" + std::to_string(tokens) + " H=" +
                           std::to_string(hidden) + " I=" + std::to_string(inter) + " O=" + std::to_string(out) +
                           (gated ? " gated" : "") + (bias ? " bias" : "") + " act=" +
                           std::to_string(static_cast<int>(act)) + " thr=" + std::to_string(threshold);
  const at::Tensor x = at::randn({tokens, hidden + pad}).to(dtype).narrow(1, 0, hidden);
  const at::Tensor w_in = (at::randn({inter, hidden}) / std::sqrt(double(hidden))).to(dtype);
  const at::Tensor w_up = (at::randn({inter, hidden}) / std::sqrt(double(hidden))).to(dtype);
  const at::Tensor w_down_t = (at::randn({inter, out}) / std::sqrt(double(inter))).to(dtype);
  const at::Tensor b_in = (at::randn({inter}) * 0.1).to(dtype), b_up = (at::randn({inter}) * 0.1).to(dtype);

  at::Tensor h = at::full({tokens, inter}, std::nan(""), at::kFloat);
  at::Tensor active = at::full({inter}, 7, at::kByte);
  PT_SPARSE_TOKENS_SWITCH(tokens, TOK, [&] {
    pt_emu::launch(dim3((inter + kInWarps - 1) / kInWarps), kInWarps * 32, sparse_mlp_in_kernel<T, TOK>,
                   x.const_data_ptr<T>(), x.stride(0), tokens, hidden, w_in.const_data_ptr<T>(),
                   bias ? b_in.const_data_ptr<T>() : nullptr, gated ? w_up.const_data_ptr<T>() : nullptr,
                   gated && bias ? b_up.const_data_ptr<T>() : nullptr, inter, act, threshold,
                   h.mutable_data_ptr<float>(), active.mutable_data_ptr<uint8_t>());
  });
  // dense reference of h, in float64 from the same (rounded) inputs
  const at::Tensor xd = x.to(at::kDouble);
  at::Tensor pre = at::mm(xd, w_in.to(at::kDouble).t());
  if (bias) pre = pre + b_in.to(at::kDouble);
  at::Tensor g = pre.clone();
  auto gp = g.accessor<double, 2>();
  for (int t = 0; t < tokens; ++t)
    for (int64_t i = 0; i < inter; ++i) gp[t][i] = act_ref(gp[t][i], act);
  const at::Tensor mask = g.abs().le(threshold).logical_not();  // NaN counts as active
  at::Tensor want_h = g;
  if (gated) {
    at::Tensor up = at::mm(xd, w_up.to(at::kDouble).t());
    if (bias) up = up + b_up.to(at::kDouble);
    want_h = g * up;
  }
  want_h = at::where(mask, want_h, at::zeros({}, at::kDouble));
  // the same rounded inputs on both sides, sums in float32 against float64: float32 rounding of dot products of
  // up to 64 terms (a constant off by 1e-4, e.g. tanh-GELU for erf-GELU, fails it)
  expect_close("sparse_mlp_in h " + name, h, want_h, 2e-6);
  if (!at::equal(active.to(at::kBool), mask.any(0))) {
    std::fprintf(stderr, "FAILED active flags %s\n", name.c_str());
    ++pt_test::failures;
  }

  // Rows of inactive neurons hold NaN: a kernel that read one (0 * NaN = NaN) would fail, so this also checks
  // that the weight traffic follows the density.
  const at::Tensor w_down_poisoned =
      at::where(mask.any(0).unsqueeze(1), w_down_t, at::full({}, std::nan(""), dtype)).contiguous();
  // w_down_t also as a view at an odd element offset: rows no longer 16-byte aligned, the scalar path
  const at::Tensor shifted = at::empty({inter * out + 1}, dtype).narrow(0, 1, inter * out).view({inter, out});
  shifted.copy_(w_down_poisoned);
  const int64_t block_cols = down_block_cols<T>();
  for (const at::Tensor& w : {w_down_poisoned, shifted}) {
    for (const int64_t sms : {int64_t{1}, int64_t{132}}) {
      // the scalar path: once per fp16/bf16 case is enough (the emulation's threads and barriers are slow)
      if (w.data_ptr() == shifted.data_ptr() && (sms == 1 || dtype == at::kFloat)) continue;
      const int64_t splits = down_splits(inter, out, tokens, block_cols, sms), rows = (inter + splits - 1) / splits;
      at::Tensor part = at::full({splits, tokens, out}, std::nan(""), at::kFloat);
      PT_SPARSE_TOKENS_SWITCH(tokens, TOK, [&] {
        pt_emu::launch(dim3((out + block_cols - 1) / block_cols, splits), kDownThreads,
                       sparse_mlp_down_kernel<T, TOK>, h.const_data_ptr<float>(), active.const_data_ptr<uint8_t>(),
                       tokens, inter, w.const_data_ptr<T>(), out, rows, part.mutable_data_ptr<float>());
      });
      expect_close("sparse_mlp_down " + name + " splits=" + std::to_string(splits), part.sum(0),
                   at::mm(h.to(at::kDouble), w_down_t.to(at::kDouble)), tol);
    }
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  for (const int64_t n : {int64_t{1}, int64_t{1000}, int64_t{70001}}) {
    for (const int64_t blocks : {int64_t{1}, int64_t{3}}) {
      check_density<double>(at::kDouble, n, blocks, 1e-12);
      check_density<float>(at::kFloat, n, blocks, 1e-5);
      check_density<c10::BFloat16>(at::kBFloat16, n, blocks, 1e-2);
      check_density<c10::Half>(at::kHalf, n, blocks, 1e-2);
    }
  }
  // NaN goes through every activation, as through ATen's (a ReLU written v > 0 ? v : 0 once turned it into 0,
  // which the mask then read as an inactive neuron)
  for (const Act act : {Act::kReLU, Act::kGELU, Act::kGELUTanh, Act::kSiLU}) {
    if (!std::isnan(activate(std::nanf(""), act))) {
      std::fprintf(stderr, "FAILED activation %d of NaN is not NaN\n", static_cast<int>(act));
      ++pt_test::failures;
    }
  }
  struct Case {
    int tokens;
    int64_t hidden, inter, out;
  };
  for (const Case c : {Case{1, 33, 70, 45}, Case{3, 64, 257, 130}, Case{16, 20, 9, 200}}) {
    for (const bool gated : {false, true}) {
      for (const Act act : {Act::kReLU, Act::kGELU, Act::kGELUTanh, Act::kSiLU}) {
        for (const float thr : {0.f, 0.3f, 1e9f}) {  // exact, sparse, nothing active
          check_mlp<float>(at::kFloat, c.tokens, c.hidden, c.inter, c.out, gated, act != Act::kSiLU, act, thr,
                           c.tokens % 2, 1e-5);
        }
      }
      check_mlp<c10::BFloat16>(at::kBFloat16, c.tokens, c.hidden, c.inter, c.out, gated, true, Act::kSiLU, 0.1f, 1,
                               1e-4);
      check_mlp<c10::Half>(at::kHalf, c.tokens, c.hidden, c.inter, c.out, gated, false, Act::kGELU, 0.1f, 0, 1e-4);
    }
  }
  // Hidden sizes that are multiples of a 16-byte pack: sparse_mlp_in's vector loads where x's rows are aligned
  // (float, pad 0; fp16 above with hidden 64) and its scalar path where they are not (pad 1); out = 1100: more
  // than one block of columns.
  for (const Case c : {Case{1, 64, 300, 1100}, Case{5, 40, 33, 64}}) {
    for (const bool gated : {false, true}) {
      check_mlp<float>(at::kFloat, c.tokens, c.hidden, c.inter, c.out, gated, true, Act::kReLU, 0.3f, 0, 1e-5);
      check_mlp<c10::BFloat16>(at::kBFloat16, c.tokens, c.hidden, c.inter, c.out, gated, true, Act::kSiLU, 0.1f, 1,
                               1e-4);
    }
  }
  return pt_test::finish("test_sparse_kernels_emulated");
}
