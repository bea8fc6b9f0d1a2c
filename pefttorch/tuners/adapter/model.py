"""AdapterModel: bottleneck adapters hooked into a transformers model's layers.

The base model's modules stay where they are (its state dict keys do not change): forward hooks on the
attention output projections and on the FFN add the adapters, whose parameters live in this model's
``adapters`` dict. Saved format (ours; HF PEFT has no bottleneck adapters): ``adapter_config.json`` (the
AdapterConfig's fields, ``peft_type: "BOTTLENECK_ADAPTER"``) and ``adapter_model.safetensors`` with the
adapters under ``adapters.<site>.{down,up}.{weight,bias}`` (and ``layer_norm``), plus modules_to_save.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ...nn.adapter import BottleneckAdapter
from ..lora.layer import ModulesToSaveWrapper
from ..lora.model import _layer_index, _name_matches, _set_submodule
from .config import AdapterConfig

# Per model type: the attention output projections (self, then cross), and the FFN as (input module, output
# module), module names relative to a transformer layer. A parallel adapter reads the input module's input and
# adds to the output module's output; a sequential one follows the output module.
ARCHITECTURES = {
    "bert": (["attention.output.dense"], [], ("intermediate", "output.dense")),
    "llama": (["self_attn.o_proj"], [], ("mlp", "mlp")),
    "t5": (["SelfAttention.o"], ["EncDecAttention.o"], ("DenseReluDense", "DenseReluDense")),
    "marian": (["self_attn.out_proj"], ["encoder_attn.out_proj"], ("fc1", "fc2")),
}
ALIASES = {"roberta": "bert", "mistral": "llama", "qwen2": "llama", "gemma": "llama", "mt5": "t5", "mbart": "marian",
           "bart": "marian"}


@dataclass
class Site:
    key: str  # the adapter's name in `adapters` (the module path, dots replaced)
    kind: str  # "attention", "cross_attention", "ffn" (after) or "parallel"
    output: str  # the module whose output the adapter changes
    input: str | None  # parallel only: the module whose input the adapter reads
    features: int


def _features(module: nn.Module, side: str) -> int:
    """Input width of a linear layer or block (its first linear layer's), or output width (its last one's)."""
    linears = [module] if isinstance(module, nn.Linear) else [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"no linear layer in {type(module).__name__} to size an adapter by")
    return linears[0].in_features if side == "in" else linears[-1].out_features


def find_sites(model: nn.Module, config: AdapterConfig) -> list[Site]:
    """Where `config` puts adapters in `model`; raises for unsupported architectures."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = ARCHITECTURES.get(ALIASES.get(model_type, model_type))
    if arch is None:
        supported = sorted({*ARCHITECTURES, *ALIASES})
        raise ValueError(f"bottleneck adapters: model type {model_type!r} is not supported; supported are "
                         f"{', '.join(supported)}")
    attention, cross, (ffn_in, ffn_out) = arch
    after_attention, after_ffn, parallel = config.placement
    modules = dict(model.named_modules())
    sites = []
    for name in modules:
        index = _layer_index(name + ".", None)
        if index is None or (config.layers_to_transform and index not in config.layers_to_transform):
            continue
        wanted = []
        if after_attention:
            wanted += [("attention", s) for s in attention]
            wanted += [("cross_attention", s) for s in cross] if config.cross_attention else []
        if after_ffn or parallel:
            wanted.append(("parallel" if parallel else "ffn", ffn_out))
        for kind, suffix in wanted:
            if not name.endswith("." + suffix):
                continue
            prefix = name[: -len(suffix)]
            if kind in ("ffn", "parallel") and prefix + ffn_in not in modules:
                continue  # e.g. BERT's attention.output.dense also ends in output.dense
            if kind == "parallel":
                sites.append(Site(re.sub(r"\W", "_", name), kind, name, prefix + ffn_in,
                                  _features(modules[prefix + ffn_in], "in")))
            else:
                sites.append(Site(re.sub(r"\W", "_", name), kind, name, None, _features(modules[name], "out")))
    if not sites:
        raise ValueError(f"bottleneck adapters found no place in this {type(model).__name__} "
                         f"(layers_to_transform={config.layers_to_transform!r})")
    return sites


