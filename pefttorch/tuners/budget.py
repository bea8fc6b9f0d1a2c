"""Parameter budgets: the config of a method whose trainable parameters come closest to a share of the model's,
as in the machine-translation study of PEFT methods (Ustun and Cooper Stickland, 2022)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .adapter.config import AdapterConfig
from .adapter.model import find_sites
from .lora.config import LoraConfig
from .lora.model import _name_matches, plan_targets


@dataclass
class _Plan:
    unit: str  # what the budget moves: "r", "bottleneck"
    per_unit: int  # trainable parameters per unit
    fixed: int  # trainable parameters whatever the unit (biases, modules_to_save)
    most: int  # largest sensible unit

    def count(self, units: int) -> int:
        return self.fixed + units * self.per_unit


def _saved_parameters(model: nn.Module, modules_to_save) -> int:
    """Parameters of the modules trained in full (counted once)."""
    if not modules_to_save:
        return 0
    seen = {}
    for name, module in model.named_modules():
        if _name_matches(name, modules_to_save):
            seen.update({id(p): p.numel() for p in module.parameters()})
    return sum(seen.values())


def _lora_plan(model: nn.Module, kwargs: dict) -> _Plan:
    config = LoraConfig(r=1, **kwargs)
    targets = plan_targets(model, config)
    dims = [(t.module.in_features, t.module.out_features) if isinstance(t.module, nn.Linear)
            else tuple(t.module.weight.shape) for t in targets]
    return _Plan("r", sum(i + o for i, o in dims), _saved_parameters(model, config.modules_to_save),
                 min(min(d) for d in dims))


def _adapter_plan(model: nn.Module, kwargs: dict) -> _Plan:
    config = AdapterConfig(bottleneck=1, **kwargs)
    sites = find_sites(model, config)
    per_unit = sum(2 * s.features + 1 for s in sites)  # down (m x d + m) and up (d x m)
    fixed = sum(s.features * (3 if config.layer_norm else 1) for s in sites)  # up bias (+ LayerNorm)
    return _Plan("bottleneck", per_unit, fixed + _saved_parameters(model, config.modules_to_save),
                 max(s.features for s in sites))


METHODS = {"lora": (_lora_plan, LoraConfig), "adapter": (_adapter_plan, AdapterConfig)}


def config_for_budget(model: nn.Module, method: str, budget: float, *, verbose: bool = True, **kwargs):
    """The `method` config (``"lora"``: LoraConfig with r chosen; ``"adapter"``: AdapterConfig with the
    bottleneck chosen) whose trainable parameter count is closest to ``budget`` times `model`'s parameters.

    Other config fields pass through `kwargs` (e.g. ``target_modules``, ``style``). Prints the exact count and
    share (unless ``verbose=False``). A budget outside what the method can reach on this model (below its
    smallest unit or beyond its largest, by more than half a unit) is an error giving the reachable range.
    """
    if method not in METHODS:
        raise ValueError(f"config_for_budget: unknown or not yet supported method {method!r}; supported: "
                         f"{', '.join(METHODS)}")
    if not 0 < budget < 1:
        raise ValueError(f"config_for_budget: budget is a share of the model's parameters in (0, 1), got {budget!r}")
    plan_fn, config_cls = METHODS[method]
    if plan_fn is _lora_plan and "r" in kwargs or plan_fn is _adapter_plan and "bottleneck" in kwargs:
        raise ValueError(f"config_for_budget chooses {'r' if method == 'lora' else 'bottleneck'} itself")
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    plan = plan_fn(model, kwargs)
    target = budget * total
    low, high = plan.count(1), plan.count(plan.most)
    if not low - plan.per_unit / 2 <= target <= high + plan.per_unit / 2:
        raise ValueError(
            f"config_for_budget: {method} cannot reach {budget:.4%} of this model's {total:,d} parameters; "
            f"it reaches {low / total:.4%} ({plan.unit}=1, {low:,d}) to {high / total:.4%} "
            f"({plan.unit}={plan.most}, {high:,d})")
    units = min(max(round((target - plan.fixed) / plan.per_unit), 1), plan.most)
    config = config_cls(**{plan.unit: units, **kwargs})
    if verbose:
        count = plan.count(units)
        print(f"config_for_budget: {method} {plan.unit}={units}: {count:,d} trainable parameters, "
              f"{count / total:.4%} of {total:,d} (asked {budget:.4%})")
    return config
