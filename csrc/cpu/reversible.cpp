// CPU kernels of the reversible coupling ops (MEFT): elementwise, one pass, templated on the stream's dtype T
// and on the dtypes of f (F) and vjp (V), which are widened on load.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/dispatch.h"
#include "../ops.h"

namespace pefttorch {
namespace {

void forward_cpu(const at::Tensor& x, const at::Tensor& f, double scale, const at::Tensor& y) {
  dispatch_float(x.scalar_type(), [&](auto t) {
    dispatch_float(f.scalar_type(), [&](auto u) {
      using T = decltype(t);
      using F = decltype(u);
      using acc_t = at::opmath_type<T>;
      const T* xp = x.const_data_ptr<T>();
      const F* fp = f.const_data_ptr<F>();
      T* yp = y.mutable_data_ptr<T>();
      const acc_t s = static_cast<acc_t>(scale);
      at::parallel_for(0, x.numel(), at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          yp[i] = static_cast<T>(s * static_cast<acc_t>(xp[i]) + static_cast<acc_t>(fp[i]));
        }
      });
    });
  });
}

void backward_cpu(const ReversibleBackwardArgs& a) {
  dispatch_float(a.y.scalar_type(), [&](auto t) {
    dispatch_float(a.f.scalar_type(), [&](auto u) {
      dispatch_float(a.vjp.scalar_type(), [&](auto v) {
        using T = decltype(t);
        using F = decltype(u);
        using V = decltype(v);
        using acc_t = at::opmath_type<T>;
        const T* yp = a.y.const_data_ptr<T>();
        const F* fp = a.f.const_data_ptr<F>();
        const T* gyp = a.grad_y.const_data_ptr<T>();
        const T* gop = a.grad_other.const_data_ptr<T>();
        const V* vp = a.vjp.const_data_ptr<V>();
        T* xp = a.x.mutable_data_ptr<T>();
        T* gxp = a.grad_x.mutable_data_ptr<T>();
        T* outp = a.grad_other_out.mutable_data_ptr<T>();
        const acc_t s = static_cast<acc_t>(a.scale);
        at::parallel_for(0, a.y.numel(), at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            // a true division, not a multiplication by 1 / scale: one rounding fewer
            xp[i] = static_cast<T>((static_cast<acc_t>(yp[i]) - static_cast<acc_t>(fp[i])) / s);
            gxp[i] = static_cast<T>(s * static_cast<acc_t>(gyp[i]));
            outp[i] = static_cast<T>(static_cast<acc_t>(gop[i]) + static_cast<acc_t>(vp[i]));
          }
        });
      });
    });
  });
}

const ReversibleKernels kCpuReversible{forward_cpu, backward_cpu};

}  // namespace
}  // namespace pefttorch

TORCH_LIBRARY_IMPL(pefttorch, CPU, m) { pefttorch::register_reversible_ops<pefttorch::kCpuReversible>(m); }
