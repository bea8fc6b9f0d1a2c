"""An AdamW that keeps per-component state for adapters whose rank changes (IncreLoRA, AdaLoRA).

Parameters of a ranked layer (see :mod:`pefttorch.tuners.rank.layer`) hold many rank-1 components on
their first dimension, and only a prefix of them trains. A stock optimizer sees one tensor and gets
three things wrong as the rank changes: it updates components that should not train (weight decay and
momentum move them), it carries the moments of a pruned or replaced component over to whatever lands in
its slot, and it has one step count, so a component activated at step 1000 gets step 1000's bias
correction and no warm-up. Here each component has its own step count and moments, matched to it by id
(so they follow it when components are reordered, and start from zero when it is new), only the training
prefix is read and written (time follows the rank in use), and a component's learning rate ramps up
over its first ``warmup`` steps (IncreLoRA's "newly activated parameters restart their warm-up").

Every other parameter gets plain AdamW (decoupled weight decay, as ``torch.optim.AdamW``).
"""

from __future__ import annotations

import itertools

import torch

from . import ops
from .tuners.rank.layer import _to_device, component_layout


class RankAwareAdamW(torch.optim.Optimizer):
    """AdamW with per-component state for ranked LoRA factors (see the module docstring).

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (weight_decay default 0.01).
        component_warmup: steps over which a component's learning rate ramps linearly up to ``lr`` once it
            starts training; None (default): the layer's own setting (IncreLoraConfig.new_rank_warmup,
            0 for AdaLoRA). Learning-rate schedulers scale ``lr`` as usual, on top of this.

    Its state dict holds a step count per component (a vector) for ranked factors, which torch.optim.AdamW cannot
    read: it loads such a state and fails at its first step ("a Tensor with N elements cannot be converted to
    Scalar"). Switching optimizers mid-run means starting the new one afresh (the reverse is refused in words).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, component_warmup: int | None = None) -> None:
        if not lr >= 0.0:
            raise ValueError(f"RankAwareAdamW: lr must be >= 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"RankAwareAdamW: betas must be in [0, 1), got {betas}")
        if not eps >= 0.0 or not weight_decay >= 0.0:
            raise ValueError(f"RankAwareAdamW: eps and weight_decay must be >= 0, got {eps}, {weight_decay}")
        if component_warmup is not None and component_warmup < 0:
            raise ValueError(f"RankAwareAdamW: component_warmup must be >= 0 or None, got {component_warmup}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                                  "component_warmup": component_warmup})

    # torch.optim.AdamW options this optimizer does not implement: refused in a parameter group as in the constructor
    _UNSUPPORTED = ("amsgrad", "maximize", "foreach", "capturable", "fused", "differentiable")

    def add_param_group(self, param_group: dict) -> None:
        unsupported = [k for k in self._UNSUPPORTED if param_group.get(k)]
        if unsupported:
            raise TypeError(f"RankAwareAdamW does not implement {unsupported}; use torch.optim.AdamW for them")
        super().add_param_group(param_group)
        if any(p.is_complex() for p in self.param_groups[-1]["params"]):
            self.param_groups.pop()
            raise TypeError("RankAwareAdamW does not support complex parameters; use torch.optim.AdamW for them")

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # groups saved by another optimizer (torch.optim.AdamW) lack it
            group.setdefault("component_warmup", None)

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but the component ids of ranked factors stay exact integers: torch casts every state tensor
        but the step count to the parameter's dtype, and bfloat16 holds integers exactly only up to 256, so a
        resumed run gave components other components' moments. A state saved by an optimizer without component
        ids (torch.optim.AdamW) is refused: its moments cannot be matched to the components."""
        params = dict(zip(itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"]),
                          itertools.chain.from_iterable(g["params"] for g in self.param_groups), strict=False))
        ids = {}
        for index, saved in state_dict["state"].items():
            p = params.get(index)
            if p is None or component_layout(p) is None or not saved:
                continue
            if "ids" not in saved:
                raise ValueError("this optimizer state has no component ids for the ranked LoRA factors (saved by "
                                 "torch.optim.AdamW or another optimizer?): RankAwareAdamW cannot match its moments "
                                 "to the components; start the optimizer afresh instead of loading it")
            ids[p] = saved["ids"].to("cpu", torch.int64, copy=True)
        for group in state_dict["param_groups"]:  # torch replaces the groups whole: what add_param_group refuses
            unsupported = [k for k in self._UNSUPPORTED if group.get(k)]
            if unsupported:
                raise TypeError(f"RankAwareAdamW does not implement {unsupported}, which this state's parameter "
                                "groups set; use torch.optim.AdamW for them")
        super().load_state_dict(state_dict)
        for p, saved_ids in ids.items():
            self.state[p]["ids"] = saved_ids

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # checked before any parameter moves: raised midway (as torch.optim.AdamW does), it left the parameters
        # before the sparse one stepped (their moments and step counts too) and the rest not
        if any(p.grad is not None and p.grad.is_sparse for group in self.param_groups for p in group["params"]):
            raise RuntimeError("RankAwareAdamW does not support sparse gradients")
        for group in self.param_groups:
            ranked = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                layout = component_layout(p)
                if layout is None:
                    self._dense_step(p, group)
                else:
                    ranked.append((p, *layout))
            self._component_steps(ranked, group)
        return loss

    def _dense_step(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step = state["step"].item()
        _adamw(p, p.grad, state["exp_avg"], state["exp_avg_sq"], lr=group["lr"], beta1=beta1, beta2=beta2,
               eps=group["eps"], weight_decay=group["weight_decay"], bias1=1 - beta1**step,
               bias2=1 - beta2**step)

    def _component_steps(self, ranked: list, group: dict) -> None:
        """The ranked factors of one group: their training rows, in one fused op per dtype and device (one
        kernel launch on a GPU, instead of a dozen small ones per factor)."""
        batches: dict[tuple, list] = {}
        for p, components, kind in ranked:
            state = self.state[p]
            self._match_components(p, state, components)
            n = components.trainable(kind)
            if n == 0:
                continue
            warmup = components.warmup if group["component_warmup"] is None else group["component_warmup"]
            batches.setdefault((p.dtype, p.device), []).append((p, state, n, float(warmup)))
        beta1, beta2 = group["betas"]
        for items in batches.values():
            steps = [state["step"] for _, state, _, _ in items]
            torch._foreach_add_([s[:n] for s, (_, _, n, _) in zip(steps, items, strict=True)], 1.0)
            ops.component_adamw_(
                [p for p, *_ in items], [p.grad for p, *_ in items], [st["exp_avg"] for _, st, _, _ in items],
                [st["exp_avg_sq"] for _, st, _, _ in items], steps, [n for _, _, n, _ in items], group["lr"],
                beta1, beta2, group["eps"], group["weight_decay"], [w for *_, w in items])

    @staticmethod
    def _match_components(p: torch.Tensor, state: dict, components) -> None:
        """Brings the state in line with the components now in p's slots: a component keeps its moments and
        step count wherever it moved; a new one starts from zero."""
        ids = components.ids
        if state and (state["ids"].dtype != torch.int64 or state["ids"].device.type != "cpu"):
            # Optimizer.load_state_dict casts state to the parameter's dtype and device: ids are CPU integers
            state["ids"] = state["ids"].to("cpu", torch.int64)
        if state and state["ids"].shape == ids.shape and torch.equal(state["ids"], ids):
            return
        fresh = {
            "step": torch.zeros(p.shape[0], dtype=torch.float32, device=p.device),
            "exp_avg": torch.zeros_like(p, memory_format=torch.contiguous_format),
            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.contiguous_format),
            "ids": ids.clone(),
        }
        if state:
            where = {int(i): k for k, i in enumerate(state["ids"].tolist())}
            pairs = [(k, where[i]) for k, i in enumerate(ids.tolist()) if i in where]
            if pairs:
                dst = _to_device([k for k, _ in pairs], p.device)
                src = _to_device([s for _, s in pairs], p.device)
                for key in ("step", "exp_avg", "exp_avg_sq"):
                    fresh[key][dst] = state[key][src]
        state.clear()
        state.update(fresh)


def _adamw(p, grad, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay, bias1, bias2) -> None:
    """One AdamW update in place; lr and the bias corrections are floats or tensors broadcast against p."""
    p.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq / bias2).sqrt_().add_(eps)
    p.sub_(lr * exp_avg / bias1 / denom)
