"""SelectiveModel: BitFit and LayerNorm tuning, training a chosen subset of the base model's own parameters.

Each chosen parameter gets a trainable copy that takes its place in its module (the module's forward is
untouched and costs nothing extra); the original is kept aside, frozen, for ``disable_adapter`` and ``unload``.
"""

from __future__ import annotations

import re
import weakref

import torch
from torch import nn

from ...nn.lora import refuse_offloaded
from .._hooked import HookedModel, exact_regex, find_modules, refuse_shared_modules
from ..lora.model import PREFIX
from ..scaling.model import is_norm
from .config import BitFitConfig, LNTuningConfig

# The tuned copies that stand in base modules now, by id (weakly held: a deleted model frees them; not a WeakSet,
# whose lookups compare tensors with ==). They are the only trace BitFit and LayerNorm tuning leave in the base
# model, and get_peft_model looks for them to refuse a second tuner.
_swapped_in: dict[int, weakref.ref] = {}


def _mark_swapped_in(p: nn.Parameter, swapped: bool) -> None:
    key = id(p)
    if swapped:
        _swapped_in[key] = weakref.ref(p, lambda _: _swapped_in.pop(key, None))
    else:
        _swapped_in.pop(key, None)


def is_swapped_in(p: torch.Tensor) -> bool:
    ref = _swapped_in.get(id(p))
    return ref is not None and ref() is p


def bias_names(module: nn.Module) -> list[str]:
    """The module's own bias parameters: ``bias``, and those named as biases otherwise (nn.MultiheadAttention's
    in_proj_bias, and bias_k / bias_v with add_bias_kv), which BitFit's "every bias" once left frozen."""
    return [n for n, p in module._parameters.items()
            if isinstance(p, torch.Tensor) and (n == "bias" or n.endswith("_bias") or n.startswith("bias_"))]


def has_bias(module: nn.Module) -> bool:
    return bool(bias_names(module))


def chosen_parameters(model: nn.Module, config: BitFitConfig | LNTuningConfig):
    """(module path, module, parameter names) of what `config` trains in `model`, found without changing it."""
    bitfit = isinstance(config, BitFitConfig)
    accept, what = (has_bias, "modules with a bias") if bitfit else (is_norm, "LayerNorm/RMSNorm modules")
    found = find_modules(model, config.target_modules, config, accept, what)
    if not bitfit:  # (BitFit is pefttorch's own: a bias is the module's, on every call)
        refuse_shared_modules(model, found, "LayerNorm tuning")
    return [(path, m, bias_names(m) if bitfit else [n for n, p in m._parameters.items() if p is not None])
            for path, m in found]


class SelectiveModel(HookedModel):
    """A model whose biases (BitFit) or norm layers (LayerNorm tuning) train (one adapter set)."""

    def __init__(self, model: nn.Module, config: BitFitConfig | LNTuningConfig, adapter_name: str = "default") -> None:
        super().__init__(model, config, adapter_name)
        self.bitfit = isinstance(config, BitFitConfig)
        self.method = "BitFit" if self.bitfit else "LayerNorm tuning"
        chosen = chosen_parameters(model, config)
        self.modules_found = [(path, m) for path, m, _ in chosen]
        # (path, module, parameter name, key in the dicts below)
        self.slots = [(path, m, name, re.sub(r"\W", "_", f"{path}.{name}")) for path, m, names in chosen
                      for name in names]
        self.tuned, self.originals = nn.ParameterDict(), nn.ParameterDict()
        for _, module, name, key in self.slots:
            original = module._parameters[name]
            self.originals[key] = original  # registered here too, so .to() and state dicts keep it
            self.tuned[key] = nn.Parameter(original.detach().clone())
        self._swap(tuned=True)
        self.finish()

    def _swap(self, tuned: bool) -> None:
        source = self.tuned if tuned else self.originals
        for _, module, name, key in self.slots:
            setattr(module, name, source[key])
            _mark_swapped_in(self.tuned[key], tuned)

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        if not self.disabled:  # a deep copy or unpickled model holds its own tuned copies in its base modules
            for p in self.tuned.values():
                _mark_swapped_in(p, True)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        # to_empty() (a model built on the meta device) and conversions that make new Parameter objects give each
        # registration of a shared parameter one of its own: the module then trained one copy and save_pretrained
        # wrote the other, uninitialised. The modules take the tuned (or, disabled, the original) one again; after
        # unload() they are the user's model's, not ours to change.
        if not getattr(self, "restored", False):
            self._swap(tuned=not self.disabled)
        return out

    def adapter_parameters(self):
        return list(self.tuned.values())

    def own_tensors(self):
        # LayerNorm tuning under HF PEFT's keys (its layer copies are "ln_tuning_layers", adapter name removed)
        middle = "" if self.bitfit else "ln_tuning_layers."
        return {f"{PREFIX}{path}.{middle}{name}": self.tuned[key] for path, _, name, key in self.slots}

    def _slot_modules(self) -> list[tuple[str, nn.Module]]:
        return [(path, module) for path, module, _, _ in self.slots]

    def on_disabled(self, disabled: bool) -> None:
        # offloaded, the hooks load their own copy of the tuned values for each call: a swap changed nothing there
        refuse_offloaded(self._slot_modules(), f"swapping the tuned parameters {'out' if disabled else 'in'}",
                         f"{'disable' if disabled else 'enable'} or unload before offloading", root=self.model)
        self._swap(tuned=not disabled)

    def merge_adapter(self, adapter_names=None, safe_merge: bool = False) -> None:
        # the tuned parameters are the modules' own already: nothing to fold. unload(merge=True) keeps them; with
        # `safe_merge`, not if one holds a NaN or an inf
        if safe_merge:
            for key, value in self.tuned.items():
                if not torch.isfinite(value).all():
                    raise ValueError(f"safe_merge: the tuned {key} holds NaN or inf; nothing was merged")

    @torch.no_grad()
    def restore(self, merge: bool) -> None:
        # the original Parameter objects go back (references the user holds stay valid), with the tuned values
        # when merging
        refuse_offloaded(self._slot_modules(), "giving the original parameters back", "unload before offloading",
                         root=self.model)
        if merge:
            for key in self.tuned:
                self.originals[key].copy_(self.tuned[key])
        self._swap(tuned=False)
        self.restored = True  # the modules are the user's again: _apply leaves them be

    def export_adapter(self, name: str):
        config = self.peft_config[name]
        if not self.bitfit and (config.target_modules is None or config.layers_to_transform):
            # HF PEFT's defaults differ from "every norm", and it has no layers_to_transform: name the modules
            config = config.replace(target_modules=exact_regex([p for p, _ in self.modules_found]),
                                    layers_to_transform=None)
        return config, self.adapter_state_dict(name)
