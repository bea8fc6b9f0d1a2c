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
from .._hooked import HookedModel
from ..lora.model import _in_modules_to_save, _layer_index, adapter_dtype
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
            hooked = [name, prefix + ffn_in] if kind == "parallel" else [name]
            if any(_in_modules_to_save(n, config.modules_to_save) for n in hooked):
                # as LoRA's and IA3's targets: the wrapper runs a deep copy of the module, whose hooks would call a
                # copy of this model's adapters; the real ones (trained, saved) would never run
                continue
            if kind == "parallel":
                sites.append(Site(re.sub(r"\W", "_", name), kind, name, prefix + ffn_in,
                                  _features(modules[prefix + ffn_in], "in")))
            else:
                sites.append(Site(re.sub(r"\W", "_", name), kind, name, None, _features(modules[name], "out")))
    if not sites:
        raise ValueError(f"bottleneck adapters found no place in this {type(model).__name__} "
                         f"(layers_to_transform={config.layers_to_transform!r})")
    return sites


def build_adapters(model: nn.Module, sites: list[Site], config: AdapterConfig,
                   autocast_adapter_dtype: bool = True) -> nn.ModuleDict:
    """One adapter of `config` per site, on the model's device, in :func:`adapter_dtype` of the model's dtype (its
    first parameter's: a site's output is no one weight's)."""
    hidden = max(s.features for s in sites)
    weight = next(model.parameters())
    dtype = adapter_dtype(weight.dtype, autocast_adapter_dtype)
    return nn.ModuleDict({
        s.key: BottleneckAdapter(s.features, config.width(hidden), config.activation, config.scaling,
                                 config.layer_norm, device=weight.device, dtype=dtype)
        for s in sites
    })


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
        if site.kind == "parallel":
            if x is None:
                raise RuntimeError(f"the parallel adapter at {site.output} saw no input from {site.input}")
            return owner.apply(site, x, residual=output)
        return owner.apply(site, output, residual=output)


class _Before:
    """Forward pre-hook of a parallel adapter's input module: keeps the input until the output module runs."""

    def __init__(self, owner: AdapterModel, site: Site) -> None:
        self.owner, self.site = owner, site

    def __call__(self, module, args):
        if not self.owner.disabled:
            self.owner._inputs[self.site.key] = args[0]


class AdapterModel(HookedModel):
    """A transformers model with bottleneck adapters (one adapter set, named by the PeftModel)."""

    method = "bottleneck adapters"
    key_prefix = ""  # this format's modules_to_save keys are the module paths

    def __init__(self, model: nn.Module, config: AdapterConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True) -> None:
        super().__init__(model, config, adapter_name)
        self.sites = find_sites(model, config)
        self.adapters = build_adapters(model, self.sites, config, autocast_adapter_dtype)
        self._inputs: dict[str, torch.Tensor] = {}
        self._hook_sites()
        self.finish()

    def _hook_sites(self) -> None:
        modules = dict(self.model.named_modules())
        for s in self.sites:
            self.hook(modules[s.output].register_forward_hook(_After(self, s)))
            if s.input is not None:
                self.hook(modules[s.input].register_forward_pre_hook(_Before(self, s)))

    def apply(self, site: Site, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """What the adapter at `site` makes of its input `x` (the block's output, or a parallel adapter's block
        input) and the block's output `residual`."""
        return self.adapters[site.key](x, residual=residual)

    def adapter_parameters(self):
        return list(self.adapters.parameters())

    def own_tensors(self):
        return {f"adapters.{k}": v for k, v in self.adapters.state_dict().items()}

    def on_disabled(self, disabled: bool) -> None:
        self._inputs.clear()

    def merge_adapter(self, adapter_names=None, safe_merge: bool = False) -> None:
        raise ValueError("bottleneck adapters cannot be merged into the base weights (a nonlinearity sits between "
                         "their projections); use unload() to remove them")
