"""The HF ``Trainer`` callbacks of the density loss and of rank allocation.

Kept apart because they subclass transformers' ``TrainerCallback``: importing it loads the Trainer (and with it
peft), seconds that ``import pefttorch`` should not cost a user who never trains with the Trainer.
``pefttorch.DensityLossCallback`` and ``pefttorch.RankAllocationCallback`` load this module on first use.
"""

from __future__ import annotations

import warnings

from torch import nn

try:
    from transformers import TrainerCallback
except ImportError as e:  # the hf extra is optional; without it these callbacks have nothing to call them
    raise ImportError("pefttorch's Trainer callbacks need transformers: pip install 'pefttorch[hf]'") from e

from .optim import RankAwareAdamW
from .tuners.density.loss import DensityLoss
from .tuners.rank.model import RankedLoraModel


class DensityLossCallback(TrainerCallback):
    """Adds ``density`` (mean over layers) and ``density/<layer>`` to the Trainer's training logs, and
    ``eval_density`` (and per layer) to its evaluation logs and ``test_density`` to ``predict()``'s metrics (under
    the metric_key_prefix given), then starts a new measurement window.

    The printed progress and ``trainer.state.log_history`` show them; reporting integrations that log
    before user callbacks run (TensorBoard, W&B) see them only if this callback is first in the list.
    """

    def __init__(self, density_loss: DensityLoss) -> None:
        self.density_loss = density_loss

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        # an evaluation's metrics carry its prefix (metric_key_prefix: "eval" by default) on every key,
        # <prefix>_runtime among them; the end of training logs train_runtime
        name = _prefix(logs) or ("eval" if any(k.startswith("eval_") for k in logs) else None)
        added = self._read("train", "") if name is None else self._read("eval", f"{name}_")
        logs.update(added)
        if added and state.log_history:
            state.log_history[-1].update(added)

    def on_predict(self, args, state, control, metrics=None, **kwargs):
        # predict() logs nothing (no on_log): its densities went unreported and into the next evaluation's window
        if metrics is not None:
            metrics.update(self._read("eval", f"{_prefix(metrics) or 'test'}_"))

    def _read(self, mode: str, prefix: str) -> dict[str, float]:
        per_layer = self.density_loss.densities(mode)
        if not per_layer:
            return {}
        added = {f"{prefix}density": sum(per_layer.values()) / len(per_layer)}
        added.update({f"{prefix}density/{name}": v for name, v in per_layer.items()})
        return added


def _prefix(metrics: dict) -> str | None:
    """The metric_key_prefix of an evaluation's or prediction's metrics (from <prefix>_runtime), if they are one's."""
    return next((k.removesuffix("_runtime") for k in metrics if k.endswith("_runtime") and k != "train_runtime"), None)


class RankAllocationCallback(TrainerCallback):
    """For the HF Trainer: calls ``update_and_allocate(global_step)`` after each optimizer step (before the
    gradients are zeroed), logs the total rank, and warns when the Trainer's optimizer is not
    :class:`pefttorch.optim.RankAwareAdamW` (give it one with ``Trainer(optimizers=(optimizer, None))``)."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the Trainer's optimizer
        if optimizer is not None and not isinstance(optimizer, RankAwareAdamW):
            warnings.warn(f"the Trainer's optimizer is {type(optimizer).__name__}: as ranks change it keeps stale "
                          f"moments and updates components that should not train; pass "
                          f"optimizers=(pefttorch.optim.RankAwareAdamW(model.parameters(), lr=...), None)",
                          stacklevel=2)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # fp16 under accelerate: its optimizer wrapper holds the GradScaler, whose step and update come before
        # on_optimizer_step; the scale this step's backward ran with is read here
        scaler = getattr(optimizer, "scaler", None)
        self._loss_scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else None

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        _ranked(model).update_and_allocate(state.global_step, loss_scale=getattr(self, "_loss_scale", None))

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is not None and model is not None and "eval_loss" not in logs:
            logs["total_rank"] = sum(_ranked(model).rank_pattern().values())
            if state.log_history:  # the Trainer appended a copy of logs before calling on_log
                state.log_history[-1]["total_rank"] = logs["total_rank"]


def _ranked(model: nn.Module) -> RankedLoraModel:
    base = getattr(model, "base_model", model)
    if not isinstance(base, RankedLoraModel):
        raise TypeError(f"RankAllocationCallback needs an IncreLoRA or AdaLoRA model, got {type(model).__name__}")
    return base
