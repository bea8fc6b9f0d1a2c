"""User-level functions over pefttorch's fused ops."""

from __future__ import annotations

import torch

from . import ops


def draw_seed(generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh 63-bit dropout seed as a CPU int64 tensor, drawn from `generator` (default: torch's).

    Drawing it from torch's generator makes dropout reproducible under torch.manual_seed, and keeping
    it a tensor lets torch.compile trace the draw instead of breaking the graph on a Python int.
    """
    return torch.randint(0, 2**63 - 1, (), dtype=torch.int64, device="cpu", generator=generator)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scaling: float = 1.0,
    dropout: float = 0.0,
    training: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fused LoRA linear layer: ``x W^T + b + scaling * dropout(x) A^T B^T``.

    Args:
        x: input of shape ``(..., in_features)``; any strides.
        weight: base weight ``(out_features, in_features)``; differentiated only if it requires grad.
        lora_a: down projection ``A`` of shape ``(r, in_features)``.
        lora_b: up projection ``B`` of shape ``(out_features, r)``.
        bias: optional ``(out_features,)``.
        scaling: factor of the low-rank update (``lora_alpha / r`` in LoRA).
        dropout: probability of zeroing an element of x on the low-rank path only, in [0, 1).
        training: dropout is applied only when True.
        generator: CPU generator the dropout seed is drawn from (default: torch's global one).

    All tensors must share one dtype (float32, float16, bfloat16 or float64) and one device; under
    torch.autocast they are cast to the autocast dtype, as F.linear's inputs would be. The mask
    is regenerated in backward from a seed, never stored; only x and the ``(tokens, r)`` product
    ``dropout(x) A^T`` are kept for backward, and only when a gradient needs them.
    """
    dropout = float(dropout)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora_linear: dropout must be in [0, 1), got {dropout}")
    p = dropout if training else 0.0
    seed = draw_seed(generator) if p > 0.0 else None
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # As F.linear under autocast: compute in the autocast dtype. The op itself is not autocast-aware,
        # so cast here and keep the GEMMs inside it from being cast a second time.
        dtype = torch.get_autocast_dtype(device_type)
        x, weight, lora_a, lora_b = (t.to(dtype) for t in (x, weight, lora_a, lora_b))
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type, enabled=False):
            y, _ = ops.lora_linear_forward(x, weight, lora_a, lora_b, bias, float(scaling), p, seed)
        return y
    y, _ = ops.lora_linear_forward(x, weight, lora_a, lora_b, bias, float(scaling), p, seed)
    return y


@torch.no_grad()
def merge_lora_(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, *,
                sign: float = 1.0, fan_in_fan_out: bool = False) -> None:
    """``weight += sign * scaling * B A`` in place (transposed if the weight is stored (in, out)).

    The update is formed in float32 (float64 for float64 weights) and rounded once into the weight's
    dtype, so merging and then unmerging (sign -1) restores the weight up to that rounding.
    """
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    delta = (lora_b.to(acc) @ lora_a.to(acc)) * scaling
    if fan_in_fan_out:
        delta = delta.t()
    weight.copy_(weight.to(acc) + sign * delta)
