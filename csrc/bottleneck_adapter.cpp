// Device-independent bodies of the bottleneck adapter ops: every argument check, the GEMMs (ATen: cuBLAS / CPU
// BLAS, float32 accumulation for bfloat16 and float16), and the two one-pass steps each backend supplies
// (BottleneckAdapterKernels: csrc/cpu/bottleneck_adapter.cpp, csrc/cuda/bottleneck_adapter.cu).
//
//   y = scale * (act(x W_down^T + b_down) W_up^T + b_up) [+ x if add_input] [+ residual]
//
// Forward:  h = x W_down^T + b_down      one GEMM, the bias in its epilogue (rounded once, as F.linear rounds it)
//           a = act(h)                   one pass over h (apply_activation); a is a temporary, h is returned
//           y = x + residual + scale b_up   one pass (residual_sum), the terms present, rounded once
//           y += scale * a W_up^T        one GEMM accumulating onto y (beta = 1, alpha = scale): no separate
//                                        scale, bias or residual add after it
// Backward: g  = scale dy W_up           GEMM, scale as its alpha: dz = scale dy is never materialised
//           dh = g * act'(h)             one pass over (tokens, m) reading h, in place on g (activation_grad)
//           db_down = sum dh,  db_up = scale sum dy      reductions in float32 (float64), rounded once
//           dW_down = dh^T x,  dW_up = scale dy^T act(h) GEMMs (a recomputed from h: never stored)
//           dx = dy + dh W_down (add_input: one buffer, dy copied into it and the GEMM accumulating, beta = 1),
//                or dh W_down
//           d residual = dy itself (the autograd formula returns grad_y; the op, whose outputs may not alias its
//                inputs, returns a copy when asked)
//
// Memory traffic, in passes over activation-sized tensors (tokens x d: x, residual, y, grad_y, dx; one pass = one
// read or one write of one of them). The bottleneck-sized ones (h, a, g/dh: tokens x m) cost m/d of a pass each
// (1/16 .. 1/64 for usual adapters) and are listed apart. Weights are small and stay in cache.
//   Forward                     reads                        writes    total  floor (read x [and residual] once,
//                                                                                      write y once)
//     add_input + residual      x 2 (GEMM, sum), res 1, y 1  y 2       6      3
//     add_input (sequential)    x 2, y 1                     y 2       5      2
//     residual (parallel)       x 1, res 1, y 1              y 2       5      3
//     b_up only                 x 1, y 1                     y 2       4      2
//     none of them              x 1                          y 1       2      2
//     plus h written once and read once (on the CPU, and on CUDA where cuBLASLt's bias epilogue does not apply,
//     ATen first writes the broadcast bias into h and the GEMM reads it back), a written once and read once.
//   Backward, every gradient    reads                        writes    total  floor (read grad_y and x once,
//                                                                                      write dx once)
//     add_input                 dy 4 (g, dW_up, db_up, copy  dx 2      8      3
//                               into dx), x 1, dx 1
//     no add_input              dy 3, x 1                    dx 1      5      3
//     plus g written once and read once, h read twice (dh, a), dh read three times (db_down, dW_down, dx),
//     a written once and read once. Gradients not asked for drop their terms (w_down frozen: no read of x; no
//     gradient for x: no dx, and with add_input no copy of dy).
// A fully fused single-pass kernel (one GPU kernel per direction, weights in shared memory / L2) reaches the
// floor: forward, per token tile, x -> h (written once for backward) -> a -> + x + residual + b_up -> y, saving
// half the bytes of a sequential adapter with a residual (6 -> 3 passes) and the a round trip; backward, per
// token tile, read dy once for g, dh, dx = dy + dh W_down (written once), db partials and the dW_up / dW_down
// partial products (reduced across tiles), saving 5 of 8 passes (about 60%) of a sequential adapter. Whether
// that beats cuBLAS + these passes at realistic sizes is for a session with a GPU to measure.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <vector>

#include "common/checks.h"
#include "ops.h"

