// Declarations of every pefttorch op. Schemas live in bindings.cpp; the device-independent bodies in
// csrc/*.cpp; the kernels, and their TORCH_LIBRARY_IMPL registrations, in csrc/cpu and csrc/cuda.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

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

}  // namespace pefttorch
