// CPU kernels of the fused LoRA linear: the dropout-masked steps of the low-rank path.
//
// Rows are processed in blocks of kRows: the block's dropout factors are generated once, applied in the
// accumulation type (float, or double for double) and the block handed to one GEMM, so the mask is
// never stored for the whole tensor and bf16/fp16 products accumulate in fp32.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../ops.h"

namespace pefttorch {
namespace {

constexpr int64_t kRows = 128;

// Dropout factors (0 or 1/(1-p)) of rows row0 .. row0+n of an (rows, in) tensor, as an (n, in)
// tensor of the accumulation type: one Philox call per four elements.
at::Tensor dropout_factors(int64_t row0, int64_t n, int64_t in, const Dropout& d, at::ScalarType acc) {
  at::Tensor f = at::empty({n, in}, at::TensorOptions().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "dropout_factors", [&] {
    scalar_t* fp = f.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const uint64_t base = static_cast<uint64_t>(row0 + i) * static_cast<uint64_t>(in);
        scalar_t* row = fp + i * in;
        int64_t k = 0;
        for (; k + 4 <= in; k += 4) d.factors4(base + k, row + k);
        for (; k < in; ++k) row[k] = d.factor<scalar_t>(base + k);
      }
    });
  });
  return f;
}

void down_cpu(const at::Tensor& x, const at::Tensor& lora_a, const Dropout& d, at::Tensor& s) {
  const auto acc = at::toOpMathType(x.scalar_type());
  const at::Tensor a_t = lora_a.to(acc).t();
  for (int64_t row0 = 0; row0 < x.size(0); row0 += kRows) {
    const int64_t n = std::min(kRows, x.size(0) - row0);
    // out of place (and promoted to acc): x belongs to the caller
    const at::Tensor xd = at::mul(x.narrow(0, row0, n), dropout_factors(row0, n, x.size(1), d, acc));
    s.narrow(0, row0, n).copy_(at::mm(xd, a_t));
  }
}

// One pass of mask generation per row block serves both dx and dA.
void backward_cpu(const at::Tensor& ds, const at::Tensor& x, const at::Tensor& lora_a, const Dropout& d,
                  at::Tensor* dx, at::Tensor* da) {
  const int64_t tokens = ds.size(0), in = lora_a.size(1);
  const auto acc = at::toOpMathType(ds.scalar_type());
  const at::Tensor ds_acc = ds.to(acc), a_acc = lora_a.to(acc);
  at::Tensor da_acc = da ? at::zeros({ds.size(1), in}, ds.options().dtype(acc)) : at::Tensor();
  for (int64_t row0 = 0; row0 < tokens; row0 += kRows) {
    const int64_t n = std::min(kRows, tokens - row0);
    const at::Tensor f = dropout_factors(row0, n, in, d, acc);
    const at::Tensor ds_blk = ds_acc.narrow(0, row0, n);
    // in place on dx (computed in acc, rounded once); out of place on x, which belongs to the caller
    if (dx) dx->narrow(0, row0, n).addcmul_(f, at::mm(ds_blk, a_acc));
    if (da) da_acc.addmm_(ds_blk.t(), at::mul(x.narrow(0, row0, n), f));
  }
  if (da) *da = da_acc.to(ds.scalar_type());
}

const LoraDropoutKernels kCpuKernels{down_cpu, backward_cpu};

}  // namespace

}  // namespace pefttorch

TORCH_LIBRARY_IMPL(pefttorch, CPU, m) { pefttorch::register_lora_linear<pefttorch::kCpuKernels>(m); }
