"""LoRALinear: an nn.Linear with a trainable low-rank update, computed by the fused kernel."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .. import functional
from ._args import is_flag, is_integer, is_real
from ._scripting import NotScriptable


class LoRALinear(NotScriptable, nn.Module):
    """``y = x W^T + b + scaling * dropout(x) A^T B^T`` with W and b frozen.

    ``scaling`` is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``). A starts
    Kaiming-uniform and B at zero, so the layer starts out equal to the base layer. Build one around an
    existing layer with :meth:`from_linear`; :meth:`merge` folds the update into W for inference and
    :meth:`unmerge` takes it out again.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        # numpy's scalars count (a rank from a config array), as nn.Linear takes them (see nn._args)
        if not (is_integer(in_features) and in_features >= 0 and is_integer(out_features) and out_features >= 0):
            raise ValueError(f"LoRALinear: in_features and out_features must be non-negative integers, got "
                             f"{in_features!r} and {out_features!r}")
        if not is_integer(r) or r <= 0:
            raise ValueError(f"LoRALinear: r must be a positive integer, got {r!r}")
        if not is_real(lora_alpha) or not math.isfinite(lora_alpha):
            raise ValueError(f"LoRALinear: lora_alpha must be a finite number, got {lora_alpha!r}")
        if not is_real(lora_dropout) or not 0.0 <= lora_dropout < 1.0:  # (NaN fails the comparison too)
            raise ValueError(f"LoRALinear: lora_dropout must be a number in [0, 1), got {lora_dropout!r}")
        for name, value in (("use_rslora", use_rslora), ("bias", bias)):
            if not is_flag(value):  # use_rslora="no" was true, and changed the scaling in silence
                raise ValueError(f"LoRALinear: {name} must be True or False, got {value!r}")
        in_features, out_features, r = int(in_features), int(out_features), int(r)
        use_rslora, bias = bool(use_rslora), bool(bias)
        lora_alpha, lora_dropout = float(lora_alpha), float(lora_dropout)
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout
        self.use_rslora = use_rslora
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.merged = False
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **factory))
        self.reset_parameters()
        self.register_load_state_dict_pre_hook(_default_unmerged)

    # Whether the weight holds the update travels with it in the state dict: a merged layer's state loaded into an
    # unmerged one (or the reverse) applied the update twice (or not at all), with every key matching.
    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor(self.merged)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.merged = bool(state)

    def reset_parameters(self) -> None:
        """Initialises the base layer as nn.Linear does and the adapter as :meth:`reset_lora_parameters`: what a
        meta-device module materialised per module (FSDP's ``to_empty`` + ``reset_parameters``) needs."""
        self._refuse_merged("reset_parameters")
        self._init_base()
        self.reset_lora_parameters()

    def _init_base(self) -> None:
        # nn.Linear's own initialisation, for layers not built from an existing one.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def reset_lora_parameters(self) -> None:
        """A Kaiming-uniform (as nn.Linear initialises its weight), B zero: the update starts at 0."""
        self._refuse_merged("reset_lora_parameters")
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def _refuse_merged(self, method: str) -> None:
        # A merged weight holds scaling * B A: new factors could no longer take it out (it stayed in W for good), and
        # reset_parameters left merged=True on a fresh weight. As loading the factors alone (_default_unmerged).
        if self.merged:
            raise RuntimeError(f"LoRALinear.{method}: the layer is merged, and its weight holds the update of the "
                               "current factors, which new ones could not take out; unmerge() first")

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> LoRALinear:
        """Wraps ``linear``: shares (and freezes) its weight and bias, adds A and B beside them. The new layer reads
        the weight (it does not call `linear`, whose hooks do not carry over), so a subclass of nn.Linear that
        computes something else (fake quantization, weight noise) is refused."""
        from ..tuners.lora.layer import has_linear_forward

        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LoRALinear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        if not has_linear_forward(linear) or "forward" in linear.__dict__:
            raise TypeError(f"LoRALinear.from_linear: {type(linear).__name__} has a forward of its own, which the "
                            "fused op would skip (it reads the weight); wrap it with pefttorch.get_peft_model, which "
                            "calls such a layer")
        for name in ("weight", "bias"):
            why = _computed(linear, name)
            if why is not None:
                raise TypeError(f"LoRALinear.from_linear: the {name} of {type(linear).__name__} is not a parameter of "
                                f"it: {why}. LoRALinear holds the weight and bias as parameters and reads them (the "
                                f"layer's hooks do not carry over); {_REMOVE_FIRST}")
        if not (functional.plain_tensor(linear.weight) and functional.plain_tensor(linear.bias)):
            raise TypeError(f"LoRALinear.from_linear: the weight is of type {type(linear.weight).__name__}, a tensor "
                            "subclass (a quantized weight?) that the fused op cannot read; wrap the layer with "
                            "pefttorch.get_peft_model, which calls it")
        w = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            use_rslora=use_rslora,
            bias=linear.bias is not None,
            device="meta",  # the base tensors are replaced below: do not allocate them twice
            dtype=w.dtype,
        )
        layer.weight = linear.weight
        layer.weight.requires_grad_(False)
        if linear.bias is not None:
            layer.bias = linear.bias
            layer.bias.requires_grad_(False)
        layer.lora_A = nn.Parameter(torch.empty(r, linear.in_features, device=w.device, dtype=w.dtype))
        layer.lora_B = nn.Parameter(torch.empty(linear.out_features, r, device=w.device, dtype=w.dtype))
        layer.reset_lora_parameters()
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return functional.lora_linear(
            x,
            self.weight,
            self.lora_A,
            self.lora_B,
            self.bias,
            scaling=self.scaling,
            dropout=self.lora_dropout,
            training=self.training,
        )

    def merge(self) -> None:
        """W += scaling * B A, in place; forward then runs the plain linear layer."""
        if self.merged:
            raise RuntimeError("LoRALinear.merge: already merged")
        self._check_weight_writable("merge")
        functional.merge_lora_(self.weight, self.lora_A, self.lora_B, self.scaling)
        self.merged = True

    def unmerge(self) -> None:
        """Undoes merge(): W -= scaling * B A (exact up to rounding in W's dtype)."""
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge: not merged")
        self._check_weight_writable("unmerge")
        functional.merge_lora_(self.weight, self.lora_A, self.lora_B, self.scaling, sign=-1.0)
        self.merged = False

    def _check_weight_writable(self, method: str) -> None:
        # merge/unmerge write into the weight in place: a weight computed from other tensors at each access or call
        # (a parametrization, weight_norm's or pruning's pre-hook) is a fresh tensor, so the update was lost while
        # merged=True made forward skip it (an output off by the whole update, in silence)
        why = _computed(self, "weight")
        if why is not None:
            raise RuntimeError(f"LoRALinear.{method}: the weight is not a parameter of the layer: {why}, so the update "
                               f"written into it would be lost; {_REMOVE_FIRST}, or keep the layer unmerged")

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, lora_dropout={self.lora_dropout}, "
            f"bias={self.bias is not None}, rslora={self.use_rslora}, merged={self.merged}"
        )