class _After:
    """Forward hook: the adapter applied to the module's output (sequential) or added to it (parallel, reading
    the input its partner hook kept)."""

    def __init__(self, owner: AdapterModel, site: Site) -> None:
        self.owner, self.site = owner, site

    def __call__(self, module, args, output):
        owner, site = self.owner, self.site
        x = owner._inputs.pop(site.key, None)
        if owner.disabled:
            return None
        adapter = owner.adapters[site.key]
        if site.kind == "parallel":
            if x is None:
                raise RuntimeError(f"the parallel adapter at {site.output} saw no input from {site.input}")
            return adapter(x, residual=output)
        return adapter(output)


class _Before:
    """Forward pre-hook of a parallel adapter's input module: keeps the input until the output module runs."""

    def __init__(self, owner: AdapterModel, site: Site) -> None:
        self.owner, self.site = owner, site

    def __call__(self, module, args):
        if not self.owner.disabled:
            self.owner._inputs[self.site.key] = args[0]


class AdapterModel(nn.Module):
    """A transformers model with bottleneck adapters (one adapter set, named by the PeftModel)."""

    def __init__(self, model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self.model = model
        self._requires_grad = {id(p): p.requires_grad for p in model.parameters()}
        self.sites = find_sites(model, config)
        if config.modules_to_save and not any(_name_matches(n, config.modules_to_save)
                                              for n, _ in model.named_modules()):
            raise ValueError(f"modules_to_save={config.modules_to_save} matched no module of the model")
        hidden = max(s.features for s in self.sites)
        weight = next(model.parameters())
        # as LoRA's autocast_adapter_dtype: fp32 adapters in a 16-bit model (cast to its dtype in forward)
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        self.adapters = nn.ModuleDict({
            s.key: BottleneckAdapter(s.features, config.width(hidden), config.activation, config.scaling,
                                     config.layer_norm, device=weight.device, dtype=dtype)
            for s in self.sites
        })
        self.peft_config = {adapter_name: config}
        self.active_adapters = [adapter_name]
        self.disabled = False
        self._inputs: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        self._handles = []
        for s in self.sites:
            self._handles.append(modules[s.output].register_forward_hook(_After(self, s)))
            if s.input is not None:
                self._handles.append(modules[s.input].register_forward_pre_hook(_Before(self, s)))
        for name, module in list(model.named_modules()):
            if config.modules_to_save and _name_matches(name, config.modules_to_save) \
                    and not isinstance(module, ModulesToSaveWrapper):
                _set_submodule(model, name, ModulesToSaveWrapper(module, adapter_name))
        self._mark_trainable()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def _wrappers(self):
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, ModulesToSaveWrapper)]

    def _mark_trainable(self) -> None:
        self.model.requires_grad_(False)
        config = self.peft_config[self.active_adapters[0]]
        if config.inference_mode:
            self.adapters.requires_grad_(False)
            return
        self.adapters.requires_grad_(True)
        for _, wrapper in self._wrappers():
            wrapper.modules_to_save.requires_grad_(True)

    # PeftModel's adapter management: one adapter set per model
    def inject_adapter(self, config, adapter_name: str) -> None:
        raise ValueError("a model with bottleneck adapters holds one adapter set")

    def set_adapter(self, names) -> None:
        names = [names] if isinstance(names, str) else list(names)
        if names != self.active_adapters:
            raise ValueError(f"unknown adapter(s) {names}; adapters are: {self.active_adapters}")

    def delete_adapter(self, name: str) -> None:
        raise ValueError("bottleneck adapters cannot be deleted one by one; use unload()")

    def set_adapters_disabled(self, disabled: bool) -> None:
        self.disabled = disabled
        self._inputs.clear()
        for _, wrapper in self._wrappers():
            wrapper.disable_adapters = disabled

    def merge_adapter(self, adapter_names=None) -> None:
        raise ValueError("bottleneck adapters cannot be merged into the base weights (a nonlinearity sits between "
                         "their projections); use unload() to remove them")

    def unmerge_adapter(self) -> None:
        return None

    def unload(self, merge: bool = False) -> nn.Module:
        if merge:
            self.merge_adapter()
        for h in self._handles:
            h.remove()
        self._handles = []
        for name, wrapper in self._wrappers():
            _set_submodule(self.model, name, wrapper.original_module)
        for p in self.model.parameters():
            p.requires_grad_(self._requires_grad.get(id(p), True))
        return self.model

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        out = {f"adapters.{k}": v for k, v in self.adapters.state_dict().items()}
        for path, wrapper in self._wrappers():
            for key, value in wrapper.modules_to_save[name].state_dict().items():
                out[f"{path}.{key}"] = value
        return {k: v.detach() for k, v in out.items()}

    def export_adapter(self, name: str):
        return self.peft_config[name], self.adapter_state_dict(name)
