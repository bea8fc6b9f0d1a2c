"""BitFitConfig and LNTuningConfig: which of the base model's own parameters train."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .._config import TargetedConfig, reject_unknown_fields

BITFIT = "BITFIT"
LN_TUNING = "LN_TUNING"


@reject_unknown_fields
@dataclass
class BitFitConfig(TargetedConfig):
    """BitFit (Ben Zaken et al. 2022): only the bias terms train.

    Args:
        target_modules: the modules whose biases train: names (a module matches if its name equals one or ends
            with ``.name``) or a regex over the whole name. None: every module with a bias (linear layers and
            norms alike, as in the paper). A module's biases are its parameters named ``bias``, ``*_bias`` or
            ``bias_*``: nn.MultiheadAttention's in_proj_bias (and bias_k, bias_v) train with its out_proj's bias.
        exclude_modules, layers_to_transform, modules_to_save: as in the other configs.
    The trained biases replace the originals in place, so the model computes exactly as before at no extra
    cost; ``disable_adapter`` puts the originals back for its block and ``unload`` for good. Saved in
    pefttorch's format (HF PEFT has no BitFit): ``base_model.model.<module>.<bias name>``.
    """

    peft_type: str = field(default=BITFIT, init=False)
    peft_type_name: ClassVar[str] = BITFIT

    def __post_init__(self) -> None:
        self._check()


@reject_unknown_fields
@dataclass
class LNTuningConfig(TargetedConfig):
    """LayerNorm tuning (Zhao et al. 2024): only the normalisation layers' weights and biases train. Field names
    and saved format are HF PEFT's ``LNTuningConfig``'s.

    Args:
        target_modules: names or a regex of the norm modules to tune; None: every LayerNorm / RMSNorm.
        exclude_modules, layers_to_transform, modules_to_save: as in the other configs.
    """

    peft_type: str = field(default=LN_TUNING, init=False)
    peft_type_name: ClassVar[str] = LN_TUNING
    peft_only_fields: ClassVar[tuple[str, ...]] = ("layers_to_transform",)  # exported as an exact regex

    def __post_init__(self) -> None:
        self._check()
