"""Parameter budgets: the config of a method whose trainable parameters come closest to a share of the model's,
as in the machine-translation study of PEFT methods (Ustun and Cooper Stickland, 2022)."""

from __future__ import annotations

import itertools
import numbers
from collections import Counter
from dataclasses import dataclass

from torch import nn

from ._config import plain_number
from .adapter.config import AdapterConfig
from .adapter.model import find_sites
from .lora.config import LoraConfig
from .lora.layer import LoraLayer
from .lora.model import _is_bias, _layer_index, _pattern_value, plan_targets, saves_module
from .prompt.config import PrefixTuningConfig, PromptTuningConfig
from .prompt.prefix import attention_shape
from .scaling.config import IA3Config, SsfConfig
from .scaling.model import find_sites as vector_sites
from .selective.config import BitFitConfig, LNTuningConfig
from .selective.model import chosen_parameters


@dataclass
class _Plan:
    unit: str  # what the budget moves: "r", "bottleneck", "num_virtual_tokens", "layers"
    per_unit: int  # trainable parameters one unit adds (about: the tolerance is half of it)
    fixed: int  # trainable parameters whatever the unit (biases, modules_to_save)
    most: int  # largest sensible unit
    layer_counts: list[int] | None = None  # "layers": parameters of the top 1, 2, ... layers
    top_layers: list[int] | None = None  # "layers": layer indices from the top

    def count(self, units: int) -> int:
        if self.layer_counts is not None:
            return self.fixed + self.layer_counts[units - 1]
        return self.fixed + units * self.per_unit


def _saved_parameters(model: nn.Module, modules_to_save, also=()) -> int:
    """Parameters of the modules trained in full, and `also` (other parameters trained whatever the unit), each
    counted once (a bias may be both)."""
    seen = {id(p): p.numel() for p in also}
    if modules_to_save:
        for name, module in model.named_modules(remove_duplicate=False):  # the names the wrapping matches
            if saves_module(name, modules_to_save):
                seen.update({id(p): p.numel() for p in module.parameters()})
    return sum(seen.values())


def _lora_plan(model: nn.Module, kwargs: dict) -> _Plan:
    config = LoraConfig(r=1, **kwargs)
    targets = plan_targets(model, config)
    dims = {t.name: (t.module.in_features, t.module.out_features) if isinstance(t.module, nn.Linear)
            else tuple(t.module.weight.shape) for t in targets}
    # a layer whose rank rank_pattern sets keeps it whatever r: part of the fixed count, not of the unit
    scaled = [t.name for t in targets if _pattern_value(config.rank_pattern, t.name, None) is None]
    if not scaled:
        raise ValueError("config_for_budget: rank_pattern sets the rank of every targeted layer, so r changes "
                         "nothing; leave some layers to r")
    pinned = sum(t.r * sum(dims[t.name]) for t in targets if t.name not in scaled)
    # the biases that train as well (bias="lora_only" / "all"), picked as the LoRA tuner picks them
    if config.bias == "lora_only":
        bases = (t.module.base_layer if isinstance(t.module, LoraLayer) else t.module for t in targets)
        biases = [b.bias for b in bases if b.bias is not None]
    elif config.bias == "all":
        biases = [p for n, p in model.named_parameters() if _is_bias(n) and ".original_module." not in n]
    else:
        biases = []
    return _Plan("r", sum(sum(dims[n]) for n in scaled),
                 pinned + _saved_parameters(model, config.modules_to_save, biases),
                 min(min(dims[n]) for n in scaled))


def _adapter_plan(model: nn.Module, kwargs: dict) -> _Plan:
    config = AdapterConfig(bottleneck=1, **kwargs)
    sites = find_sites(model, config)
    per_unit = sum(2 * s.features + 1 for s in sites)  # down (m x d + m) and up (d x m)
    fixed = sum(s.features * (3 if config.layer_norm else 1) for s in sites)  # up bias (+ LayerNorm)
    return _Plan("bottleneck", per_unit, fixed + _saved_parameters(model, config.modules_to_save),
                 max(s.features for s in sites))


