"""Configs of the rank-allocating LoRA variants: IncreLoRA (grows ranks) and AdaLoRA (prunes them).

Both extend :class:`pefttorch.LoraConfig` (target_modules, lora_alpha, lora_dropout, modules_to_save,
task_type, ... keep their meaning); ``r``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora`` and
``init_lora_weights`` do not apply, the rank schedule decides. Field names of AdaLoraConfig are HF PEFT's.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from .._config import reject_unknown_fields
from ..lora.config import DEFAULT_TARGET_MODULES, LoraConfig

# HF PEFT's AdaLoRA defaults where they differ from its LoRA ones: every attention projection and the feedforward
# (a default AdaLoraConfig on these models pruned among q and v alone, with a third of HF PEFT's budget); Marian and
# mBART, which HF PEFT has no default for, as BART (as for LoRA)
_BART = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
ADALORA_DEFAULT_TARGET_MODULES = {
    **DEFAULT_TARGET_MODULES,
    **dict.fromkeys(("bart", "marian", "mbart", "opt"), _BART),
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
}


def _check_common(config, name: str, rank_fields: str) -> None:
    def bad(msg: str) -> ValueError:
        return ValueError(f"{name}: {msg}")

    # A warning, not an error, as HF PEFT does for AdaLoRA: configs copied from a LoRA run often carry `r`,
    # and it is harmless once the user knows which fields set the ranks instead.
    if config.r != LoraConfig.r:
        warnings.warn(f"{name}: r={config.r!r} is ignored, the rank schedule decides the ranks; set {rank_fields} "
                      f"instead", UserWarning, stacklevel=5)  # past __post_init__, __init__, checked_init

    if config.lora_alpha == 0:  # the saved LoRA's B is scaled by (scaling * rank) / lora_alpha, see lora_factors
        raise bad("lora_alpha must not be 0: the update is scaled by it, so nothing would train")
    if config.rank_pattern or config.alpha_pattern:
        raise bad("rank_pattern and alpha_pattern are decided by the rank allocation, not set by hand")
    if config.use_rslora:
        raise bad("use_rslora does not apply: the update is scaled by lora_alpha / rank")
    if config.init_lora_weights is not True:
        raise bad("init_lora_weights does not apply: components start with a ~ N(0, 0.02), b = 0 (or e = 0)")
    for field in ("beta1", "beta2"):
        value = getattr(config, field)
        if not 0.0 < value < 1.0:
            raise bad(f"{field} must be in (0, 1), got {value!r}")
    if not config.orth_reg_weight >= 0.0:
        raise bad(f"orth_reg_weight must be >= 0, got {config.orth_reg_weight!r}")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@reject_unknown_fields
@dataclass
class IncreLoraConfig(LoraConfig):
    """IncreLoRA (Zhang et al., 2023): every adapted module starts at `init_rank` and the most important
    ones receive more rank during training, until the average reaches `target_rank`.

    The update of a module is ``B diag(e) A * lora_alpha / rank_in_use``. Its importance after each step is
    ``sum|dW * dL/d(dW)| / sqrt(numel)`` over the update dW (estimated from a sampled grid of
    ``score_sample x score_sample`` entries, see :class:`IncreLoraModel`), smoothed by the sensitivity and
    uncertainty averages of AdaLoRA (`beta1`, `beta2`); the score is their product.

    Args:
        target_rank: average rank per module at the end; the total budget is ``target_rank * modules``.
        init_rank: rank every module starts with (the paper: 1).
        incre_interval: steps between two allocations.
        init_warmup: allocations come at the steps after this one (``step > init_warmup``) that are multiples of
            ``incre_interval``: with ``init_warmup=3, incre_interval=3`` the first is at step 6.
        top_h: modules receiving rank at each allocation (those with the highest scores).
        incre_rank_num: rank added to each of them (default: ``max(1, target_rank // 2)``, the paper's table).
        beta1, beta2: smoothing of the sensitivity and of its uncertainty.
        orth_reg_weight: coefficient of the orthogonality term added to the loss: the mean, over the A and the B
            factors of every module (one term each, as in HF PEFT's AdaLoRA), of ``||A A^T - I||_F`` and
            ``||B^T B - I||_F`` (the model's ``orth_regularization()``).
        max_rank_per_module: no module grows beyond this (None: no limit).
        advance_learning: keep ``incre_rank_num`` reserve components per module that train (e fixed at
            1e-5, b starting at 0) before they are activated (the paper's "advance learning").
        new_rank_warmup: steps over which a component's learning rate ramps up once it starts training, with
            :class:`pefttorch.optim.RankAwareAdamW` (default: ``incre_interval``).
        score_sample: side of the sampled grid of the importance estimate; None: the exact score over the
            whole matrix (as costly as a full weight gradient).
    """

    target_rank: int = 8
    init_rank: int = 1
    incre_interval: int = 100
    init_warmup: int = 100
    top_h: int = 2
    incre_rank_num: int | None = None
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1
    max_rank_per_module: int | None = None
    advance_learning: bool = True
    new_rank_warmup: int | None = None
    score_sample: int | None = 64

    peft_type = "INCRELORA"

    def __post_init__(self) -> None:
        super().__post_init__()

        def bad(msg: str) -> ValueError:
            return ValueError(f"IncreLoraConfig: {msg}")

        _check_common(self, "IncreLoraConfig", "init_rank and target_rank")
        for field in ("target_rank", "init_rank", "incre_interval", "top_h"):
            if not _positive_int(getattr(self, field)):
                raise bad(f"{field} must be a positive integer, got {getattr(self, field)!r}")
        if self.target_rank < self.init_rank:
            raise bad(f"target_rank ({self.target_rank}) is below init_rank ({self.init_rank}): IncreLoRA only "
                      f"grows ranks (AdaLoraConfig prunes them)")
        derived = self.__dict__.setdefault("_derived", set())  # what replace() derives again (see _config)
        if self.incre_rank_num is None:
            self.incre_rank_num = max(1, self.target_rank // 2)
            derived.add("incre_rank_num")
        if not _positive_int(self.incre_rank_num):
            raise bad(f"incre_rank_num must be a positive integer, got {self.incre_rank_num!r}")
        if isinstance(self.init_warmup, bool) or not isinstance(self.init_warmup, int) or self.init_warmup < 0:
            raise bad(f"init_warmup must be an integer >= 0, got {self.init_warmup!r}")
        if self.max_rank_per_module is not None and (
                not _positive_int(self.max_rank_per_module) or self.max_rank_per_module < self.target_rank):
            raise bad(f"max_rank_per_module must be an integer >= target_rank ({self.target_rank}) or None, got "
                      f"{self.max_rank_per_module!r}: otherwise the budget cannot be reached")
        if self.new_rank_warmup is None:
            self.new_rank_warmup = self.incre_interval
            derived.add("new_rank_warmup")
        if isinstance(self.new_rank_warmup, bool) or not isinstance(self.new_rank_warmup, int) \
                or self.new_rank_warmup < 0:
            raise bad(f"new_rank_warmup must be an integer >= 0, got {self.new_rank_warmup!r}")
        if self.score_sample is not None and not _positive_int(self.score_sample):
            raise bad(f"score_sample must be a positive integer or None (exact), got {self.score_sample!r}")


@reject_unknown_fields
@dataclass
class AdaLoraConfig(LoraConfig):
    """AdaLoRA (Zhang et al., 2023), as HF PEFT's AdaLoraConfig, but pruned components are removed rather
    than masked: compute and optimizer state follow the remaining rank.

    Every module starts at `init_r`. After `tinit` steps the total budget falls along a cubic from
    ``init_r * modules`` to ``target_r * modules``, reached `tfinal` steps before `total_step`; every
    `deltaT` steps the components with the lowest scores are pruned down to the budget. A component's score
    is the smoothed sensitivity times uncertainty of e plus the mean over its a and b entries (PEFT's).
    The update is ``B diag(e) A * lora_alpha / init_r`` (PEFT's scaling).

    Args:
        target_r, init_r, tinit, tfinal, deltaT, beta1, beta2, orth_reg_weight, total_step: as in HF PEFT.
        target_modules: as in LoraConfig; without it, HF PEFT's AdaLoRA default for the model type, which for T5,
            BART, OPT, RoBERTa and DeBERTa-v2 is every attention projection and the feedforward (LoRA's: q and v).
    """

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815 - HF PEFT's field name
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None

    peft_type = "ADALORA"
    default_target_modules = ADALORA_DEFAULT_TARGET_MODULES

    def __post_init__(self) -> None:
        super().__post_init__()

        def bad(msg: str) -> ValueError:
            return ValueError(f"AdaLoraConfig: {msg}")

        _check_common(self, "AdaLoraConfig", "init_r and target_r")
        for field in ("target_r", "init_r", "deltaT"):
            if not _positive_int(getattr(self, field)):
                raise bad(f"{field} must be a positive integer, got {getattr(self, field)!r}")
        if self.target_r > self.init_r:
            raise bad(f"target_r ({self.target_r}) is above init_r ({self.init_r}): AdaLoRA only prunes "
                      f"(IncreLoraConfig grows ranks)")
        if not _positive_int(self.total_step):
            raise bad(f"total_step (the number of training steps) must be set to a positive integer, got "
                      f"{self.total_step!r}: the budget schedule depends on it")
        for field in ("tinit", "tfinal"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise bad(f"{field} must be an integer >= 0, got {value!r}")
        if self.tinit >= self.total_step - self.tfinal:
            raise bad(f"tinit ({self.tinit}) must be below total_step - tfinal ({self.total_step - self.tfinal}): "
                      f"no step would be left to prune")
