"""LoRA layers for transformers models, laid out like HF PEFT's (so state_dict keys are the same) and
computed by pefttorch's fused kernel.

``lora_forward`` is written against that layout only (base_layer, lora_A/lora_B/lora_dropout dicts,
scaling, active_adapters, ...), so it serves both pefttorch's LoraLayer and, through
``pefttorch.accelerate``, HF PEFT's own ``lora.Linear`` layers.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn.modules import module as module_globals

from ... import functional
from ...nn._scripting import NotScriptable
from ...nn.lora import refuse_offloaded

_conv1d: list = []  # transformers' Conv1D once looked up: an import statement per call cost every forward ~0.7 us


def conv1d_class():
    """transformers' Conv1D (GPT-2 style: weight stored (in, out)), or None without transformers."""
    if not _conv1d:
        try:
            from transformers.pytorch_utils import Conv1D
        except ImportError:  # pragma: no cover - transformers is a dependency of the integration
            Conv1D = None  # noqa: N806 - the class, or its absence
        _conv1d.append(Conv1D)
    return _conv1d[0]


def is_linear(module: nn.Module) -> bool:
    conv1d = conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    in_features, out_features = module.weight.shape  # Conv1D keeps (in, out)
    return in_features, out_features


def has_linear_forward(module: nn.Module) -> bool:
    """Whether `module`'s class computes nn.Linear's (or Conv1D's) forward, not one of its own (a subclass for fake
    quantization or weight noise)."""
    forward = type(module).forward
    if forward is nn.Linear.forward:
        return True
    conv1d = conv1d_class()
    return conv1d is not None and forward is conv1d.forward


def calls_only_linear(module: nn.Module) -> bool:
    """Whether calling `module` computes nothing but its linear map, so the fused op may read its weight instead of
    calling it. Not so for a class with its own forward, a module with hooks (input steering, DeepSpeed ZeRO-3's
    parameter gathering, gradient attribution's backward hooks, which fire only for a module that is called), an
    instance forward (🤗 Accelerate's device hooks) or weights the op cannot read (functional.plain_tensor): those
    are called, as HF PEFT calls its base layer."""
    g = module_globals  # written out, not looped over: this runs in every forward (three times)
    return (has_linear_forward(module) and "forward" not in module.__dict__
            and functional.plain_tensor(module.weight) and functional.plain_tensor(module.bias)
            and not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                     or module._backward_pre_hooks or g._global_forward_hooks or g._global_forward_pre_hooks
                     or g._global_backward_hooks or g._global_backward_pre_hooks))


def dropout_p(module: nn.Module) -> tuple[float, bool]:
    """(probability, active) of a dropout module, or of nn.Identity (no dropout)."""
    if isinstance(module, nn.Dropout):
        return module.p, module.training
    return 0.0, False


