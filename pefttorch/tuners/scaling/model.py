"""VectorModel: (IA)^3 and SSF, learned per-feature vectors applied by forward hooks.

A site is a targeted module and which side of it the vectors act on: its output (``y * scale (+ shift)``) or,
for (IA)^3's feedforward modules, its input. The vectors are elementwise and cheap next to the layer's GEMM, so
they run as plain PyTorch ops (one fused multiply(-add) kernel each); merging folds them into the weights.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ...nn.lora import refuse_computed_weights, refuse_offloaded
from .._hooked import HookedModel, exact_regex, find_modules, refuse_shared_modules
from ..lora.layer import is_linear, linear_dims
from ..lora.model import PREFIX, _matches, adapter_dtype, warn_of_tied_weights
from .config import IA3_ALIASES, IA3_DEFAULTS, IA3Config, SsfConfig


def is_norm(module: nn.Module) -> bool:
    """A LayerNorm or RMSNorm-like module with a per-feature weight (transformers' norms are their own
    classes, named ...LayerNorm / ...RMSNorm)."""
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    return (isinstance(module, nn.LayerNorm) or name.endswith(("LayerNorm", "RMSNorm"))) \
        and isinstance(weight, torch.Tensor) and weight.dim() == 1


@dataclass
class Site:
    path: str
    module: nn.Module
    features: int  # length of the vectors
    on_input: bool  # (IA)^3 feedforward: scales the module's input


def ia3_targets(model: nn.Module, config: IA3Config):
    """(target spec, feedforward spec): the config's, or the defaults for the model type."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    defaults = IA3_DEFAULTS.get(IA3_ALIASES.get(model_type, model_type))
    if config.target_modules is not None:
        if config.feedforward_modules is not None:
            return config.target_modules, config.feedforward_modules
        # as HF PEFT: unset feedforward modules are the model type's (those among the targets count), or none
        return config.target_modules, defaults[1] if defaults else []
    if defaults is None and config.feedforward_modules is None:
        raise ValueError(f"IA3Config.target_modules is not set and pefttorch has no default for model type "
                         f"{model_type!r}; set target_modules (and feedforward_modules); defaults exist for: "
                         f"{', '.join(sorted({*IA3_DEFAULTS, *IA3_ALIASES}))}")
    if defaults is None:
        raise ValueError("IA3Config: feedforward_modules must be among target_modules, which is not set")
    feedforward = config.feedforward_modules
    if feedforward is None:
        return defaults
    # the config checks this where both are given; against the defaults it was not, and a feedforward module outside
    # them was silently not adapted (and the saved config, naming both, refused by the check)
    lists = isinstance(feedforward, list) and isinstance(defaults[0], list)  # (a regex is not checked, as there)
    extra = sorted(set(feedforward) - set(defaults[0])) if lists else []
    if extra:
        raise ValueError(f"IA3Config: feedforward_modules must be among target_modules, here the defaults for model "
                         f"type {model_type!r} ({defaults[0]}); not there: {extra}. Set target_modules too")
    return defaults[0], feedforward


def find_sites(model: nn.Module, config: IA3Config | SsfConfig) -> list[Site]:
    """Where `config` puts vectors in `model`, found without changing it."""
    if isinstance(config, IA3Config):
        spec, feedforward = ia3_targets(model, config)
        modules = find_modules(model, spec, config, is_linear, "linear layers")
        refuse_shared_modules(model, modules, "(IA)^3 vectors")  # (SSF is pefttorch's own: the module's, throughout)
        return [Site(path, m, linear_dims(m)[0 if on_input else 1], on_input)
                for path, m in modules for on_input in [bool(feedforward) and _matches(feedforward, path)]]
    modules = find_modules(model, config.target_modules, config, lambda m: is_linear(m) or is_norm(m),
                           "linear layers and LayerNorm/RMSNorm modules")
    return [Site(path, m, linear_dims(m)[1] if is_linear(m) else m.weight.numel(), False) for path, m in modules]


class _Output:
    """Forward hook: ``y * scale (+ shift)`` over the last dimension."""

    def __init__(self, owner: VectorModel, key: str) -> None:
        self.owner, self.key = owner, key

    def __call__(self, module, args, output):
        owner = self.owner
        if owner.disabled or owner.merged:
            return None
        scale = owner.scales[self.key].view(-1).to(output.dtype)
        if self.key in owner.shifts:
            return torch.addcmul(owner.shifts[self.key].to(output.dtype), output, scale)
        return output * scale


class _Input:
    """Forward pre-hook: the module's input times the (IA)^3 vector."""

    def __init__(self, owner: VectorModel, key: str) -> None:
        self.owner, self.key = owner, key

    def __call__(self, module, args):
        owner = self.owner
        if owner.disabled or owner.merged:
            return None
        x = args[0]
        return (x * owner.scales[self.key].view(-1).to(x.dtype), *args[1:])


