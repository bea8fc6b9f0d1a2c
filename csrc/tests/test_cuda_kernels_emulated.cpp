// The CUDA kernels of csrc/cuda/lora_linear_kernels.cuh, compiled as plain C++ and run on the CPU under
// cuda_emulation.h, against ATen computations of the same formulas. This checks tiling, bounds,
// strides and dropout masks of the device code on machines with no GPU (CI); the tensor-core fragment
// arithmetic itself is only exercised on a GPU (tests/ with a CUDA device).
#include "check.h"
#include "cuda_emulation.h"
// clang-format off: the emulation must come first
#include "../cuda/lora_linear_kernels.cuh"
// clang-format on

#include <ATen/ATen.h>

#include <cstdio>
#include <cstdlib>
#include <string>

using namespace pefttorch;
using namespace pefttorch::cuda;

namespace {

void expect_close(const std::string& what, const at::Tensor& got, const at::Tensor& want, double tol) {
  const double err = (got.to(at::kDouble) - want).abs().max().item<double>();
  const double scale = std::max(1.0, want.abs().max().item<double>());
  if (!(err <= tol * scale)) {
    std::fprintf(stderr, "FAILED %s: max error %.3g > %.3g\n", what.c_str(), err, tol * scale);
    ++pt_test::failures;
  }
}

// dropout factors (0 or 1/(1-p)) of an (M, K) tensor, from the shared mask definition.
at::Tensor factors(int64_t M, int64_t K, const Dropout& d) {
  at::Tensor f = at::empty({M, K}, at::kDouble);
  auto acc = f.accessor<double, 2>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) acc[m][k] = d.active ? d.factor<double>(static_cast<uint64_t>(m * K + k)) : 1.0;
  return f;
}

template <typename T>
void check_case(at::ScalarType dtype, int64_t M, int64_t K, int64_t R, int64_t pad, double p, double tol) {
  const std::string name = std::string(c10::toString(dtype)) + " M=" + std::to_string(M) + " K=" +
                           std::to_string(K) + " R=" + std::to_string(R) + " pad=" + std::to_string(pad) +
                           " p=" + std::to_string(p);
  const Dropout d = Dropout::make(p, 0x1234abcdULL + M * 31 + K);
  // x with row stride K + pad (a view of a wider tensor), values rounded to dtype first
  const at::Tensor x_wide = at::randn({M, K + pad}).to(dtype);
  const at::Tensor x = x_wide.narrow(1, 0, K);
  const at::Tensor a = at::randn({R, K}).mul(0.3).to(dtype);
  const at::Tensor ds = at::randn({M, R}).mul(0.3).to(dtype);
  const at::Tensor fx = factors(M, K, d);
  const at::Tensor xd = x.to(at::kDouble) * fx;

  PT_RANK_TILE_SWITCH(R, TILE, [&] {
    // down: s = dropout(x) a^T, in one split (written to s) and split over K (partials in ws, summed here)
    using acc_t = typename AccType<T>::type;
    const at::Tensor s_want = at::mm(xd, a.to(at::kDouble).t());
    at::Tensor s = at::full({M, R}, std::nan(""), dtype);
    pt_emu::launch(dim3(ceil_div(M, 64), ceil_div(R, TILE)), kThreads, lora_down_dropout_kernel<T, TILE>,
                   x.const_data_ptr<T>(), x.stride(0), a.const_data_ptr<T>(), s.mutable_data_ptr<T>(),
                   static_cast<acc_t*>(nullptr), M, K, R, K, d);
    expect_close("down " + name, s, s_want, tol);
    for (const Split split : {down_split(M, K, R, TILE, 132), Split{ceil_div(K, 32), 32}}) {
      if (split.splits == 1) continue;
      at::Tensor ws = at::full({split.splits, M, R}, std::nan(""), at::CppTypeToScalarType<acc_t>::value);
      pt_emu::launch(dim3(ceil_div(M, 64), ceil_div(R, TILE), split.splits), kThreads,
                     lora_down_dropout_kernel<T, TILE>, x.const_data_ptr<T>(), x.stride(0), a.const_data_ptr<T>(),
                     s.mutable_data_ptr<T>(), ws.mutable_data_ptr<acc_t>(), M, K, R, split.per_split, d);
      expect_close("down " + name + " splits=" + std::to_string(split.splits), ws.sum(0), s_want, tol);
    }

    // expand: dx += mask * (ds a)
    constexpr int RC = rank_tile_for<T>(TILE);
    const at::Tensor dx0 = at::randn({M, K}).to(dtype);
    at::Tensor dx = dx0.clone();
    pt_emu::launch(dim3(ceil_div(M, 64), ceil_div(K, 64)), kThreads, lora_expand_dropout_kernel<T, RC>,
                   dx.mutable_data_ptr<T>(), dx.stride(0), ds.const_data_ptr<T>(), a.const_data_ptr<T>(), M, K, R, d);
    expect_close("expand " + name, dx, dx0.to(at::kDouble) + fx * at::mm(ds.to(at::kDouble), a.to(at::kDouble)), tol);

    // grad_a: sum over splits of ds^T dropout(x), with the launcher's split and with small splits
    constexpr int RN = rank_tile_for<T>(TILE);
    for (const int64_t sms : {int64_t{132}, int64_t{1000}}) {
      Split split = grad_a_split(M, K, R, RN, sms);
      if (sms == 1000) split = {ceil_div(M, 32), 32};  // as many splits as rows allow
      at::Tensor ws = at::full({split.splits, R, K}, std::nan(""), at::CppTypeToScalarType<acc_t>::value);
      pt_emu::launch(dim3(ceil_div(K, 64), ceil_div(R, RN), split.splits), kThreads,
                     lora_grad_a_dropout_kernel<T, RN>, ds.const_data_ptr<T>(), x.const_data_ptr<T>(), x.stride(0),
                     ws.mutable_data_ptr<acc_t>(), M, K, R, split.per_split, d);
      expect_close("grad_a " + name + " splits=" + std::to_string(split.splits), ws.sum(0),
                   at::mm(ds.to(at::kDouble).t(), xd), tol);
    }
  });
}

}  // namespace

int main() {
  at::manual_seed(0);
  // Sizes: 1 and odd token counts, in_features not a multiple of 4 (unaligned mask quads) or of the
  // 64-wide tiles, ranks 1, 16, 17 and above one 64-wide tile, padded row strides; p = 0 runs the same
  // kernels with every factor 1.
  struct Case {
    int64_t M, K, R, pad;
    double p;
  };
  const Case cases[] = {{1, 3, 1, 0, 0.3}, {17, 33, 3, 2, 0.5}, {70, 64, 16, 0, 0.1}, {130, 71, 17, 5, 0.25},
                        {65, 130, 70, 1, 0.2}, {40, 20, 33, 0, 0.0}};
  for (const Case& c : cases) {
    check_case<float>(at::kFloat, c.M, c.K, c.R, c.pad, c.p, 1e-5);
    check_case<double>(at::kDouble, c.M, c.K, c.R, c.pad, c.p, 1e-12);
    // 16-bit: one rounding of each staged operand (and of the output for s and dx)
    check_case<c10::BFloat16>(at::kBFloat16, c.M, c.K, c.R, c.pad, c.p, 3e-2);
    check_case<c10::Half>(at::kHalf, c.M, c.K, c.R, c.pad, c.p, 4e-3);
  }
  return pt_test::finish("test_cuda_kernels_emulated");
}
