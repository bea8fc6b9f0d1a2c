// Declarations of every pefttorch op. Schemas live in bindings.cpp; the device-independent bodies in
// csrc/*.cpp; the kernels, and their TORCH_LIBRARY_IMPL registrations, in csrc/cpu and csrc/cuda.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/activation.h"
#include "common/philox.h"

namespace pefttorch {

// ---------------------------------------------------------------------------------------------------
// Fused LoRA linear: y = x W^T + b + scaling * dropout(x) A^T B^T.
//
// The big GEMMs (x W^T, dy W, dy^T x) go to the vendor BLAS through ATen; what each device supplies
// are the steps where the low-rank path meets dropout, so the mask is regenerated, never stored.
// All tensors are 2-D: x and dx are (tokens, in) with unit inner stride, s and ds (tokens, r)
// contiguous, lora_a (r, in) contiguous.
struct LoraDropoutKernels {
  // s = dropout(x) @ lora_a^T
  void (*down)(const at::Tensor& x, const at::Tensor& lora_a, const Dropout& d, at::Tensor& s);
  // The low-rank path's backward through dropout, for whichever of the two is asked for (the other
  // pointer is null); one call, so a backend can regenerate the mask once for both:
  //   *dx += dropout_mask * (ds @ lora_a) / (1 - p)   in place
  //   *da  = ds^T @ dropout(x)                        (r, in), allocated by the kernel
  void (*backward)(const at::Tensor& ds, const at::Tensor& x, const at::Tensor& lora_a, const Dropout& d,
                   at::Tensor* dx, at::Tensor* da);
};

std::tuple<at::Tensor, at::Tensor> lora_linear_forward(const LoraDropoutKernels& k, const at::Tensor& x,
                                                       const at::Tensor& weight, const at::Tensor& lora_a,
                                                       const at::Tensor& lora_b,
                                                       const std::optional<at::Tensor>& bias, double scaling,
                                                       double dropout_p, const std::optional<at::Tensor>& seed);

using LoraGrads = std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>,
                             std::optional<at::Tensor>, std::optional<at::Tensor>>;

LoraGrads lora_linear_backward(const LoraDropoutKernels& k, const at::Tensor& grad_y,
                               const std::optional<at::Tensor>& x, const at::Tensor& weight,
                               const at::Tensor& lora_a, const at::Tensor& lora_b,
                               const std::optional<at::Tensor>& s, double scaling, double dropout_p,
                               const std::optional<at::Tensor>& seed, std::array<bool, 5> output_mask);

// ---------------------------------------------------------------------------------------------------
// Density loss (sparse activations, as in DEFT): loss = mean(a^2 / (a^2 + eps)), density = share of
// |a| > threshold. A backend supplies the two one-pass kernels over a (contiguous).
struct DensityKernels {
  // (sum of a^2 / (a^2 + eps), count of |a| > threshold) as float64 and int64 0-dim tensors on a's device
  std::tuple<at::Tensor, at::Tensor> (*forward)(const at::Tensor& a, double eps, double threshold);
  // grad (0-dim, on a's device, any float dtype) * 2 a eps / (a^2 + eps)^2 * scale, in a's dtype, computed in
  // float32 (float64 for float64 a)
  at::Tensor (*backward)(const at::Tensor& grad, const at::Tensor& a, double eps, double scale);
};

std::tuple<at::Tensor, at::Tensor> density_loss(const DensityKernels& k, const at::Tensor& a, double eps,
                                                double threshold);
at::Tensor density_loss_backward(const DensityKernels& k, const at::Tensor& grad, const at::Tensor& a, double eps);

// ---------------------------------------------------------------------------------------------------
// Sparse MLP for inference.
// The activation named `name` (relu, gelu, gelu_tanh, silu; Activation is in common/activation.h, with the
// derivatives kernels use), or an error that names the op `op`.
Activation parse_activation(const char* op, const std::string& name);
at::Tensor apply_activation(const at::Tensor& pre, Activation act);

struct SparseMlpArgs {
  at::Tensor x;  // (tokens, hidden), unit inner stride
  at::Tensor w_in, b_in, w_up, b_up, w_down_t, b_down;  // optional ones undefined; weights contiguous
  Activation activation;
  double threshold;
};

// A backend's sparse path for `tokens` rows; returns (tokens, out) or an undefined tensor to ask for
// the dense path (e.g. too many tokens for its kernel).
using SparseMlpKernel = at::Tensor (*)(const SparseMlpArgs& args);

at::Tensor sparse_mlp(SparseMlpKernel k, const at::Tensor& x, const at::Tensor& w_in,
                      const std::optional<at::Tensor>& b_in, const std::optional<at::Tensor>& w_up,
                      const std::optional<at::Tensor>& b_up, const at::Tensor& w_down_t,
                      const std::optional<at::Tensor>& b_down, const std::string& activation, double threshold);
// The dense computation with the same mask: the fallback, and the path for many tokens.
at::Tensor sparse_mlp_dense(const SparseMlpArgs& args);
// Its two halves, so a kernel that computed the gate g = act(x W_in^T + b_in) (in x's dtype) and then finds
// too many neurons active can finish densely without computing the gate again.
at::Tensor sparse_mlp_gate(const SparseMlpArgs& args);
at::Tensor sparse_mlp_dense_from_gate(const SparseMlpArgs& args, const at::Tensor& g);

// Registers the density loss and sparse MLP ops for the backend whose TORCH_LIBRARY_IMPL block calls this.
template <const DensityKernels& D, SparseMlpKernel S>
void register_sparse_activation_ops(torch::Library& m) {
  m.impl("density_loss", [](const at::Tensor& a, double eps, double threshold) {
    return density_loss(D, a, eps, threshold);
  });
  m.impl("density_loss_backward", [](const at::Tensor& grad, const at::Tensor& a, double eps) {
    return density_loss_backward(D, grad, a, eps);
  });
  m.impl("sparse_mlp",
         [](const at::Tensor& x, const at::Tensor& w_in, const std::optional<at::Tensor>& b_in,
            const std::optional<at::Tensor>& w_up, const std::optional<at::Tensor>& b_up, const at::Tensor& w_down_t,
            const std::optional<at::Tensor>& b_down, c10::string_view activation, double threshold) {
           return sparse_mlp(S, x, w_in, b_in, w_up, b_up, w_down_t, b_down, std::string(activation), threshold);
         });
}

// Registers the LoRA linear ops for the backend whose TORCH_LIBRARY_IMPL block calls this.
template <const LoraDropoutKernels& K>
void register_lora_linear(torch::Library& m) {
  m.impl("lora_linear_forward",
         [](const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
            const std::optional<at::Tensor>& bias, double scaling, double dropout_p,
            const std::optional<at::Tensor>& seed) {
           return lora_linear_forward(K, x, weight, lora_a, lora_b, bias, scaling, dropout_p, seed);
         });
  m.impl("lora_linear_backward",
         [](const at::Tensor& grad_y, const std::optional<at::Tensor>& x, const at::Tensor& weight,
            const at::Tensor& lora_a, const at::Tensor& lora_b, const std::optional<at::Tensor>& s,
            double scaling, double dropout_p, const std::optional<at::Tensor>& seed,
            std::array<bool, 5> output_mask) {
           return lora_linear_backward(K, grad_y, x, weight, lora_a, lora_b, s, scaling, dropout_p, seed,
                                       output_mask);
         });
}

// ---------------------------------------------------------------------------------------------------
// Reversible coupling (MEFT): one half of a reversible layer, y = scale * x + f, where f is F or G of the
// other stream. The stream (x, y and their gradients) keeps its own dtype, usually float32, while f and the
// vector-Jacobian product vjp come in the model's dtype; each result is formed in float32 (float64 for a
// float64 stream) and rounded once. Backends get contiguous tensors of one shape, numel > 0, and the
// outputs allocated (contiguous, in the stream's dtype).
struct ReversibleBackwardArgs {
  at::Tensor y, f, grad_y, grad_other, vjp;  // inputs
  at::Tensor x, grad_x, grad_other_out;      // outputs
  double scale;
};

struct ReversibleKernels {
  // y = scale * x + f
  void (*forward)(const at::Tensor& x, const at::Tensor& f, double scale, const at::Tensor& y);
  // in one pass: x = (y - f) / scale, grad_x = scale * grad_y, grad_other_out = grad_other + vjp
  void (*backward)(const ReversibleBackwardArgs& a);
};

at::Tensor reversible_coupling(const ReversibleKernels& k, const at::Tensor& x, const at::Tensor& f, double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> reversible_coupling_backward(
    const ReversibleKernels& k, const at::Tensor& y, const at::Tensor& f, const at::Tensor& grad_y,
    const at::Tensor& grad_other, const at::Tensor& vjp, double scale);

// Registers the reversible coupling ops for the backend whose TORCH_LIBRARY_IMPL block calls this.
template <const ReversibleKernels& K>
void register_reversible_ops(torch::Library& m) {
  m.impl("reversible_coupling", [](const at::Tensor& x, const at::Tensor& f, double scale) {
    return reversible_coupling(K, x, f, scale);
  });
  m.impl("reversible_coupling_backward",
         [](const at::Tensor& y, const at::Tensor& f, const at::Tensor& grad_y, const at::Tensor& grad_other,
            const at::Tensor& vjp, double scale) {
           return reversible_coupling_backward(K, y, f, grad_y, grad_other, vjp, scale);
         });
}

// ---------------------------------------------------------------------------------------------------
// Rank importance (IncreLoRA): for each adapted module m, weight[m] * sum |dW[i, j] * G[ii, jj]| over a sampled
// grid, with dW = B[:, :n] diag(E[:n]) A[:n] (n = rank[m]) formed element by element from the factors, never
// materialised, and G the module's gradient tile. Many modules in one call (one launch on CUDA). The body
// checks everything and hands the backend one record per module: the tensors as given (any strides; lora_e as
// a 1-D (cap,) view), the factors of every module in one float dtype, grad tiles float32 of exactly the
// sampled shape.
struct RankImportanceModule {
  at::Tensor a, b, e, g;  // lora_a (cap, in), lora_b (out, cap), lora_e (cap,), grad tile (rows, cols)
  int64_t row_offset, row_stride, col_offset, col_stride;
  // the sampled counts: rows = len(range(row_offset, out, row_stride)), cols likewise over in
  int64_t rows, cols;
  int64_t rank;
  double weight;
};

struct RankImportanceKernels {
  // out[m] += the score of modules[m], for every m; out is (modules,) float32, zero-filled, on the inputs'
  // device. A module with rank 0 or an empty sample scores 0 (the backend may skip it).
  void (*score)(const std::vector<RankImportanceModule>& modules, const at::Tensor& out);
};

at::Tensor rank_importance(const RankImportanceKernels& k, at::TensorList lora_a, at::TensorList lora_b,
                           at::TensorList lora_e, at::TensorList grad_tiles, at::IntArrayRef row_offset,
                           at::IntArrayRef row_stride, at::IntArrayRef col_offset, at::IntArrayRef col_stride,
                           at::IntArrayRef rank, at::ArrayRef<double> weight);

// Registers the rank importance op for the backend whose TORCH_LIBRARY_IMPL block calls this.
template <const RankImportanceKernels& K>
void register_rank_importance_ops(torch::Library& m) {
  m.impl("rank_importance",
         [](at::TensorList lora_a, at::TensorList lora_b, at::TensorList lora_e, at::TensorList grad_tiles,
            at::IntArrayRef row_offset, at::IntArrayRef row_stride, at::IntArrayRef col_offset,
            at::IntArrayRef col_stride, at::IntArrayRef rank, at::ArrayRef<double> weight) {
           return rank_importance(K, lora_a, lora_b, lora_e, grad_tiles, row_offset, row_stride, col_offset,
                                  col_stride, rank, weight);
         });
}

// ---------------------------------------------------------------------------------------------------
// Component AdamW (IncreLoRA/AdaLoRA's RankAwareAdamW): AdamW on the first rows[m] rows (components) of each 2-D
// tensor params[m], in place, row k with its own step count steps[m][k] and so its own bias corrections and warmed-up
// learning rate. Many tensors in one call (one launch on CUDA). The body checks everything and hands the backend one
// record per tensor: p, m, v contiguous; g of the same shape, any strides; steps float32 1-D (any stride) with at
// least `rows` entries; p, g, m, v of every tensor in one float dtype.
struct ComponentAdamwTensor {
  at::Tensor p, g, m, v, steps;  // params, grads, exp_avgs, exp_avg_sqs (rows_total, cols); steps (>= rows,)
  int64_t rows;                  // rows updated: [0, rows); the others are not touched
  double warmup;                 // >= 0; 0 means none
};

// The hyperparameters every tensor of a call shares (finite; 0 <= beta < 1).
struct ComponentAdamwHyper {
  double lr, beta1, beta2, eps, weight_decay;
};

struct ComponentAdamwKernels {
  // One AdamW step on every tensor's first `rows` rows, in place, the math in float32 (float64 for float64 tensors)
  // and each result rounded once (csrc/common/adamw.h). Tensors with rows == 0 or no columns have no work (the
  // backend may skip them).
  void (*step)(const std::vector<ComponentAdamwTensor>& tensors, const ComponentAdamwHyper& h);
};

void component_adamw_(const ComponentAdamwKernels& k, at::TensorList params, at::TensorList grads,
                      at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList steps, at::IntArrayRef rows,
                      double lr, double beta1, double beta2, double eps, double weight_decay,
                      at::ArrayRef<double> warmup);

// Registers the component AdamW op for the backend whose TORCH_LIBRARY_IMPL block calls this.
template <const ComponentAdamwKernels& K>
void register_component_adamw_ops(torch::Library& m) {
  m.impl("component_adamw_",
         [](at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
            at::TensorList steps, at::IntArrayRef rows, double lr, double beta1, double beta2, double eps,
            double weight_decay, at::ArrayRef<double> warmup) {
           component_adamw_(K, params, grads, exp_avgs, exp_avg_sqs, steps, rows, lr, beta1, beta2, eps,
                            weight_decay, warmup);
         });
}

// ---------------------------------------------------------------------------------------------------
// Ranked LoRA factors (IncreLoRA, AdaLoRA): a ranked layer stores its adapter component-major with spare capacity,
// a (cap, in), e (cap, 1), b_t (cap, out), one dtype S, and hands the fused LoRA op the first n components:
//   forward:  a_n = a[:n] * e[:n] rounded to S, then cast to the compute dtype C (n, in); b_n = b_t[:n]^T in C,
//             (out, n), contiguous
//   backward: the full-capacity gradients in S from those of a_n and b_n: ga[:n] = grad_a_n * e[:n],
//             ge[:e_rows] = rowsum(grad_a_n * a[:n])[:e_rows], gb[:n] = grad_b_n^T, and zero in every other row
//             (rows e_rows..n of e are held fixed: IncreLoRA's reserve components)
// One op each, not the ten small tensor operations they replace: a ranked layer ran those per module and step, and
// their host time made IncreLoRA's step wait on the host (bench/results/host-overhead-cpu.md). Products are formed
// in float32 (float64 when S or C is float64) and rounded once. Backends get contiguous tensors, the outputs
// allocated (contiguous), and at least one row of work.
struct RankedFactorsBackwardArgs {
  at::Tensor grad_a_n, grad_b_n;  // (n, in), (out, n) of one dtype C; undefined where no output needs them
  at::Tensor a, e;                // the storage (cap, in), (cap, 1)
  at::Tensor ga, ge, gb;          // outputs (cap, in), (cap, 1), (cap, out) in S; undefined where not asked for
  int64_t n, e_rows;              // 0 <= e_rows <= n <= cap
};

struct RankedFactorsKernels {
  // a_n and b_n (their shapes give n, in and out; n > 0) from a, e, b_t
  void (*forward)(const at::Tensor& a, const at::Tensor& e, const at::Tensor& b_t, const at::Tensor& a_n,
                  const at::Tensor& b_n);
  // every row of the defined outputs, zero rows included (cap > 0)
  void (*backward)(const RankedFactorsBackwardArgs& args);
};

std::tuple<at::Tensor, at::Tensor> ranked_lora_factors(const RankedFactorsKernels& k, const at::Tensor& a,
                                                       const at::Tensor& e, const at::Tensor& b_t, int64_t n,
                                                       at::ScalarType dtype);

using RankedFactorsGrads = std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>;

RankedFactorsGrads ranked_lora_factors_backward(const RankedFactorsKernels& k,
                                                const std::optional<at::Tensor>& grad_a_n,
                                                const std::optional<at::Tensor>& grad_b_n, const at::Tensor& a,
                                                const at::Tensor& e, const at::Tensor& b_t, int64_t e_rows,
                                                std::array<bool, 3> output_mask);

// Registers the ranked LoRA factor ops for the backend whose TORCH_LIBRARY_IMPL block calls this.
template <const RankedFactorsKernels& K>
void register_ranked_factors_ops(torch::Library& m) {
  m.impl("ranked_lora_factors", [](const at::Tensor& a, const at::Tensor& e, const at::Tensor& b_t, int64_t n,
                                   at::ScalarType dtype) { return ranked_lora_factors(K, a, e, b_t, n, dtype); });
  m.impl("ranked_lora_factors_backward",
         [](const std::optional<at::Tensor>& grad_a_n, const std::optional<at::Tensor>& grad_b_n, const at::Tensor& a,
            const at::Tensor& e, const at::Tensor& b_t, int64_t e_rows, std::array<bool, 3> output_mask) {
           return ranked_lora_factors_backward(K, grad_a_n, grad_b_n, a, e, b_t, e_rows, output_mask);
         });
}

// ---------------------------------------------------------------------------------------------------
// Bottleneck adapter (Houlsby, Pfeiffer, parallel): y = scale * (act(x W_down^T + b_down) W_up^T + b_up)
// [+ x when add_input] [+ residual]. The GEMMs go to the vendor BLAS through ATen; a backend supplies the two
// one-pass steps around them (see csrc/bottleneck_adapter.cpp for the data flow and its memory traffic).
struct BottleneckAdapterKernels {
  // The sum the up projection accumulates onto, formed in one pass, in float32 (float64 for float64) and rounded
  // once: y = x + residual + scale * b_up, each term only where its tensor is defined (at least one is). x and
  // residual are (tokens, d) with unit inner stride and any row stride, b_up (d,) contiguous; y (tokens, d) is
  // fresh and contiguous, numel > 0.
  void (*residual_sum)(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& b_up, double scale,
                       const at::Tensor& y);
  // dh = g * act'(h) in one pass, in place on g (dz W_up on entry, dh on exit), the product formed in float32
  // (float64) and rounded once. g and h are (tokens, m), contiguous, of one dtype, numel > 0.
  void (*activation_grad)(const at::Tensor& g, const at::Tensor& h, Activation act);
};

// (y, h): y of shape x.shape[:-1] + (d_out,), and h = x W_down^T + b_down, (tokens, m), for backward.
std::tuple<at::Tensor, at::Tensor> bottleneck_adapter_forward(
    const BottleneckAdapterKernels& k, const at::Tensor& x, const at::Tensor& w_down,
    const std::optional<at::Tensor>& b_down, const at::Tensor& w_up, const std::optional<at::Tensor>& b_up,
    const std::optional<at::Tensor>& residual, bool add_input, const std::string& activation, double scale);

// Gradients of (x, w_down, b_down, w_up, b_up, residual), each only where its mask bit is set (b_down's also
// only when b_down is given).
using BottleneckAdapterGrads =
    std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>,
               std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>;

BottleneckAdapterGrads bottleneck_adapter_backward(const BottleneckAdapterKernels& k, const at::Tensor& grad_y,
                                                   const std::optional<at::Tensor>& x, const at::Tensor& w_down,
                                                   const std::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                                                   const at::Tensor& h, bool add_input, const std::string& activation,
                                                   double scale, std::array<bool, 6> output_mask);

// Registers the bottleneck adapter ops for the backend whose TORCH_LIBRARY_IMPL block calls this.
template <const BottleneckAdapterKernels& K>
void register_bottleneck_adapter_ops(torch::Library& m) {
  m.impl("bottleneck_adapter_forward",
         [](const at::Tensor& x, const at::Tensor& w_down, const std::optional<at::Tensor>& b_down,
            const at::Tensor& w_up, const std::optional<at::Tensor>& b_up, const std::optional<at::Tensor>& residual,
            bool add_input, c10::string_view activation, double scale) {
           return bottleneck_adapter_forward(K, x, w_down, b_down, w_up, b_up, residual, add_input,
                                             std::string(activation), scale);
         });
  m.impl("bottleneck_adapter_backward",
         [](const at::Tensor& grad_y, const std::optional<at::Tensor>& x, const at::Tensor& w_down,
            const std::optional<at::Tensor>& b_down, const at::Tensor& w_up, const at::Tensor& h, bool add_input,
            c10::string_view activation, double scale, std::array<bool, 6> output_mask) {
           return bottleneck_adapter_backward(K, grad_y, x, w_down, b_down, w_up, h, add_input,
                                              std::string(activation), scale, output_mask);
         });
}

// ---------------------------------------------------------------------------------------------------
// Rotary position embedding in transformers' half-split layout (Llama, Mistral, Qwen, ...): with h = D / 2 and a
// cos and sin of width D per position, out[i] = x[i] cos[i] - x[i + h] sin[i] and out[i + h] = x[i + h] cos[i + h]
// + x[i] sin[i + h] for i < h, which is transformers' x * cos + rotate_half(x) * sin. With `transpose`, the
// transposed rotation, i.e. the gradient w.r.t. x: out[i] = x[i] cos[i] + x[i + h] sin[i + h] and
// out[i + h] = x[i + h] cos[i + h] - x[i] sin[i]. Products and sums in at::opmath_type of x's dtype, each rounded
// as PyTorch's separate ops round them (never contracted), the result rounded once to x's dtype.
// The body broadcasts cos and sin to x's shape and hands the backend rows of D elements: up to kRotaryDims leading
// dimensions, their sizes, and the element strides of x, cos and sin in them (0 where broadcast; the last
// dimension of each is contiguous); the output is contiguous, in x's dtype.
constexpr int kRotaryDims = 4;

// Where the rows of x, cos and sin are: by value, so that a CUDA kernel takes it as an argument.
struct RotaryGeometry {
  int64_t half;
  int dims;  // leading dimensions in use (0 for a 1-D x)
  int64_t sizes[kRotaryDims], x_strides[kRotaryDims], cos_strides[kRotaryDims], sin_strides[kRotaryDims];

  // Element offsets of row r (rows counted as in the contiguous output: the last leading dimension fastest).
  C10_HOST_DEVICE void offsets(int64_t r, int64_t& x, int64_t& cos, int64_t& sin) const {
    x = cos = sin = 0;
    for (int d = dims - 1; d >= 0; --d) {
      const int64_t i = r % sizes[d];
      r /= sizes[d];
      x += i * x_strides[d];
      cos += i * cos_strides[d];
      sin += i * sin_strides[d];
    }
  }
};

struct RotaryArgs {
  at::Tensor x, cos, sin;  // inputs: data pointers include the storage offsets
  at::Tensor out;          // output, contiguous (rows, D)
  int64_t rows;
  RotaryGeometry g;
  bool transpose;
};

struct RotaryKernels {
  void (*apply)(const RotaryArgs& a);
};

at::Tensor rotary_embedding(const RotaryKernels& k, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                            bool transpose);

// Registers the rotary embedding op for the backend whose TORCH_LIBRARY_IMPL block calls this.
template <const RotaryKernels& K>
void register_rotary_ops(torch::Library& m) {
  m.impl("rotary_embedding", [](const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool transpose) {
    return rotary_embedding(K, x, cos, sin, transpose);
  });
}

}  // namespace pefttorch
