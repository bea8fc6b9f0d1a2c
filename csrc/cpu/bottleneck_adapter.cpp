// CPU kernels of the bottleneck adapter: the two one-pass steps around the BLAS GEMMs (see
// csrc/bottleneck_adapter.cpp). The residual sum is templated on the dtype T and computes in at::opmath_type<T>
// (float; double for double), rounded once; the activation gradient is ATen's.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../common/activation.h"
#include "../common/dispatch.h"
#include "../ops.h"

namespace pefttorch {
namespace {

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

void residual_sum_cpu(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& b_up, double scale,
                      const at::Tensor& y) {
  const int64_t rows = y.size(0), cols = y.size(1);
  dispatch_float(y.scalar_type(), [&](auto t) {
    using T = decltype(t);
    using acc_t = at::opmath_type<T>;
    // scale * b_up once per column, not once per element (zeros when there is no bias: the sums stay exact)
    std::vector<acc_t> bias(cols, acc_t(0));
    if (const T* b = ptr_or_null<T>(b_up)) {
      const acc_t s = static_cast<acc_t>(scale);
      for (int64_t c = 0; c < cols; ++c) bias[c] = s * static_cast<acc_t>(b[c]);
    }
    const T* xp = ptr_or_null<T>(x);
    const T* rp = ptr_or_null<T>(residual);
    const int64_t ldx = x.defined() ? x.stride(0) : 0, ldr = residual.defined() ? residual.stride(0) : 0;
    T* yp = y.mutable_data_ptr<T>();
    // which terms are present is decided once, not per element, so the inner loop stays branch-free
    const auto run = [&](auto has_x, auto has_r) {
      const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(cols, 1));
      at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          T* yr = yp + r * cols;
          for (int64_t c = 0; c < cols; ++c) {
            acc_t v = bias[c];
            if constexpr (decltype(has_x)::value) v += static_cast<acc_t>(xp[r * ldx + c]);
            if constexpr (decltype(has_r)::value) v += static_cast<acc_t>(rp[r * ldr + c]);
            yr[c] = static_cast<T>(v);
          }
        }
      });
    };
    using yes = std::true_type;
    using no = std::false_type;
    if (xp && rp) {
      run(yes{}, yes{});
    } else if (xp) {
      run(yes{}, no{});
    } else if (rp) {
      run(no{}, yes{});
    } else {
      run(no{}, no{});
    }
  });
}

// g *= act'(h), in place, by ATen's own vectorised activation-backward kernels (the formulas activation.h
// writes out for the CUDA kernel; theirs use SIMD on the CPU, where a scalar loop over tokens x m was measured
// at ~4.5 ns per element: 150 us of a 255 us backward at 512 tokens, m = 64, more than the GEMM beside it).
void activation_grad_cpu(const at::Tensor& g, const at::Tensor& h, Activation act) {
  at::Tensor out = g;  // the same tensor: the out= overloads take a mutable handle
  switch (act) {
    case Activation::kReLU: at::threshold_backward_out(out, g, h, 0); return;
    case Activation::kGELU: at::gelu_backward_out(out, g, h, "none"); return;
    case Activation::kGELUTanh: at::gelu_backward_out(out, g, h, "tanh"); return;
    case Activation::kSiLU: at::silu_backward_out(out, g, h); return;
  }
}

const BottleneckAdapterKernels kCpuBottleneckAdapter{residual_sum_cpu, activation_grad_cpu};

}  // namespace
}  // namespace pefttorch

TORCH_LIBRARY_IMPL(pefttorch, CPU, m) {
  pefttorch::register_bottleneck_adapter_ops<pefttorch::kCpuBottleneckAdapter>(m);
}
