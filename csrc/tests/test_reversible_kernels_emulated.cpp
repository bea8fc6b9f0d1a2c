// The reversible coupling CUDA kernels (csrc/cuda/reversible_kernels.cuh) compiled as plain C++ and run on the
// CPU under cuda_emulation.h, against ATen computations of the same formulas: the vector path (aligned) and the
// scalar one (pointers one element off), tails of n % kVec, grids smaller than the data (the grid-stride loop),
// and no write past n.
#include "check.h"
#include "cuda_emulation.h"
// clang-format off: the emulation must come first
#include "../cuda/reversible_kernels.cuh"
// clang-format on

#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <string>

using namespace pefttorch::cuda;

namespace {

using pt_test::fail;
constexpr int64_t kPad = 5;  // elements past n in every output, which must stay NaN

// got[:n] within one unit in the last place (of got's dtype) of want, and got[n:] untouched (NaN).
void expect_ulp(const std::string& what, const at::Tensor& got, const at::Tensor& want, int64_t n) {
  const at::Tensor g = got.narrow(0, 0, n).to(at::kDouble), w = want.to(at::kDouble);
  const auto dtype = got.scalar_type();
  const double eps = dtype == at::kDouble     ? 0x1p-52
                     : dtype == at::kFloat    ? 0x1p-23
                     : dtype == at::kBFloat16 ? 0x1p-7
                                              : 0x1p-10;
  const at::Tensor bound = w.abs() * eps + (dtype == at::kHalf ? 0x1p-24 : 1e-30);  // + float16's subnormal spacing
  if (g.isnan().any().item<bool>() || !((g - w).abs() <= bound).all().item<bool>()) {
    fail(what + ": max error " + std::to_string((g - w).abs().max().item<double>()));
  }
  if (!got.narrow(0, n, kPad).isnan().all().item<bool>()) fail(what + ": wrote past n");
}

// A copy of v starting `offset` elements into its storage.
at::Tensor shifted(const at::Tensor& v, int64_t offset) {
  return at::empty({v.numel() + offset}, v.options()).narrow(0, offset, v.numel()).copy_(v);
}

// A tensor of n random values of `dtype`, starting `offset` elements into its storage.
at::Tensor data(int64_t n, at::ScalarType dtype, int64_t offset) {
  return shifted(at::randn({n}).to(dtype), offset);
}

at::Tensor poisoned(int64_t n, at::ScalarType dtype) { return at::full({n + kPad}, std::nan(""), dtype); }

template <typename T, typename F, typename V>
void check(int64_t n, int64_t offset, unsigned blocks) {
  using acc_t = at::opmath_type<T>;
  const auto t = c10::CppTypeToScalarType<T>::value, f_t = c10::CppTypeToScalarType<F>::value,
             v_t = c10::CppTypeToScalarType<V>::value;
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const std::string name = std::string(c10::toString(t)) + "/" + c10::toString(f_t) + "/" + c10::toString(v_t) +
                           " n=" + std::to_string(n) + " offset=" + std::to_string(offset) +
                           " blocks=" + std::to_string(blocks);
  const double scale = -0.37;
  const at::Tensor s = at::scalar_tensor(scale, acc);  // the scale rounded to acc_t, as the kernels take it
  constexpr unsigned threads = 64;                     // fewer than kElementwiseThreads: the emulation is slow

  const at::Tensor x = data(n, t, offset), f = data(n, f_t, offset);
  at::Tensor y = poisoned(n, t);
  const CouplingForward<T, F> fwd{x.const_data_ptr<T>(), f.const_data_ptr<F>(), y.mutable_data_ptr<T>(),
                                  static_cast<acc_t>(scale)};
  const bool vec = fwd.aligned();
  if (vec != (offset == 0)) fail(name + ": aligned() is " + std::to_string(vec));
  pt_emu::launch(dim3(blocks), threads, elementwise_kernel<CouplingForward<T, F>>, fwd, n, vec);
  expect_ulp("forward " + name, y, (s * x.to(acc) + f.to(acc)).to(t), n);

  const at::Tensor yv = shifted(y.narrow(0, 0, n), offset), gy = data(n, t, offset), go = data(n, t, offset),
                   vjp = data(n, v_t, offset);
  at::Tensor xr = poisoned(n, t), gx = poisoned(n, t), gout = poisoned(n, t);
  const CouplingBackward<T, F, V> bwd{yv.const_data_ptr<T>(),  f.const_data_ptr<F>(),
                                      gy.const_data_ptr<T>(),  go.const_data_ptr<T>(),
                                      vjp.const_data_ptr<V>(), xr.mutable_data_ptr<T>(),
                                      gx.mutable_data_ptr<T>(), gout.mutable_data_ptr<T>(),
                                      static_cast<acc_t>(scale)};
  // outputs are aligned (fresh), inputs are not when offset > 0: one misaligned pointer takes the scalar path
  if (bwd.aligned() != (offset == 0)) fail(name + ": backward aligned() is wrong");
  pt_emu::launch(dim3(blocks), threads, elementwise_kernel<CouplingBackward<T, F, V>>, bwd, n, bwd.aligned());
  expect_ulp("backward x " + name, xr, ((yv.to(acc) - f.to(acc)) / s).to(t), n);
  expect_ulp("backward grad_x " + name, gx, (s * gy.to(acc)).to(t), n);
  expect_ulp("backward grad_other " + name, gout, (go.to(acc) + vjp.to(acc)).to(t), n);
}

}  // namespace

int main() {
  at::manual_seed(0);
  // n: one element (the tail only), a tail of 3, whole groups, and more groups than 3 blocks of 64 threads
  for (const int64_t n : {int64_t{1}, int64_t{3}, int64_t{8}, int64_t{1001}}) {
    for (const int64_t offset : {int64_t{0}, int64_t{1}}) {
      for (const unsigned blocks : {1u, 3u}) {
        check<float, c10::BFloat16, c10::BFloat16>(n, offset, blocks);
        check<float, c10::Half, float>(n, offset, blocks);
        check<float, double, c10::Half>(n, offset, blocks);
        check<double, float, c10::BFloat16>(n, offset, blocks);
        check<c10::BFloat16, float, c10::BFloat16>(n, offset, blocks);
        check<c10::Half, c10::Half, double>(n, offset, blocks);
      }
    }
  }
  return pt_test::finish("test_reversible_kernels_emulated");
}
