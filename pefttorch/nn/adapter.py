"""Bottleneck adapters: ``scale * up(act(down(x)))`` added to a residual, computed by pefttorch's fused op."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional, reference
from ._args import is_flag, is_integer, is_real
from ._scripting import NotScriptable


class BottleneckAdapter(NotScriptable, nn.Module):
    """``y = residual + scale * (act(LN(x) W_down^T + b_down) W_up^T + b_up)``.

    As a sequential adapter (Houlsby, Pfeiffer) its input is the block's output h and ``residual = h``: call
    ``adapter(h)``. As a parallel adapter (He et al.) its input is the block's input and the residual the
    block's output: ``adapter(x, residual=block(x))``. The up projection starts at zero, so the adapter
    starts as the identity on its residual (near-identity initialisation).

    Args:
        features: width of the input (and of the output).
        bottleneck: width of the bottleneck m.
        activation: ``"relu"``, ``"gelu"``, ``"gelu_tanh"`` or ``"silu"``.
        scale: factor of the adapter's output.
        layer_norm: a LayerNorm on the adapter's input (AdapterHub's ``ln_before``).

    ``down``, ``up`` and ``layer_norm`` hold the parameters (and name them in the state dict), but the fused op
    reads them rather than calling those submodules: hooks registered on them do not run (parametrizations,
    which act through the weight, do).
    """

    def __init__(self, features: int, bottleneck: int, activation: str = "relu", scale: float = 1.0,
                 layer_norm: bool = False, *, device=None, dtype=None) -> None:
        super().__init__()
        if activation not in reference.ACTIVATIONS:
            raise ValueError(f"BottleneckAdapter: unsupported activation {activation!r}; supported: "
                             f"{', '.join(reference.ACTIVATIONS)}")
        # numpy's integer scalars count, as LoRALinear's sizes (see nn._args); 2.5 or True failed in torch.empty
        if not (is_integer(features) and features >= 1 and is_integer(bottleneck) and bottleneck >= 1):
            raise ValueError(f"BottleneckAdapter: features and bottleneck must be positive integers, got "
                             f"{features!r} and {bottleneck!r}")
        if not is_real(scale) or not math.isfinite(scale):
            raise ValueError(f"BottleneckAdapter: scale must be a finite number, got {scale!r}")
        if not is_flag(layer_norm):
            raise ValueError(f"BottleneckAdapter: layer_norm must be True or False, got {layer_norm!r}")
        features, bottleneck, layer_norm = int(features), int(bottleneck), bool(layer_norm)
        factory = {"device": device, "dtype": dtype}
        self.features, self.bottleneck, self.activation, self.scale = features, bottleneck, activation, float(scale)
        self.layer_norm = nn.LayerNorm(features, **factory) if layer_norm else None
        self.down = _Projection(features, bottleneck, zero_weight=False, **factory)
        self.up = _Projection(bottleneck, features, zero_weight=True, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.layer_norm is not None:
            self.layer_norm.reset_parameters()
        # (not the children's own: a module pickled before _Projection existed holds plain nn.Linear ones)
        _init_projection(self.down, zero_weight=False)
        _init_projection(self.up, zero_weight=True)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The adapter plus its residual: x itself when `residual` is None (sequential)."""
        return self._run(x, x if residual is None else residual)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's own output, without a residual: what it adds to the block's (ScaLearn scales these)."""
        return self._run(x, None)

    def _run(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        dtype = x.dtype
        ln = self.layer_norm
        h = x if ln is None else F.layer_norm(x, ln.normalized_shape, ln.weight.to(dtype), ln.bias.to(dtype), ln.eps)
        return functional.bottleneck_adapter(h, self.down.weight.to(dtype), self.up.weight.to(dtype),
                                             b_down=self.down.bias.to(dtype), b_up=self.up.bias.to(dtype),
                                             residual=residual, activation=self.activation, scale=self.scale)

    def extra_repr(self) -> str:
        return (f"features={self.features}, bottleneck={self.bottleneck}, activation={self.activation}, "
                f"scale={self.scale:g}")


class _Projection(nn.Linear):
    """An adapter's projection, whose own reset_parameters gives the adapter's initialisation (a zero bias; for the
    up projection a zero weight too, so the adapter starts as the identity): materialising a meta-device model
    module by module (FSDP's ``to_empty`` then ``reset_parameters`` on each module that owns parameters) must not
    give the up projection nn.Linear's random weight."""

    def __init__(self, in_features: int, out_features: int, *, zero_weight: bool, device=None, dtype=None) -> None:
        self.zero_weight = zero_weight  # read by reset_parameters, which nn.Linear's __init__ calls
        super().__init__(in_features, out_features, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        _init_projection(self, self.zero_weight)


@torch.no_grad()
def _init_projection(linear: nn.Linear, zero_weight: bool) -> None:
    if zero_weight:
        nn.init.zeros_(linear.weight)
    else:
        nn.Linear.reset_parameters(linear)  # Kaiming-uniform
    nn.init.zeros_(linear.bias)
