// CPU kernel of the rotary embedding op: rows in parallel, each rotated pair formed in at::opmath_type of x's
// dtype T from cos and sin of their own dtype C, widened on load.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/dispatch.h"
#include "../ops.h"

namespace pefttorch {
namespace {

template <typename T, typename C>
void apply_typed(const RotaryArgs& a) {
  using acc_t = at::opmath_type<T>;
  const T* x = a.x.const_data_ptr<T>();
  const C* cos = a.cos.const_data_ptr<C>();
  const C* sin = a.sin.const_data_ptr<C>();
  T* out = a.out.mutable_data_ptr<T>();
  const int64_t h = a.g.half;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (2 * h));
  at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      int64_t xo, co, so;
      a.g.offsets(r, xo, co, so);
      const T* xr = x + xo;
      const C* cr = cos + co;
      const C* sr = sin + so;
      T* o = out + r * 2 * h;
      for (int64_t i = 0; i < h; ++i) {
        const acc_t x1 = xr[i], x2 = xr[i + h];
        const acc_t c1 = static_cast<acc_t>(cr[i]), c2 = static_cast<acc_t>(cr[i + h]);
        const acc_t s1 = static_cast<acc_t>(sr[i]), s2 = static_cast<acc_t>(sr[i + h]);
        // each product rounded, then the sum: the bits of PyTorch's x * cos + rotate_half(x) * sin in acc_t
        const acc_t p1 = x1 * c1, p2 = x2 * c2;
        const acc_t q1 = a.transpose ? x2 * s2 : x2 * s1, q2 = a.transpose ? x1 * s1 : x1 * s2;
        o[i] = static_cast<T>(a.transpose ? p1 + q1 : p1 - q1);
        o[i + h] = static_cast<T>(a.transpose ? p2 - q2 : p2 + q2);
      }
    }
  });
}

void apply_cpu(const RotaryArgs& a) {
  dispatch_float(a.x.scalar_type(), [&](auto t) {
    dispatch_float(a.cos.scalar_type(), [&](auto c) { apply_typed<decltype(t), decltype(c)>(a); });
  });
}

const RotaryKernels kCpuRotary{apply_cpu};

}  // namespace
}  // namespace pefttorch

TORCH_LIBRARY_IMPL(pefttorch, CPU, m) { pefttorch::register_rotary_ops<pefttorch::kCpuRotary>(m); }