_REMOVE_FIRST = ("remove it first (torch.nn.utils.parametrize.remove_parametrizations, "
                 "torch.nn.utils.remove_weight_norm or torch.nn.utils.prune.remove)")


def offloaded_at(model: nn.Module) -> str | None:
    """The first module whose weights 🤗 Accelerate offloads (cpu_offload, a device_map with "cpu"/"disk" entries):
    they sit on the meta device and its hook loads them for each call. None where nothing is offloaded."""
    for path, module in model.named_modules():
        hook = getattr(module, "_hf_hook", None)
        if hook is not None and any(getattr(h, "offload", False) for h in getattr(hook, "hooks", [hook])):
            return path or "the top"
    return None


def refuse_offloaded(modules, doing: str, advice: str = "merge and unmerge before offloading", root=None) -> None:
    """Refuses `doing` (a merge, an unmerge) on offloaded weights, those of the (path, module) pairs `modules`: it
    wrote into the meta placeholders while the hooks went on loading the weights as they were, so the merged model
    computed the base model (and an unmerge or a disable applied the adapter twice), in silence. Modules that are not
    offloaded (another part of the model may be) are written as usual. A module counts as offloaded where a hook
    under it offloads, or where a parameter of it is on the meta device while the model `root` is offloaded somewhere
    (root True: the caller knows it is, its inputs being real): accelerate's preload_module_classes hooks an ancestor
    and nothing below it. A model on the meta device alone (built there, no hooks) is no concern of this check."""
    for path, module in modules:
        at = offloaded_at(module)
        if at is not None:
            at = path if at == "the top" else f"{path}.{at}" if path else at
        elif root is not None and any(p.is_meta for p in module.parameters()) and (
                root is True or offloaded_at(root) is not None):
            at = path
        if at is not None:
            raise ValueError(f"the model's weights are offloaded by 🤗 Accelerate (at {at}: on the meta device), where "
                             f"{doing} cannot happen (a write there is lost in silence, a read finds no values); "
                             f"{advice}, or load the model without offloading (a device_map of devices only)")


