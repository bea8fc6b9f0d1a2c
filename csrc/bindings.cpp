// The schema of every pefttorch op, in one place. Kernels register per backend with
// TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda; fake (meta) kernels and autograd are registered from
// Python (pefttorch/ops.py).
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include "build_config.h"

TORCH_LIBRARY(pefttorch, m) {
  // y = x W^T + bias + scaling * dropout(x) A^T B^T, and s = dropout(x) A^T (tokens, r) for backward.
  m.def(
      "lora_linear_forward(Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, Tensor? bias, "
      "float scaling, float dropout_p, Tensor? seed) -> (Tensor y, Tensor s)");
  // Gradients of lora_linear_forward w.r.t. (x, weight, lora_a, lora_b, bias), each only if its mask bit is set.
  m.def(
      "lora_linear_backward(Tensor grad_y, Tensor? x, Tensor weight, Tensor lora_a, Tensor lora_b, "
      "Tensor? s, float scaling, float dropout_p, Tensor? seed, bool[5] output_mask) "
      "-> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)");
  // Density loss of activations a: (mean(a^2 / (a^2 + eps)), share of |a| > threshold), 0-dim float32 (float64 for float64 a).
  m.def("density_loss(Tensor a, float eps, float threshold) -> (Tensor loss, Tensor density)");
  // Gradient of density_loss's loss w.r.t. a: grad * 2 a eps / (a^2 + eps)^2 / numel(a), one pass over a.
  m.def("density_loss_backward(Tensor grad, Tensor a, float eps) -> Tensor");
  // MLP with activations of magnitude <= threshold treated as zero, computing only the active neurons:
  // y = (act(x W_in^T + b_in) [* (x W_up^T + b_up)]) masked @ W_down_t + b_down; W_down_t is (intermediate, out).
  m.def(
      "sparse_mlp(Tensor x, Tensor w_in, Tensor? b_in, Tensor? w_up, Tensor? b_up, Tensor w_down_t, "
      "Tensor? b_down, str activation, float threshold) -> Tensor");
  // One half of a reversible layer (MEFT): y = scale * x + f in x's dtype; f (same shape) may have another float dtype.
  m.def("reversible_coupling(Tensor x, Tensor f, float scale) -> Tensor");
  // Its backward step in one pass: x = (y - f) / scale, grad_x = scale * grad_y, grad_other + vjp, in y's dtype.
  m.def(
      "reversible_coupling_backward(Tensor y, Tensor f, Tensor grad_y, Tensor grad_other, Tensor vjp, float scale) "
      "-> (Tensor x, Tensor grad_x, Tensor grad_other_out)");
  // IncreLoRA importance per module: weight * sum |(B diag(E) A)[rows, cols] * grad_tile| over a strided sample.
  m.def(
      "rank_importance(Tensor[] lora_a, Tensor[] lora_b, Tensor[] lora_e, Tensor[] grad_tiles, int[] row_offset, "
      "int[] row_stride, int[] col_offset, int[] col_stride, int[] rank, float[] weight) -> Tensor");
  // AdamW in place on the first rows[m] rows of each 2-D params[m] (and its states), row k at step steps[m][k].
  m.def(
      "component_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor[] steps, int[] rows, float lr, float beta1, float beta2, float eps, float weight_decay, "
      "float[] warmup) -> ()");
  // Ranked LoRA (IncreLoRA, AdaLoRA): the fused LoRA op's factors from component-major storage with spare capacity,
  // a_n = (a[:n] * e[:n]).to(dtype) (n, in) and b_n = b_t[:n]^T.to(dtype) (out, n), contiguous.
  m.def("ranked_lora_factors(Tensor lora_a, Tensor lora_e, Tensor lora_b_t, int n, ScalarType dtype) "
        "-> (Tensor a_n, Tensor b_n)");
  // Their full-capacity gradients (rows past n zero; e's past e_rows too: held fixed), those the mask asks for.
  m.def(
      "ranked_lora_factors_backward(Tensor? grad_a_n, Tensor? grad_b_n, Tensor lora_a, Tensor lora_e, "
      "Tensor lora_b_t, int e_rows, bool[3] output_mask) -> (Tensor?, Tensor?, Tensor?)");
  // Bottleneck adapter: y = scale * (act(x W_down^T + b_down) W_up^T + b_up) [+ x if add_input] [+ residual], and
  // h = x W_down^T + b_down (tokens, m) for backward.
  m.def(
      "bottleneck_adapter_forward(Tensor x, Tensor w_down, Tensor? b_down, Tensor w_up, Tensor? b_up, "
      "Tensor? residual, bool add_input, str activation, float scale) -> (Tensor y, Tensor h)");
  // Gradients of bottleneck_adapter_forward w.r.t. (x, w_down, b_down, w_up, b_up, residual), those the mask asks for.
  m.def(
      "bottleneck_adapter_backward(Tensor grad_y, Tensor? x, Tensor w_down, Tensor? b_down, Tensor w_up, Tensor h, "
      "bool add_input, str activation, float scale, bool[6] output_mask) "
      "-> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)");
  // Rotary position embedding (half-split layout): x * cos + rotate_half(x) * sin, cos and sin broadcast to x; with
  // transpose, the transposed rotation (the gradient w.r.t. x). Contiguous, in x's dtype.
  m.def("rotary_embedding(Tensor x, Tensor cos, Tensor sin, bool transpose=False) -> Tensor");
}

namespace {
// The backward ops compute gradients and have no derivative of their own (a second derivative through the forward
// ops is refused in Python, pefttorch/ops.py first_order_only). Without an Autograd kernel PyTorch's fallback
// handed back outputs that required grad, recorded the CPU kernel's inner GEMMs, and a backward through them left
// the inputs' .grad None with only a deprecation warning. This is PyTorch's registration for a non-differentiable
// op: below autograd, so the outputs never require grad (a backward through them says so).
void below_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  at::AutoDispatchBelowADInplaceOrView guard;
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}
}  // namespace

TORCH_LIBRARY_IMPL(pefttorch, Autograd, m) {
  for (const char* name : {"lora_linear_backward", "density_loss_backward", "reversible_coupling_backward",
                           "ranked_lora_factors_backward", "bottleneck_adapter_backward"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&below_autograd>());
  }
}

#ifdef PEFTTORCH_PYTHON_MODULE
#include <Python.h>

// `import pefttorch._C` loads this library, which registers the ops above as a side effect. The module
// holds no functions (ops are reached through torch.ops.pefttorch), only what the binary was built with.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C",
                            "pefttorch's compiled ops, registered under torch.ops.pefttorch on import.", -1,
                            nullptr};
  PyObject* m = PyModule_Create(&def);
  if (m == nullptr) return nullptr;
#ifdef PEFTTORCH_WITH_CUDA
  const int with_cuda = 1;
#else
  const int with_cuda = 0;
#endif
  if (PyModule_AddStringConstant(m, "VERSION", PEFTTORCH_VERSION) < 0 ||
      PyModule_AddStringConstant(m, "TORCH_VERSION", PEFTTORCH_TORCH_VERSION) < 0 ||
      PyModule_AddStringConstant(m, "CUDA_ARCHS", PEFTTORCH_CUDA_ARCHS) < 0 ||
      PyModule_AddStringConstant(m, "CUDA_VERSION", PEFTTORCH_CUDA_VERSION) < 0 ||
      PyModule_AddIntConstant(m, "WITH_CUDA", with_cuda) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
#endif
