"""``pefttorch.accelerate``: pefttorch's fused kernel inside a model built by HF PEFT, in place.

Each HF PEFT ``lora.Linear`` it can serve gets pefttorch's forward as an instance attribute; the layer
object, its class, its parameters and its adapters stay HF PEFT's, so the user's optimizer, PEFT's
``save_pretrained``, adapter switching and merging all keep working. ``deaccelerate`` removes it.
"""

from __future__ import annotations

import functools
import logging
import types
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..functional import plain_tensor
from ..tuners.lora.layer import dropout_p, has_linear_forward, is_linear, lora_forward

logger = logging.getLogger("pefttorch")


@dataclass
class AccelerateReport:
    """What :func:`accelerate` (or :func:`pefttorch.fuse_norms`) switched to a fused kernel, and what it left
    alone and why."""

    switched: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    title: str = "pefttorch.accelerate"
    what: str = "LoRA layer(s) switched to pefttorch kernels"

    def __str__(self) -> str:
        lines = [f"{self.title}: {len(self.switched)} {self.what}, "
                 f"{len(self.skipped)} left as they were"]
        by_reason: dict[str, list[str]] = {}
        for name, reason in self.skipped.items():
            by_reason.setdefault(reason, []).append(name)
        for reason, names in by_reason.items():
            lines.append(f"  not switched ({reason}): {', '.join(names[:4])}" + (" ..." if len(names) > 4 else ""))
        return "\n".join(lines)


def _peft_lora():
    try:
        from peft.tuners.lora import layer as peft_lora_layer
    except ImportError as err:
        raise ImportError("pefttorch.accelerate works on models built by HF PEFT: install peft") from err
    return peft_lora_layer


def _unsupported(layer) -> str | None:
    """Why this HF PEFT LoRA layer cannot be served (None: it can)."""
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer.base_layer
    if not is_linear(base):
        return f"base layer is {type(base).__name__}, not nn.Linear/Conv1D (e.g. quantized)"
    if not has_linear_forward(base):
        return f"base layer {type(base).__name__} has a forward of its own"
    if not (plain_tensor(base.weight) and plain_tensor(base.bias)):
        return f"base weight is a {type(base.weight).__name__}, a tensor subclass (e.g. quantized)"
    if any(getattr(layer, "use_dora", {}).values()):
        return "DoRA"
    if any(getattr(layer, "lora_bias", {}).values()):
        return "lora_bias"
    if any(dropout_p(d)[0] >= 1 for d in layer.lora_dropout.values()):
        return "lora_dropout=1, beyond the fused op's p < 1"
    variants = getattr(layer, "lora_variant", None)  # adapter name -> variant object
    if variants:
        return f"LoRA variant {sorted({type(v).__name__ for v in variants.values()})}"
    return None


def _accelerated_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    # Per-call features pefttorch does not serve go to HF PEFT's own forward: extra arguments (e.g. the
    # adapter_names of mixed-batch inference) and adapters that became unsupported after the switch.
    if args or kwargs or _unsupported(self) is not None:
        return type(self).forward(self, x, *args, **kwargs)
    return lora_forward(self, x)


