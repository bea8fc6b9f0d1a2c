// The rotary embedding CUDA kernel (csrc/cuda/rotary_kernels.cuh) compiled as plain C++ and run on the CPU under
// cuda_emulation.h, against ATen computations of the same formula, bit for bit: strided x (transformers' transposed
// q), cos and sin broadcast over heads, both directions, grids smaller than the data (the grid-stride loop), odd
// sizes, and no write past the output.
#include "check.h"
#include "cuda_emulation.h"
// clang-format off: the emulation must come first
#include "../cuda/rotary_kernels.cuh"
// clang-format on

#include <ATen/ATen.h>

#include <cmath>
#include <string>

using namespace pefttorch::cuda;
using pefttorch::RotaryGeometry;

namespace {

using pt_test::fail;
constexpr int64_t kPad = 7;  // elements past the output, which must stay NaN

// out = x * cos + rotate_half(x) * sin (or the transposed rotation), each product and sum rounded in acc.
at::Tensor expected(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool transpose,
                    at::ScalarType acc) {
  const int64_t h = x.size(-1) / 2;
  const at::Tensor xa = x.to(acc), c = cos.to(acc).expand(x.sizes()), s = sin.to(acc).expand(x.sizes());
  const auto lo = [&](const at::Tensor& t) { return t.narrow(-1, 0, h); };
  const auto hi = [&](const at::Tensor& t) { return t.narrow(-1, h, h); };
  const at::Tensor first = transpose ? lo(xa) * lo(c) + hi(xa) * hi(s) : lo(xa) * lo(c) - hi(xa) * lo(s);
  const at::Tensor second = transpose ? hi(xa) * hi(c) - lo(xa) * lo(s) : hi(xa) * hi(c) + lo(xa) * hi(s);
  return at::cat({first, second}, -1).to(x.scalar_type());
}

template <typename T, typename C, bool Transpose>
void check(int64_t batch, int64_t heads, int64_t tokens, int64_t width, unsigned blocks) {
  using acc_t = at::opmath_type<T>;
  const auto t = c10::CppTypeToScalarType<T>::value, c_t = c10::CppTypeToScalarType<C>::value;
  const std::string name = std::string(c10::toString(t)) + "/" + c10::toString(c_t) +
                           (Transpose ? " transposed" : "") + " " + std::to_string(batch) + "x" +
                           std::to_string(heads) + "x" + std::to_string(tokens) + "x" + std::to_string(width) +
                           " blocks=" + std::to_string(blocks);
  // x as transformers makes q: (batch, tokens, heads, width) transposed to (batch, heads, tokens, width)
  const at::Tensor x = at::randn({batch, tokens, heads, width}).to(t).transpose(1, 2);
  const at::Tensor cos = at::randn({batch, 1, tokens, width}).to(c_t);
  const at::Tensor sin = at::randn({batch, 1, tokens, width}).to(c_t);
  const at::Tensor ce = cos.expand(x.sizes()), se = sin.expand(x.sizes());
  RotaryGeometry g{width / 2, 3, {}, {}, {}, {}};
  for (int d = 0; d < 3; ++d) {
    g.sizes[d] = x.size(d);
    g.x_strides[d] = x.stride(d);
    g.cos_strides[d] = ce.stride(d);
    g.sin_strides[d] = se.stride(d);
  }
  const int64_t numel = x.numel();
  at::Tensor out = at::full({numel + kPad}, std::nan(""), t);
  pt_emu::launch(dim3(blocks), 64, rotary_kernel<T, C, Transpose>, x.const_data_ptr<T>(), ce.const_data_ptr<C>(),
                 se.const_data_ptr<C>(), out.mutable_data_ptr<T>(), g, numel / 2);
  const at::Tensor want = expected(x, cos, sin, Transpose, c10::CppTypeToScalarType<acc_t>::value).reshape(-1);
  const at::Tensor got = out.narrow(0, 0, numel);
  if (!at::equal(got, want)) {
    const double worst = (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>();
    fail(name + ": max difference " + std::to_string(worst));
  }
  if (!out.narrow(0, numel, kPad).isnan().all().item<bool>()) fail(name + ": wrote past the output");
}

}  // namespace

int main() {
  at::manual_seed(0);
  for (const unsigned blocks : {1u, 3u}) {
    check<float, float, false>(2, 3, 5, 8, blocks);
    check<float, float, true>(2, 3, 5, 8, blocks);
    check<c10::BFloat16, c10::BFloat16, false>(1, 4, 17, 34, blocks);
    check<c10::BFloat16, c10::BFloat16, true>(1, 4, 17, 34, blocks);
    check<c10::Half, float, false>(3, 1, 1, 2, blocks);
    check<double, double, true>(2, 2, 3, 6, blocks);
  }
  return pt_test::finish("test_rotary_kernels_emulated");
}
