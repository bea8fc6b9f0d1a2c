// CPU kernels of the fused LoRA linear: the dropout-masked steps of the low-rank path.
//
// Rows of x are processed in blocks of kRows: a block of dropout(x) is formed in the accumulation type
// (float, or double for double) and handed to one GEMM, so the mask is never stored for the whole
// tensor and bf16/fp16 products accumulate in fp32.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../ops.h"

namespace pefttorch {
namespace {

constexpr int64_t kRows = 128;

// dropout(x[row0 : row0 + n]) as a new (n, in) tensor of x's accumulation type.
at::Tensor dropped_rows(const at::Tensor& x, int64_t row0, int64_t n, const Dropout& d) {
  const int64_t in = x.size(1), ldx = x.stride(0);
  at::Tensor out = at::empty({n, in}, x.options().dtype(at::toOpMathType(x.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropped_rows", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    acc_t* op = out.mutable_data_ptr<acc_t>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* xr = xp + (row0 + i) * ldx;
        acc_t* orow = op + i * in;
        const uint64_t base = static_cast<uint64_t>(row0 + i) * static_cast<uint64_t>(in);
        for (int64_t k = 0; k < in; k += 4) {
          acc_t f[4];
          d.factors4(base + k, f);
          for (int64_t j = 0; j < 4 && k + j < in; ++j) {
            orow[k + j] = static_cast<acc_t>(xr[k + j]) * f[j];
          }
        }
      }
    });
  });
  return out;
}

void down_cpu(const at::Tensor& x, const at::Tensor& lora_a, const Dropout& d, at::Tensor& s) {
  const at::Tensor a_t = lora_a.to(at::toOpMathType(lora_a.scalar_type())).t();
  for (int64_t row0 = 0; row0 < x.size(0); row0 += kRows) {
    const int64_t n = std::min(kRows, x.size(0) - row0);
    s.narrow(0, row0, n).copy_(at::mm(dropped_rows(x, row0, n, d), a_t));
  }
}

void expand_accumulate_cpu(at::Tensor& dx, const at::Tensor& ds, const at::Tensor& lora_a, const Dropout& d) {
  const auto acc = at::toOpMathType(dx.scalar_type());
  const at::Tensor ds_acc = ds.to(acc), a_acc = lora_a.to(acc);
  const int64_t in = dx.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dx.scalar_type(), "expand_accumulate", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    for (int64_t row0 = 0; row0 < dx.size(0); row0 += kRows) {
      const int64_t n = std::min(kRows, dx.size(0) - row0);
      const at::Tensor low = at::mm(ds_acc.narrow(0, row0, n), a_acc);  // (n, in), contiguous
      const acc_t* lp = low.const_data_ptr<acc_t>();
      at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          scalar_t* row = dxp + (row0 + i) * in;
          const acc_t* lrow = lp + i * in;
          const uint64_t base = static_cast<uint64_t>(row0 + i) * static_cast<uint64_t>(in);
          for (int64_t k = 0; k < in; k += 4) {
            acc_t f[4];
            d.factors4(base + k, f);
            for (int64_t j = 0; j < 4 && k + j < in; ++j) {
              row[k + j] = static_cast<scalar_t>(static_cast<acc_t>(row[k + j]) + f[j] * lrow[k + j]);
            }
          }
        }
      });
    }
  });
}

at::Tensor grad_a_cpu(const at::Tensor& ds, const at::Tensor& x, const Dropout& d) {
  const auto acc = at::toOpMathType(x.scalar_type());
  const at::Tensor ds_acc = ds.to(acc);
  at::Tensor da = at::zeros({ds.size(1), x.size(1)}, x.options().dtype(acc));
  for (int64_t row0 = 0; row0 < x.size(0); row0 += kRows) {
    const int64_t n = std::min(kRows, x.size(0) - row0);
    da.addmm_(ds_acc.narrow(0, row0, n).t(), dropped_rows(x, row0, n, d));
  }
  return da.to(x.scalar_type());
}

const LoraDropoutKernels kCpuKernels{down_cpu, expand_accumulate_cpu, grad_a_cpu};

}  // namespace

}  // namespace pefttorch

TORCH_LIBRARY_IMPL(pefttorch, CPU, m) { pefttorch::register_lora_linear<pefttorch::kCpuKernels>(m); }
