"""``pefttorch.fuse_norms``: one fused kernel for each RMSNorm of a transformers model, in place.

Llama-family models (and T5) write RMSNorm as seven tensor operations in float32: upcast, square, mean, rsqrt,
scale, downcast, weight. In a bf16 training step each is a pass over an activation-sized tensor, forward and
backward, and the float32 copies are kept for backward (two bytes per activation element more than the input
itself). In a LoRA step, where the weight-gradient GEMMs are gone, that work is a large part of what is left.
``torch.nn.functional.rms_norm`` does the same arithmetic in one kernel each way (ATen's fused CUDA kernel), so
this is a well-kept library's kernel, not one of ours.

Numerics: the fused kernel rounds once, where the transformers module rounds the normalised value to the input
dtype and then again after the weight; in bf16 about a quarter of the outputs differ by one unit in the last
place, in float32 only the summation order differs.

Each switched module keeps its class, its parameters and its state-dict keys: the fused forward is an
instance attribute (as :func:`pefttorch.accelerate` does it), and :func:`unfuse_norms` removes it.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .peft import FOREIGN, AccelerateReport, foreign_forward, has_forward, remove_forward, set_forward

logger = logging.getLogger("pefttorch")

_EPS_NAMES = ("variance_epsilon", "eps", "epsilon")
# Library modules that are already one fused kernel, or are not an RMSNorm at all
_NATIVE = (nn.RMSNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)


def _eps(module: nn.Module) -> float | None:
    for name in _EPS_NAMES:
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def _fused_rms_forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    weight = self.weight
    # What the fused kernel would not reproduce goes to the module's own forward: extra arguments, an input
    # dtype other than the weight's (the module's output then takes the promoted dtype), and a half input under
    # autocast (which may run rms_norm in float32 and return float32).
    if (args or kwargs or hidden_states.dtype != weight.dtype
            or (hidden_states.dtype != torch.float32 and torch.is_autocast_enabled(hidden_states.device.type))):
        return type(self).forward(self, hidden_states, *args, **kwargs)
    return F.rms_norm(hidden_states, weight.shape, weight, _eps(self))


def _probe_mismatch(module: nn.Module, eps: float) -> str | None:
    """Why `module` is not x * rsqrt(mean(x^2) + eps) * weight on a random probe (None: it is).

    Matching the class name is not enough: Gemma's RMSNorm multiplies by (1 + weight), and a model's own code
    may differ in ways no name says. The probe runs the module's own forward against the fused one."""
    weight = module.weight
    gen = torch.Generator().manual_seed(0)
    # Rows of nonzero mean and different scales: on zero-mean rows a LayerNorm without bias (Cohere's) is an
    # RMSNorm to within bf16's tolerance below at a large hidden size, and was switched
    x = torch.randn(3, weight.shape[0], generator=gen, device="cpu")
    x = x * torch.tensor([[1.0], [0.5], [2.0]], device="cpu") + torch.tensor([[0.0], [1.0], [-3.0]], device="cpu")
    x = x.to(device=weight.device, dtype=weight.dtype)
    try:
        with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
            expected = type(module).forward(module, x)
            got = F.rms_norm(x, weight.shape, weight, eps)
    except Exception as err:  # noqa: BLE001 - any failure means: leave the module as it is
        return f"its forward failed on a probe ({type(err).__name__}: {err})"
    if expected.shape != got.shape or expected.dtype != got.dtype:
        return f"its forward returns {expected.dtype} {tuple(expected.shape)}, not the input's dtype and shape"
    # One rounding against two (see the module docstring), and float32's summation order
    tol = max(4 * torch.finfo(weight.dtype).eps, 1e-5)
    err = (expected.double() - got.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    if not err <= tol * max(scale, 1e-30):
        return f"its forward is not x * rsqrt(mean(x^2) + eps) * weight (relative difference {err / scale:.1e})"
    return None


def _candidate(module: nn.Module) -> bool:
    """Looks like a hand-written RMSNorm: 'Norm' in the class name, one 1-D weight, a float eps, no bias."""
    weight = getattr(module, "weight", None)
    return ("norm" in type(module).__name__.lower() and not isinstance(module, _NATIVE)
            and isinstance(weight, nn.Parameter) and weight.dim() == 1 and getattr(module, "bias", None) is None)


def fuse_norms(model: nn.Module, verbose: bool = True) -> AccelerateReport:
    """Switches every RMSNorm of `model` (Llama, Mistral, Qwen, T5, ... or a model wrapped by pefttorch or HF
    PEFT) to ATen's fused ``rms_norm`` kernel, in place: about seven activation-sized passes fewer each way,
    and no float32 copies of the activations kept for backward. Outputs match the transformers module to one
    rounding (see the module docstring); gradients flow to the norm weights when they require grad.

    A module is switched only if its own forward matches the fused kernel on a random probe, so RMSNorms with
    other arithmetic (Gemma's ``1 + weight``) stay as they were. Returns a report of what was switched and what
    was not and why (also logged at INFO when `verbose`). :func:`unfuse_norms` undoes it.
    """
    report = AccelerateReport(title="pefttorch.fuse_norms", what="RMSNorm(s) switched to ATen's fused rms_norm")
    for name, module in model.named_modules():
        if has_forward(module, _fused_rms_forward):
            report.switched.append(name)
            continue
        if not _candidate(module):
            continue
        eps = _eps(module)
        if eps is None:
            report.skipped[name] = f"no float eps among {', '.join(_EPS_NAMES)}"
            continue
        if foreign_forward(module):
            report.skipped[name] = FOREIGN
            continue
        if module.weight.device.type == "meta":
            report.skipped[name] = "its weight is on the meta device"
            continue
        # Every module is probed with its own weight (a 3-token forward): a Gemma-like offset shows more
        # clearly on some weights than on others
        mismatch = _probe_mismatch(module, eps)
        if mismatch is not None:
            report.skipped[name] = mismatch
            continue
        set_forward(module, _fused_rms_forward)
        report.switched.append(name)
    if verbose:
        logger.info("%s", report)
    return report


def unfuse_norms(model: nn.Module) -> int:
    """Gives every RMSNorm switched by :func:`fuse_norms` its own forward back; returns how many."""
    return remove_forward(model, _fused_rms_forward)


def is_fused_norm(module: nn.Module) -> bool:
    return has_forward(module, _fused_rms_forward)