def refuse_computed_weights(op: str, modules: list[tuple[str, nn.Module]]) -> None:
    """Refuses, before anything is written, to merge into the weight or bias of any of `modules` (path, module) that
    is computed rather than a parameter (see :func:`_computed`): the update written in place went into a fresh
    tensor and was lost, while the adapter was marked merged and skipped (the tuners' merges, as LoRALinear's)."""
    for path, module in modules:
        for name in ("weight", "bias"):
            why = _computed(module, name)
            if why is not None:
                raise RuntimeError(f"{op}: the {name} of {path} ({type(module).__name__}) is not a parameter of it: "
                                   f"{why}, so an update written into it would be lost; {_REMOVE_FIRST}, or keep "
                                   "the adapter unmerged")


def _computed(module: nn.Module, name: str) -> str | None:
    """Why `module`'s `name` is computed rather than a Parameter registered on it (a parametrization, or a forward
    pre-hook of the old torch.nn.utils.weight_norm or of torch.nn.utils.prune that recomputes it before each call),
    naming what computes it; None for a plain parameter, or a bias that is None."""
    if parametrize.is_parametrized(module, name):
        kinds = ", ".join(type(p).__name__ for p in module.parametrizations[name])
        return f"a parametrization ({kinds}) computes it from module.parametrizations.{name}.original"
    value = getattr(module, name, None)  # (a norm without a bias attribute: RMSNorm)
    if value is None or (module._parameters.get(name) is not None and value is module._parameters[name]):
        return None
    # the hooks name their tensor: WeightNorm as `name`, the pruning methods (and their container) as `_tensor_name`
    hooks = [type(h).__name__ for h in module._forward_pre_hooks.values()
             if name in (getattr(h, "name", None), getattr(h, "_tensor_name", None))]
    return f"a forward pre-hook ({', '.join(hooks)}) recomputes it" if hooks else "it is a tensor set on the module"


def _default_unmerged(module: LoRALinear, state_dict: dict, prefix: str, *_) -> None:
    """A state dict written before the merged flag was saved holds an unmerged weight (merge() was for inference).
    One without the weight (the adapter alone) leaves the flag as it is: but loaded into a merged layer it would
    leave the old update in the weight, with factors that no longer take it out, so that is refused."""
    if prefix + "weight" in state_dict:
        state_dict.setdefault(prefix + "_extra_state", torch.tensor(False))
        return
    name = f"LoRALinear{' ' + prefix[:-1] if prefix else ''}"
    flag = state_dict.get(prefix + "_extra_state")
    if flag is not None and bool(flag) != module.merged:  # the flag describes a weight that is not loaded
        raise RuntimeError(f"{name}: the state dict says merged={bool(flag)} but brings no weight, and this layer's "
                           f"weight is {'' if module.merged else 'not '}merged; load it with its weight, or without "
                           "the '_extra_state' entry")
    if module.merged and any(prefix + key in state_dict for key in ("lora_A", "lora_B")):
        raise RuntimeError(f"{name}: loading lora_A/lora_B without the weight into a merged layer would leave the old "
                           "update in the weight; unmerge() first")