def lora_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``base(x) + sum over active adapters of scaling * B A dropout(x)``, the first adapter fused with
    the base layer in one pefttorch op; further active adapters (rare) add unfused terms."""
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    base = layer.base_layer
    if layer.disable_adapters and layer.merged:
        # disabled means the base model's output: take merged adapters back out first (as HF PEFT does)
        layer.unmerge(inputs_real=not x.is_meta)
    if layer.disable_adapters or layer.merged or not active:
        return base(x)
    if not all(calls_only_linear(m) for m in (base, layer.lora_A[active[0]], layer.lora_B[active[0]])):
        # a base or factor that must be called (hooks, its own forward): no fusion, HF PEFT's arithmetic
        return _add_unfused(layer, base(x), x, active)
    weight = base.weight.t() if layer.fan_in_fan_out else base.weight  # (out, in) view, no copy
    first = active[0]
    p, training = dropout_p(layer.lora_dropout[first])
    # Adapter weights may be kept in fp32 next to a 16-bit base (HF PEFT's default): cast these small
    # matrices, not the large activations, and let autograd carry the gradient back to fp32.
    lora_b, scaling = layer.lora_B[first].weight.to(x.dtype), layer.scaling[first]
    if isinstance(scaling, torch.Tensor):
        # HF PEFT's compiled hotswap keeps it as a 0-d tensor changed in place: read as the op's float, it was a
        # .item() (a graph break under torch.compile, an error with fullgraph) and a constant baked into the graph
        lora_b, scaling = lora_b * scaling.to(lora_b.dtype), 1.0
    y = functional.lora_linear(
        x, weight, layer.lora_A[first].weight.to(x.dtype), lora_b, base.bias,
        scaling=scaling, dropout=p, training=training,
    )
    return _add_unfused(layer, y, x, active[1:])


def _add_unfused(layer: nn.Module, y: torch.Tensor, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    """y plus the terms of adapters `names`, each computed as HF PEFT does."""
    for name in names:
        a, b = layer.lora_A[name], layer.lora_B[name]
        h = layer.lora_dropout[name](x.to(a.weight.dtype))
        y = y + (b(a(h)) * layer.scaling[name]).to(y.dtype)
    return y


class LoraLayer(NotScriptable, nn.Module):
    """An nn.Linear or transformers Conv1D (``base_layer``, frozen) with LoRA adapters.

    Attribute names and state_dict keys are those of HF PEFT's ``lora.Linear``:
    ``base_layer.weight``, ``lora_A.<adapter>.weight`` (r, in), ``lora_B.<adapter>.weight`` (out, r).
    """

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__()
        if not is_linear(base_layer):
            raise TypeError(f"LoraLayer wraps nn.Linear or Conv1D, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features, self.out_features = linear_dims(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.merged_adapters: list[str] = []
        self.active_adapters: list[str] = []
        self.disable_adapters = False

    # Model code sometimes reads a projection's weight (dtype checks, tied weights): show the base's.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def update_layer(self, name: str, r: int, lora_alpha: float, lora_dropout: float, init_lora_weights,
                     use_rslora: bool, dtype: torch.dtype | None = None) -> None:
        """Adds adapter `name` (A (r, in), B (out, r)) on the base weight's device."""
        w = self.base_layer.weight
        factory = {"device": w.device, "dtype": dtype or w.dtype}
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, **factory)
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[name] = r
        self.lora_alpha[name] = lora_alpha
        self.scaling[name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.reset_lora_parameters(name, init_lora_weights)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The parameters adapter `name` trains in this layer."""
        return [self.lora_A[name].weight, self.lora_B[name].weight]

    @torch.no_grad()
    def reset_lora_parameters(self, name: str, init_lora_weights) -> None:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        if a.device.type == "meta":
            return
        if init_lora_weights is False:  # both random (nn.Linear's initialisation): for tests
            return
        if init_lora_weights == "gaussian":
            nn.init.normal_(a, std=1 / self.r[name])
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(b)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs:
            raise TypeError(f"{type(self).__name__}.forward takes only the input tensor")
        return lora_forward(self, x)

    def _merge(self, name: str, sign: float) -> None:
        functional.merge_lora_(self.base_layer.weight, self.lora_A[name].weight, self.lora_B[name].weight,
                               self.scaling[name], sign=sign, fan_in_fan_out=self.fan_in_fan_out)

    def _written(self) -> list[tuple[str, nn.Module]]:
        """What a merge or unmerge of this layer writes and reads, named for refuse_offloaded (the tuner, which knows
        the layer's path, checks first; this catches the disabled forward's lazy unmerge)."""
        return [(f"this {type(self).__name__}'s {name}", getattr(self, name)) for name in ("base_layer", "lora_A",
                                                                                         "lora_B")
                if isinstance(getattr(self, name, None), nn.Module)]

    def merge(self, adapter_names: list[str] | None = None) -> None:
        """Adds the active (or the given) adapters into the base weight, each once."""
        for name in adapter_names if adapter_names is not None else self.active_adapters:
            if name in self.lora_A and name not in self.merged_adapters:
                refuse_offloaded(self._written(), "a merge")
                self._merge(name, 1.0)
                self.merged_adapters.append(name)

    def unmerge(self, inputs_real: bool = False) -> None:
        """Takes the merged adapters out of the base weight; `inputs_real`: called by a forward given real tensors,
        where weights on the meta device are offloaded placeholders."""
        if self.merged_adapters:  # (also the disabled forward's: merged and disabled before offloading)
            refuse_offloaded(self._written(), "an unmerge", "merge, unmerge and disable adapters before offloading",
                             root=True if inputs_real else None)
        while self.merged_adapters:
            self._merge(self.merged_adapters.pop(), -1.0)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged into the base weight; unmerge before deleting it")
        for d in (self.lora_A, self.lora_B, self.lora_dropout):
            if name in d:
                del d[name]
        for d in (self.r, self.lora_alpha, self.scaling):
            d.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}: r={self.r[n]}, scaling={self.scaling[n]:g}" for n in self.lora_A)
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters=[{adapters}], " \
               f"active={self.active_adapters}, merged={self.merged_adapters}"


class ModulesToSaveWrapper(NotScriptable, nn.Module):
    """A module trained in full for each adapter (e.g. a new classification head), next to the frozen
    original, which serves while adapters are disabled. Same layout as HF PEFT's wrapper."""

    def __init__(self, module: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters = False
        self.add_adapter(adapter_name)

    def add_adapter(self, name: str) -> None:
        self.original_module.requires_grad_(False)
        self.modules_to_save[name] = copy.deepcopy(self.original_module)
        if self.active_adapter is None:
            self.active_adapter = name

    def active_module(self) -> nn.Module:
        if self.disable_adapters or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def merged_module(self, adapter_names: list[str] | None) -> nn.Module:
        """The module that stays when the adapters `adapter_names` (None: those in use) are merged, as HF PEFT
        0.22 picks it: the trained copy of the one of them that has one, the original where none has; two with a
        copy each are refused (which to keep?). (The copy in use stayed whatever was named: merging another
        adapter lost its trained head, and an adapter without a copy came with the active one's.)"""
        if adapter_names is None:
            return self.active_module()
        names = [n for n in adapter_names if n in self.modules_to_save]
        if len(names) > 1:
            raise ValueError(f"adapters {names} each train their own copy of this module (modules_to_save): "
                             "merging keeps one copy; name only one of them in adapter_names")
        return self.modules_to_save[names[0]] if names else self.original_module

    def forward(self, *args, **kwargs):
        return self.active_module()(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.active_module(), name)