class VectorModel(HookedModel):
    """A model with (IA)^3 or SSF vectors (one adapter set, named by the PeftModel)."""

    def __init__(self, model: nn.Module, config: IA3Config | SsfConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True) -> None:
        super().__init__(model, config, adapter_name)
        self.ia3 = isinstance(config, IA3Config)
        self.method = "(IA)^3 vectors" if self.ia3 else "SSF vectors"
        self.sites = find_sites(model, config)
        self.keys = [re.sub(r"\W", "_", s.path) for s in self.sites]
        random = not (config.init_ia3_weights if self.ia3 else config.init_ssf_weights)
        self.scales, self.shifts = nn.ParameterDict(), nn.ParameterDict()
        for key, s in zip(self.keys, self.sites, strict=True):
            # (IA)^3 vectors are stored in HF PEFT's shapes: (out, 1), or (1, in) on a feedforward input
            shape = ((1, s.features) if s.on_input else (s.features, 1)) if self.ia3 else (s.features,)
            # each vector in its module's dtype (as HF PEFT): T5 keeps `wo` in float32 in a 16-bit model, whose
            # vector was rounded to 16 bits (on load too) with autocast_adapter_dtype=False
            device, dtype = s.module.weight.device, adapter_dtype(s.module.weight.dtype, autocast_adapter_dtype)
            scale = torch.ones(shape, device=device, dtype=dtype)
            self.scales[key] = nn.Parameter(scale + 0.1 * torch.randn_like(scale) if random else scale)
            if not self.ia3:
                shift = torch.zeros(s.features, device=device, dtype=dtype)
                self.shifts[key] = nn.Parameter(0.1 * torch.randn_like(shift) if random else shift)
        self.merged = False
        for key, s in zip(self.keys, self.sites, strict=True):
            if s.on_input:
                self.hook(s.module.register_forward_pre_hook(_Input(self, key)))
            else:
                self.hook(s.module.register_forward_hook(_Output(self, key)))
        self._created_biases: list[nn.Module] = []
        self.finish()

    def adapter_parameters(self):
        return [*self.scales.values(), *self.shifts.values()]

    def own_tensors(self):
        out = {}
        for key, s in zip(self.keys, self.sites, strict=True):
            if self.ia3:
                out[f"{PREFIX}{s.path}.ia3_l"] = self.scales[key]  # HF PEFT's key, adapter name removed
            else:
                out[f"{PREFIX}{s.path}.ssf_scale"] = self.scales[key]
                out[f"{PREFIX}{s.path}.ssf_shift"] = self.shifts[key]
        return out

    def on_disabled(self, disabled: bool) -> None:
        if disabled and self.merged:
            self.unmerge_adapter()  # the base model's own weights serve while disabled

    def export_adapter(self, name: str):
        config = self.peft_config[name]
        if self.ia3 and config.layers_to_transform:
            # HF PEFT's IA3Config has no layers_to_transform: name exactly the modules adapted
            config = config.replace(target_modules=exact_regex([s.path for s in self.sites]),
                                    feedforward_modules=exact_regex([s.path for s in self.sites if s.on_input]) or [],
                                    layers_to_transform=None)  # ([] for none, as below: null is HF's defaults)
        elif self.ia3 and config.target_modules is None:
            # our defaults, written out: HF PEFT's own differ (e.g. BERT's attention output as feedforward)
            target, feedforward = ia3_targets(self.model, config)
            config = config.replace(target_modules=target, feedforward_modules=feedforward)
        elif self.ia3 and config.feedforward_modules is None:
            # the model type's, written out as the modules they picked here ([] for none: HF PEFT reads null as
            # its own defaults, which may differ, and a list of them not among the targets as an error)
            config = config.replace(feedforward_modules=exact_regex([s.path for s in self.sites if s.on_input]) or [])
        return config, self.adapter_state_dict(name)

    # ------------------------------------------------------------------ merging

    def _check_mergeable(self) -> None:
        refuse_computed_weights("merging", [(s.path, s.module) for s in self.sites])
        integer = [s.path for s in self.sites if not s.module.weight.is_floating_point()]
        if integer:
            # a quantized layer's integers: the scaled weight was rounded (and wrapped) back into them in silence
            raise ValueError(f"{self.method} cannot be merged into {integer[:3]}{' ...' if len(integer) > 3 else ''}: "
                             "its weight is not floating point (a quantized layer); unload() without merging")
        for s in self.sites:
            if is_linear(s.module) or isinstance(s.module, nn.LayerNorm):
                continue
            # other norms (RMSNorm): the scale folds into the weight only if it multiplies plainly, which
            # pefttorch cannot know for a foreign class; the shift needs a bias it does not have
            raise ValueError(f"SSF on {s.path} ({type(s.module).__name__}) cannot be merged: only linear layers and "
                             f"nn.LayerNorm take a scale and shift into their weights; exclude it or unload() "
                             f"without merging")

    @torch.no_grad()
    def merge_adapter(self, adapter_names=None, safe_merge: bool = False) -> None:
        """Folds the vectors into the targeted modules' weights and biases (the hooks then pass through). With
        `safe_merge`, every folded weight and bias is formed first, and a NaN or inf in one raises a ValueError that
        names the module, with nothing merged."""
        if self.merged:
            return
        refuse_offloaded([(s.path, s.module) for s in self.sites], "a merge", root=self.model)
        self._check_mergeable()
        warn_of_tied_weights(self.model, [(s.path, f"{s.path}.weight", s.module.weight) for s in self.sites],
                             stacklevel=5)  # (torch.no_grad's wrapper is a frame too)
        vectors = [(s, self.scales[key].view(-1), self.shifts[key] if key in self.shifts else None)
                   for key, s in zip(self.keys, self.sites, strict=True)]
        if safe_merge:
            for s, scale, shift in vectors:
                if not all(torch.isfinite(t).all() for t in self._folded(s, scale, shift) if t is not None):
                    raise ValueError(f"safe_merge: merging into {s.path} gives a weight or bias with NaN or inf; "
                                     "nothing was merged")
        for s, scale, shift in vectors:
            self._fold(s, scale, shift)
        self.merged = True

    @torch.no_grad()
    def unmerge_adapter(self) -> None:
        """Takes the vectors out of the weights again (exact up to rounding; a scale of zero cannot be undone)."""
        if not self.merged:
            return
        refuse_offloaded([(s.path, s.module) for s in self.sites], "an unmerge", root=self.model)
        vectors = [(s, self.scales[key].view(-1), self.shifts[key] if key in self.shifts else None)
                   for key, s in zip(self.keys, self.sites, strict=True)]
        # every site is checked before any weight changes: a raise midway left the earlier sites divided and the
        # model still marked merged (a second unmerge divided them again)
        for s, scale, _ in vectors:
            if bool((scale.abs() < 1e-6).any()):
                raise ValueError(f"{s.path}: a merged scale is (near) zero, so it cannot be divided out again; "
                                 "nothing was unmerged")
        for s, scale, shift in vectors:
            self._fold(s, 1 / scale, None if shift is None else -shift / scale)
        for module in self._created_biases:
            module.bias = None
        self._created_biases = []
        self.merged = False

    @staticmethod
    def _folded(site: Site, scale: torch.Tensor,
                shift: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias (None: the module keeps none) with which `site`'s module alone computes what it did
        with the vectors applied; a shift on a module without a bias folds into a zero bias."""
        m = site.module
        w = m.weight
        # float32 arithmetic for half weights (one rounding to their dtype), float64 for float64 ones
        acc = torch.promote_types(w.dtype, torch.float32)
        s = scale.to(device=w.device, dtype=acc)
        if isinstance(m, nn.Linear) or is_norm(m):
            # nn.Linear stores (out, in): an output scale is a row scale, an input scale a column scale
            shaped = s.view(1, -1) if site.on_input else s.view(-1, *([1] * (w.dim() - 1)))
        else:  # transformers' Conv1D stores (in, out)
            shaped = s.view(-1, 1) if site.on_input else s.view(1, -1)
        weight = (w.to(acc) * shaped).to(w.dtype)
        b = m.bias
        if site.on_input or (b is None and shift is None):
            return weight, None
        b = torch.zeros(site.features, device=w.device, dtype=w.dtype) if b is None else b
        bias = b.to(acc) * s + (0 if shift is None else shift.to(device=b.device, dtype=acc))
        return weight, bias.to(b.dtype)

    def _fold(self, site: Site, scale: torch.Tensor, shift: torch.Tensor | None) -> None:
        """Folds the vectors into `site`'s module (see _folded)."""
        m = site.module
        weight, bias = self._folded(site, scale, shift)
        m.weight.copy_(weight)
        if bias is None:
            return
        if m.bias is None:
            m.bias = nn.Parameter(bias, requires_grad=False)
            self._created_biases.append(m)
        else:
            m.bias.copy_(bias)

    def unload(self, merge: bool = False) -> nn.Module:
        if not merge and self.merged:
            self.unmerge_adapter()
        if merge:
            self.merge_adapter()  # (the base unload merges too: merged already, it does nothing more)
            ids = {id(m) for m in self._created_biases}
            created = [n for n, m in self.model.named_modules() if id(m) in ids]
            if created and hasattr(getattr(self.model, "config", None), "to_json_string"):
                # transformers builds a layer's bias from the config (attention_bias, mlp_bias, ...), not the
                # checkpoint: from_pretrained of the saved merged model dropped these biases (only a load report)
                warnings.warn(f"merging put the shifts into new biases on {len(created)} module(s) that had none "
                              f"({created[0]}{', ...' if len(created) > 1 else ''}), which the model's config does "
                              "not declare: transformers' from_pretrained of its save_pretrained drops them. Keep the "
                              "adapter unmerged (save_pretrained of the PEFT model) to reload it, or load the merged "
                              "model's state_dict into a model built with biases", UserWarning, stacklevel=3)
            self._created_biases = []  # merged for good
        return super().unload(merge)