def _half_context(model: nn.Module) -> int:
    """The most virtual tokens: a prompt or prefix longer than half the context leaves too little for the input."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 1024
    return max(1, context // 2)


def _prompt_plan(model: nn.Module, kwargs: dict) -> _Plan:
    config = PromptTuningConfig(num_virtual_tokens=1, **kwargs)
    # HF PEFT's seq2seq layout (num_transformer_submodules=2) holds a row per token per submodule, all trainable
    width = model.get_input_embeddings().embedding_dim * (config.num_transformer_submodules or 1)
    return _Plan("num_virtual_tokens", width, _saved_parameters(model, config.modules_to_save), _half_context(model))


def _prefix_plan(model: nn.Module, kwargs: dict) -> _Plan:
    config = PrefixTuningConfig(num_virtual_tokens=1, **kwargs)
    layers, heads, head_dim, _ = attention_shape(model)
    token_dim = heads * head_dim
    fixed = _saved_parameters(model, config.modules_to_save)
    if not config.prefix_projection:  # the prefix itself: keys and values of every layer per token
        return _Plan("num_virtual_tokens", 2 * layers * token_dim, fixed, _half_context(model))
    hidden, out = config.encoder_hidden_size or token_dim, 2 * layers * token_dim
    mlp = token_dim * hidden + hidden + hidden * out + out  # the reparameterisation, whatever the length
    return _Plan("num_virtual_tokens", token_dim, fixed + mlp, _half_context(model))


def _layers_plan(config_cls, sites):
    """A plan whose unit is the number of layers adapted, counted from the top (the layers next to the output
    first); `sites(model, config)` gives (module path, trainable parameters) of each place the method trains."""

    def plan(model: nn.Module, kwargs: dict) -> _Plan:
        if "layers_to_transform" in kwargs:
            raise ValueError("config_for_budget chooses layers_to_transform itself")
        config = config_cls(**kwargs)
        per_layer, fixed = Counter(), _saved_parameters(model, config.modules_to_save)
        for path, count in sites(model, config):
            index = _layer_index(path + ".", None)
            if index is not None:  # modules outside the numbered layers are left out by layers_to_transform
                per_layer[index] += count
        if not per_layer:
            raise ValueError(f"config_for_budget: {config_cls.__name__} found no numbered layers to count in")
        top = sorted(per_layer, reverse=True)
        counts = list(itertools.accumulate(per_layer[i] for i in top))
        return _Plan("layers", max(per_layer.values()), fixed, len(top), counts, top)

    return plan


def _vector_sites(model, config):
    return [(s.path, s.features * (1 if isinstance(config, IA3Config) else 2)) for s in vector_sites(model, config)]


def _selective_sites(model, config):
    return [(path, sum(m._parameters[n].numel() for n in names)) for path, m, names in chosen_parameters(model, config)]


METHODS = {
    "lora": (_lora_plan, LoraConfig),
    "adapter": (_adapter_plan, AdapterConfig),
    "prompt": (_prompt_plan, PromptTuningConfig),
    "prefix": (_prefix_plan, PrefixTuningConfig),
    "ia3": (_layers_plan(IA3Config, _vector_sites), IA3Config),
    "ssf": (_layers_plan(SsfConfig, _vector_sites), SsfConfig),
    "bitfit": (_layers_plan(BitFitConfig, _selective_sites), BitFitConfig),
    "ln_tuning": (_layers_plan(LNTuningConfig, _selective_sites), LNTuningConfig),
}


def config_for_budget(model: nn.Module, method: str, budget: float, *, verbose: bool = True, **kwargs):
    """The `method` config whose trainable parameter count is closest to ``budget`` times `model`'s parameters.

    What the budget moves, per method: ``"lora"`` the rank r (the biases ``bias`` trains and the layers whose rank
    ``rank_pattern`` sets count as a fixed part); ``"adapter"`` the bottleneck width; ``"prompt"``
    and ``"prefix"`` the number of virtual tokens (at most half the context; a prefix's reparameterisation MLP,
    with ``prefix_projection=True``, counts as a fixed part); ``"ia3"``, ``"ssf"``, ``"bitfit"`` and
    ``"ln_tuning"`` the number of layers adapted (``layers_to_transform``), counted from the top: the layers
    next to the output first; modules outside the numbered layers, such as a final norm, are then left out.
    Other config fields pass through `kwargs` (e.g. ``target_modules``, ``style``). Prints the exact count and
    share (unless ``verbose=False``). A budget outside what the method can reach on this model (below its
    smallest unit or beyond its largest, by more than half a unit) is an error giving the reachable range.
    """
    if method not in METHODS:
        raise ValueError(f"config_for_budget: unknown or not yet supported method {method!r}; supported: "
                         f"{', '.join(METHODS)}")
    budget = plain_number(budget)  # a numpy scalar or 0-d tensor from a sweep: a plain float
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not 0 < budget < 1:
        raise ValueError(f"config_for_budget: budget is a share of the model's parameters, a real number in (0, 1), "
                         f"got {budget!r}")
    plan_fn, config_cls = METHODS[method]
    for unit in ("r", "bottleneck", "num_virtual_tokens"):
        if unit in kwargs:
            raise ValueError(f"config_for_budget chooses {unit} itself")
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    plan = plan_fn(model, kwargs)
    target = budget * total
    low, high = plan.count(1), plan.count(plan.most)
    if not low - plan.per_unit / 2 <= target <= high + plan.per_unit / 2:
        raise ValueError(
            f"config_for_budget: {method} cannot reach {budget:.4%} of this model's {total:,d} parameters; "
            f"it reaches {low / total:.4%} ({plan.unit}=1, {low:,d}) to {high / total:.4%} "
            f"({plan.unit}={plan.most}, {high:,d})")
    units = min(range(1, plan.most + 1), key=lambda u: abs(plan.count(u) - target))
    if plan.top_layers is None:
        config = config_cls(**{plan.unit: units, **kwargs})
    else:
        config = config_cls(layers_to_transform=sorted(plan.top_layers[:units]), **kwargs)
    if verbose:
        count = plan.count(units)
        print(f"config_for_budget: {method} {plan.unit}={units}: {count:,d} trainable parameters, "
              f"{count / total:.4%} of {total:,d} (asked {budget:.4%})")
    return config
