// The bottleneck adapter's CUDA kernels (csrc/cuda/bottleneck_adapter_kernels.cuh) compiled as plain C++ and run on
// the CPU under cuda_emulation.h, against ATen: the residual sum with every combination of its terms, padded row
// strides, both index types, grids smaller than the data (the grid-stride loop) and no write past the output; the
// activation gradient for every activation and dtype against PyTorch's own backward kernels (threshold_backward,
// gelu_backward, silu_backward), relu's kink at exactly 0 included.
#include "check.h"
#include "cuda_emulation.h"
// clang-format off: the emulation must come first
#include "../cuda/bottleneck_adapter_kernels.cuh"
// clang-format on

#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <string>

using namespace pefttorch;
using namespace pefttorch::cuda;

namespace {

using pt_test::fail;
constexpr int64_t kPad = 5;        // elements past the output, which must stay NaN
constexpr unsigned kThreads = 64;  // fewer than kAdapterThreads: the emulation runs a thread per thread

double unit(at::ScalarType t) {
  return t == at::kDouble ? 0x1p-53 : t == at::kFloat ? 0x1p-24 : t == at::kBFloat16 ? 0x1p-8 : 0x1p-11;
}

// The spacing of t's subnormals: the absolute rounding error of results near zero (float16's is not negligible).
double subnormal(at::ScalarType t) { return t == at::kHalf ? 0x1p-24 : 1e-30; }

// got[:n] within `bound` (elementwise, float64) of want, and got[n:] still NaN.
void expect_close(const std::string& what, const at::Tensor& got, const at::Tensor& want, const at::Tensor& bound,
                  int64_t n) {
  const at::Tensor g = got.narrow(0, 0, n).to(at::kDouble), w = want.reshape({-1}).to(at::kDouble);
  const at::Tensor err = (g - w).abs();
  if (g.isnan().any().item<bool>() || !(err <= bound.reshape({-1})).all().item<bool>()) {
    const int64_t i = (err - bound.reshape({-1})).argmax().item<int64_t>();
    fail(what + ": element " + std::to_string(i) + " is " + std::to_string(g[i].item<double>()) + ", want " +
         std::to_string(w[i].item<double>()) + " within " + std::to_string(bound.reshape({-1})[i].item<double>()));
  }
  if (!got.narrow(0, n, kPad).isnan().all().item<bool>()) fail(what + ": wrote past the output");
}

at::Tensor poisoned(int64_t n, at::ScalarType dtype) { return at::full({n + kPad}, std::nan(""), dtype); }

// A (rows, cols) tensor of random values with row stride ld >= cols (the padding is random too).
at::Tensor rows_with_stride(int64_t rows, int64_t cols, int64_t ld, at::ScalarType dtype) {
  return at::randn({rows, ld}).to(dtype).narrow(1, 0, cols);
}

template <typename T, typename index_t>
void check_residual_sum(int64_t rows, int64_t cols, int64_t pad, bool has_x, bool has_r, bool has_b,
                        unsigned blocks) {
  using acc_t = at::opmath_type<T>;
  const auto t = c10::CppTypeToScalarType<T>::value, acc = c10::CppTypeToScalarType<acc_t>::value;
  const std::string name = std::string("residual_sum ") + c10::toString(t) + " index" +
                           std::to_string(8 * sizeof(index_t)) + " " + std::to_string(rows) + "x" +
                           std::to_string(cols) + " pad=" + std::to_string(pad) + " x=" + std::to_string(has_x) +
                           " r=" + std::to_string(has_r) + " b=" + std::to_string(has_b) +
                           " blocks=" + std::to_string(blocks);
  const double scale = -0.37;
  const at::Tensor x = rows_with_stride(rows, cols, cols + pad, t);
  const at::Tensor r = rows_with_stride(rows, cols, cols + 2 * pad, t);  // a row stride of its own
  const at::Tensor b = at::randn({cols}).to(t);
  at::Tensor y = poisoned(rows * cols, t);
  pt_emu::launch(dim3(blocks), kThreads, adapter_residual_sum_kernel<T, index_t>,
                 has_x ? x.const_data_ptr<T>() : nullptr, static_cast<index_t>(x.stride(0)),
                 has_r ? r.const_data_ptr<T>() : nullptr, static_cast<index_t>(r.stride(0)),
                 has_b ? b.const_data_ptr<T>() : nullptr, static_cast<acc_t>(scale), y.mutable_data_ptr<T>(),
                 static_cast<index_t>(rows), static_cast<index_t>(cols));
  // the same sum in acc_t, in the kernel's order; one rounding to T, plus one of acc_t per addition
  at::Tensor want = at::zeros({rows, cols}, acc), mag = at::zeros({rows, cols}, at::kDouble);
  const at::Tensor s = at::scalar_tensor(scale, acc);
  const auto add = [&](const at::Tensor& term) {
    want = want + term;
    mag = mag + term.to(at::kDouble).abs();
  };
  if (has_b) add((s * b.to(acc)).expand({rows, cols}));
  if (has_x) add(x.to(acc));
  if (has_r) add(r.to(acc));
  const at::Tensor bound = want.to(at::kDouble).abs() * unit(t) + 3 * unit(acc) * mag + subnormal(t);
  expect_close(name, y, want, bound, rows * cols);
}

template <typename T, Activation A>
void check_activation_grad(int64_t n, unsigned blocks) {
  using acc_t = at::opmath_type<T>;
  const auto t = c10::CppTypeToScalarType<T>::value, acc = c10::CppTypeToScalarType<acc_t>::value;
  const std::string name = std::string("activation_grad ") + c10::toString(t) + " act=" +
                           std::to_string(static_cast<int>(A)) + " n=" + std::to_string(n) +
                           " blocks=" + std::to_string(blocks);
  // h over the activations' interesting range (the kinks and tails), a few exact zeros
  at::Tensor h = (at::randn({n}) * 3).to(t);
  h.narrow(0, 0, std::min<int64_t>(n, 3)).zero_();
  const at::Tensor g_in = at::randn({n}).to(t);
  at::Tensor g = poisoned(n, t);
  g.narrow(0, 0, n).copy_(g_in);
  pt_emu::launch(dim3(blocks), kThreads, adapter_activation_grad_kernel<T, A>, g.mutable_data_ptr<T>(),
                 h.const_data_ptr<T>(), n);
  const at::Tensor ga = g_in.to(acc), ha = h.to(acc);
  at::Tensor want;
  switch (A) {
    case Activation::kReLU: want = at::threshold_backward(ga, ha, 0); break;
    case Activation::kGELU: want = at::gelu_backward(ga, ha, "none"); break;
    case Activation::kGELUTanh: want = at::gelu_backward(ga, ha, "tanh"); break;
    case Activation::kSiLU: want = at::silu_backward(ga, ha); break;
  }
  // one rounding to T (of a value within the acc_t error below of want: 1.01 covers that), and a few units of acc_t
  // of |g| (1 + |h|) for the derivative's own rounding (its terms cancel near its zeros, so the bound is on their
  // scale, not on the result's)
  const at::Tensor bound = 1.01 * want.to(at::kDouble).abs() * unit(t) +
                           16 * unit(acc) * ga.to(at::kDouble).abs() * (1 + ha.to(at::kDouble).abs()) +
                           subnormal(t);
  expect_close(name, g, want, bound, n);  // want unrounded: the kernel's one rounding to T is in the bound
  if (A == Activation::kReLU && !(g.narrow(0, 0, std::min<int64_t>(n, 3)) == 0).all().item<bool>()) {
    fail(name + ": relu' at 0 must be 0");
  }
}

template <typename T>
void check_dtype() {
  // (rows, cols): one element, a column, odd sizes, more elements than 3 blocks of 64 threads
  const int64_t shapes[][2] = {{1, 1}, {3, 1}, {1, 17}, {17, 13}, {7, 300}};
  for (const auto& s : shapes) {
    for (const unsigned blocks : {1u, 3u}) {
      for (int terms = 0; terms < 8; ++terms) {  // every subset of (x, residual, b_up), none included
        const bool has_x = terms & 1, has_r = terms & 2, has_b = terms & 4;
        check_residual_sum<T, uint32_t>(s[0], s[1], 3, has_x, has_r, has_b, blocks);
      }
      check_residual_sum<T, uint64_t>(s[0], s[1], 3, true, true, true, blocks);
      check_residual_sum<T, uint64_t>(s[0], s[1], 0, true, false, true, blocks);
    }
  }
  for (const int64_t n : {int64_t{1}, int64_t{5}, int64_t{1001}}) {
    for (const unsigned blocks : {1u, 3u}) {
      check_activation_grad<T, Activation::kReLU>(n, blocks);
      check_activation_grad<T, Activation::kGELU>(n, blocks);
      check_activation_grad<T, Activation::kGELUTanh>(n, blocks);
      check_activation_grad<T, Activation::kSiLU>(n, blocks);
    }
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  check_dtype<float>();
  check_dtype<double>();
  check_dtype<c10::BFloat16>();
  check_dtype<c10::Half>();
  return pt_test::finish("test_bottleneck_adapter_kernels_emulated");
}