def accelerate(model: nn.Module, verbose: bool = True) -> AccelerateReport:
    """Switches the LoRA ``Linear`` layers of a model built by HF PEFT (``peft.get_peft_model`` or
    ``PeftModel.from_pretrained``) to pefttorch's fused kernel, in place; outputs and gradients are
    those of HF PEFT within floating-point tolerance.

    Layers it cannot serve (DoRA, quantized base layers, LoRA on embeddings or convolutions, ...) stay
    as they were. Returns a report of what was switched and why the rest was not (also logged at INFO
    when `verbose`). :func:`deaccelerate` undoes it.
    """
    peft_lora = _peft_lora()
    report = AccelerateReport()
    for name, module in model.named_modules():
        if isinstance(module, peft_lora.Linear):
            reason = FOREIGN if foreign_forward(module) else _unsupported(module)
            if reason is None:
                set_forward(module, _accelerated_forward)
                report.switched.append(name)
            else:
                report.skipped[name] = reason
        elif isinstance(module, peft_lora.LoraLayer):
            report.skipped[name] = f"{type(module).__name__} LoRA layers are not served"
    if not report.switched and not report.skipped:
        # nothing to switch is most likely the wrong model, not a model with nothing to serve
        warnings.warn(f"pefttorch.accelerate: {type(model).__name__} has no HF PEFT LoRA layer; it serves models "
                      "built by peft.get_peft_model or peft.PeftModel.from_pretrained (a pefttorch model runs "
                      "pefttorch's kernels already)", stacklevel=2)
    if verbose:
        logger.info("%s", report)
    return report


def deaccelerate(model: nn.Module) -> int:
    """Gives every layer switched by :func:`accelerate` its HF PEFT forward back; returns how many."""
    return remove_forward(model, _accelerated_forward)


def is_accelerated(module: nn.Module) -> bool:
    return has_forward(module, _accelerated_forward)


# The switch itself: a forward bound as an instance attribute shadows the class's, and deleting it restores the
# class's. The module keeps its class, parameters and state-dict keys. Bound with functools.partial, not as a
# method: deepcopy and pickle rebuild a partial around the copied module, while a pickled bound method is looked up
# by name on the module when loading, and no attribute has that name (torch.load of a whole model failed).
#
# 🤗 Accelerate's hooks (device_map dispatch, offloading) already hold the instance forward: theirs runs the hook
# and then calls `_old_forward`, the module's computation. There the switch goes into `_old_forward`, so the hook
# keeps running around the fused forward; what `_old_forward` held is kept aside and put back by the undo.
_PRIOR = "_pefttorch_prior_forward"


def _slot(module: nn.Module) -> str:
    """The attribute that holds `module`'s computation."""
    if getattr(module, "_hf_hook", None) is not None and "_old_forward" in module.__dict__:
        return "_old_forward"
    return "forward"


def _is(forward, fn) -> bool:
    return isinstance(forward, functools.partial) and forward.func is fn


def _ours(forward) -> bool:
    return isinstance(forward, functools.partial) and getattr(forward.func, "__module__", "").startswith("pefttorch.")


def foreign_forward(module: nn.Module) -> bool:
    """Whether other code already replaced `module`'s forward by an instance attribute (other than an 🤗 Accelerate
    hook, which :func:`set_forward` works with): switching it would silently drop that code."""
    forward = module.__dict__.get("forward")
    # the class's own forward, bound (what 🤗 Accelerate's remove_hook_from_module leaves behind), drops nothing
    own = isinstance(forward, types.MethodType) and forward.__func__ is type(module).forward
    return _slot(module) == "forward" and forward is not None and not own and not _ours(forward)


FOREIGN = "its forward was already replaced by other code, which the switch would drop"


def set_forward(module: nn.Module, fn) -> None:
    slot = _slot(module)
    current = module.__dict__.get(slot)
    if slot == "_old_forward" and not _ours(current):
        module.__dict__[_PRIOR] = current
    setattr(module, slot, functools.partial(fn, module))


def has_forward(module: nn.Module, fn) -> bool:
    return _is(module.__dict__.get(_slot(module)), fn)


def remove_forward(model: nn.Module, fn) -> int:
    """Removes `fn` wherever it was set in `model`; returns how many modules had it."""
    count = 0
    for module in model.modules():
        if not has_forward(module, fn):
            continue
        if _slot(module) == "forward":
            del module.forward
        else:  # under an 🤗 Accelerate hook: what it called before (the class's forward if the hook came after us)
            prior = module.__dict__.pop(_PRIOR, None)
            module._old_forward = prior if prior is not None else types.MethodType(type(module).forward, module)
        count += 1
    return count