namespace pefttorch {
namespace {

constexpr const char* kFwd = "bottleneck_adapter_forward";
constexpr const char* kBwd = "bottleneck_adapter_backward";

at::Tensor value_or_undefined(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

// Checks shared by forward and backward: the weights' shapes, b_down's, and one dtype and device with `ref`
// (x in forward, grad_y in backward). Returns b_down, undefined when not given.
at::Tensor check_params(const char* op, const at::Tensor& ref, const char* ref_name, const at::Tensor& w_down,
                        const std::optional<at::Tensor>& b_down_opt, const at::Tensor& w_up) {
  TORCH_CHECK(ref.dim() >= 1, op, ": ", ref_name, " must have at least one dimension (..., features), got a scalar");
  check_float_dtype(op, ref, ref_name);
  check_dim(op, w_down, "w_down", 2);
  check_dim(op, w_up, "w_up", 2);
  TORCH_CHECK(w_down.size(0) > 0, op, ": the bottleneck width m = w_down.size(0) must be at least 1, got shape ",
              w_down.sizes());
  check_size(op, w_up, "w_up", 1, w_down.size(0), "the bottleneck width m = w_down.size(0)");
  check_like(op, w_down, "w_down", ref, ref_name);
  check_like(op, w_up, "w_up", ref, ref_name);
  const at::Tensor b_down = value_or_undefined(b_down_opt);
  if (b_down.defined()) {
    check_dim(op, b_down, "b_down", 1);
    check_size(op, b_down, "b_down", 0, w_down.size(0), "the bottleneck width m = w_down.size(0)");
    check_like(op, b_down, "b_down", ref, ref_name);
  }
  return b_down;
}

// The input is added to the output only where the two have one width: d_out = w_up.size(0), d_in = w_down.size(1).
void check_add_input(const char* op, bool add_input, const at::Tensor& w_down, const at::Tensor& w_up) {
  TORCH_CHECK(!add_input || w_up.size(0) == w_down.size(1), op, ": add_input (the adapter's input added to its ",
              "output, as with residual=x) needs d_out = w_up.size(0) (", w_up.size(0), ") to equal d_in = ",
              "w_down.size(1) (", w_down.size(1), ")");
}

// A NaN or infinite scale would poison every output; zero is allowed (the adapter switched off).
void check_scale(const char* op, double scale) {
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> bottleneck_adapter_forward(
    const BottleneckAdapterKernels& k, const at::Tensor& x, const at::Tensor& w_down,
    const std::optional<at::Tensor>& b_down_opt, const at::Tensor& w_up, const std::optional<at::Tensor>& b_up_opt,
    const std::optional<at::Tensor>& residual_opt, bool add_input, const std::string& activation, double scale) {
  const at::Tensor b_down = check_params(kFwd, x, "x", w_down, b_down_opt, w_up);
  const int64_t d_in = w_down.size(1), d_out = w_up.size(0);
  check_size(kFwd, x, "x", -1, d_in, "d_in = w_down.size(1)");
  const at::Tensor b_up = value_or_undefined(b_up_opt);
  if (b_up.defined()) {
    check_dim(kFwd, b_up, "b_up", 1);
    check_size(kFwd, b_up, "b_up", 0, d_out, "d_out = w_up.size(0)");
    check_like(kFwd, b_up, "b_up", x, "x");
  }
  const std::vector<int64_t> y_shape = with_last_dim(x.sizes(), d_out);
  const at::Tensor residual = value_or_undefined(residual_opt);
  if (residual.defined()) {
    TORCH_CHECK(residual.sizes() == at::IntArrayRef(y_shape), kFwd,
                ": residual must have the shape of y, x.shape[:-1] + (d_out,) = ", at::IntArrayRef(y_shape), ", got ",
                residual.sizes());
    check_like(kFwd, residual, "residual", x, "x");
  }
  check_add_input(kFwd, add_input, w_down, w_up);
  check_scale(kFwd, scale);
  const Activation act = parse_activation(kFwd, activation);

  const at::Tensor x2 = as_rows(x, d_in);  // a view unless x's strides need a copy; the sum below reads it too
  const int64_t tokens = x2.size(0);
  at::Tensor h = b_down.defined() ? at::addmm(b_down, x2, w_down.t()) : at::mm(x2, w_down.t());
  const at::Tensor a = apply_activation(h, act);
  at::Tensor y;
  if (add_input || residual.defined() || b_up.defined()) {
    y = at::empty({tokens, d_out}, x.options());
    if (y.numel() > 0) {
      k.residual_sum(add_input ? x2 : at::Tensor(), residual.defined() ? as_rows(residual, d_out) : at::Tensor(),
                     b_up.defined() ? b_up.contiguous() : at::Tensor(), scale, y);
    }
    y.addmm_(a, w_up.t(), /*beta=*/1, /*alpha=*/scale);
  } else {
    y = mm_scaled(a, w_up.t(), scale);
  }
  return {at::_unsafe_view(y, y_shape), h};  // not a view: callers may change it in place (see lora_linear.cpp)
}

BottleneckAdapterGrads bottleneck_adapter_backward(const BottleneckAdapterKernels& k, const at::Tensor& grad_y,
                                                   const std::optional<at::Tensor>& x_opt, const at::Tensor& w_down,
                                                   const std::optional<at::Tensor>& b_down_opt, const at::Tensor& w_up,
                                                   const at::Tensor& h, bool add_input, const std::string& activation,
                                                   double scale, std::array<bool, 6> output_mask) {
  const auto [need_x, need_wd, need_bd_mask, need_wu, need_bu, need_res] = output_mask;
  const at::Tensor b_down = check_params(kBwd, grad_y, "grad_y", w_down, b_down_opt, w_up);
  const int64_t d_in = w_down.size(1), d_out = w_up.size(0), m = w_down.size(0);
  check_size(kBwd, grad_y, "grad_y", -1, d_out, "d_out = w_up.size(0)");
  check_add_input(kBwd, add_input, w_down, w_up);
  check_scale(kBwd, scale);
  const Activation act = parse_activation(kBwd, activation);
  const bool need_bd = need_bd_mask && b_down.defined();  // an absent bias has no gradient

  const at::Tensor dy = as_rows(grad_y, d_out);
  const int64_t tokens = dy.size(0);
  check_dim(kBwd, h, "h", 2);
  TORCH_CHECK(h.size(0) == tokens && h.size(1) == m, kBwd, ": h must have shape (tokens, m) = (", tokens, ", ", m,
              ") (forward's second output), got ", h.sizes());
  check_like(kBwd, h, "h", grad_y, "grad_y");
  const at::Tensor x = value_or_undefined(x_opt);
  TORCH_CHECK(x.defined() || !need_wd, kBwd, ": x is needed for the w_down gradient");
  at::Tensor x2;
  if (x.defined()) {
    check_size(kBwd, x, "x", -1, d_in, "d_in = w_down.size(1)");
    check_like(kBwd, x, "x", grad_y, "grad_y");
    x2 = as_rows(x, d_in);
    TORCH_CHECK(x2.size(0) == tokens, kBwd, ": x has ", x2.size(0), " tokens but grad_y has ", tokens);
  }

  const at::ScalarType dtype = grad_y.scalar_type(), acc = at::toOpMathType(dtype);
  const at::Tensor hc = h.contiguous();  // forward's h is; a caller's may not be
  std::optional<at::Tensor> dx, dwd, dbd, dwu, dbu, dres;
  if (need_wu) dwu = mm_scaled(dy.t(), apply_activation(hc, act), scale);  // the a forward used, bit for bit
  if (need_bu) dbu = at::sum(dy, {0}, false, acc).mul_(scale).to(dtype);
  if (need_x || need_wd || need_bd) {
    at::Tensor dh = mm_scaled(dy, w_up, scale);  // (tokens, m), fresh and contiguous: dz W_up, then dh in place
    if (dh.numel() > 0) k.activation_grad(dh, hc, act);
    if (need_bd) dbd = at::sum(dh, {0}, false, acc).to(dtype);
    if (need_wd) dwd = at::mm(dh.t(), x2);
    if (need_x) {
      // add_input: grad_y copied into the result, and the GEMM accumulates onto it (beta = 1): one buffer
      const at::Tensor dx2 = add_input ? at::addmm(dy, dh, w_down) : at::mm(dh, w_down);
      dx = dx2.view(with_last_dim(grad_y.sizes(), d_in));
    }
  }
  // A copy: an op's output may not alias its input. The autograd formula never asks for it (it hands autograd
  // grad_y itself); the mask bit is there for callers of the raw op.
  if (need_res) dres = grad_y.clone(at::MemoryFormat::Contiguous);
  return {dx, dwd, dbd, dwu, dbu, dres};
}

}  // namespace pefttorch
