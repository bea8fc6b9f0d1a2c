"""AdapterConfig: bottleneck adapters, sequential (Houlsby, Pfeiffer) or parallel to the FFN (He et al.)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from ...reference import ACTIVATIONS
from .._config import SavedConfig, normalize_common, reject_unknown_fields

PEFT_TYPE = "BOTTLENECK_ADAPTER"
# style -> (after attention, after FFN, parallel to FFN)
STYLES = {
    "houlsby": (True, True, False),  # Houlsby et al. 2019: after both sublayers
    "pfeiffer": (False, True, False),  # Pfeiffer et al. 2021: after the FFN only
    "parallel": (False, False, True),  # He et al. 2022: next to the FFN, on its input
}


def check_finite(owner: str, name: str, value) -> None:
    """`value` must be a finite number (not a bool, a string or NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be a finite number, got {value!r}")


@reject_unknown_fields
@dataclass
class AdapterConfig(SavedConfig):
    """Bottleneck adapters ``h + scaling * up(act(down(h)))`` in every transformer layer.

    Args:
        style: ``"houlsby"`` (after the attention output projection and after the FFN, sequentially),
            ``"pfeiffer"`` (after the FFN only) or ``"parallel"`` (He et al.: the adapter reads the FFN's
            input and its output is added to the FFN's). `after_attention`, `after_ffn` and `parallel_ffn`
            override the style's placement.
        bottleneck: width m of each adapter; None: ``round(hidden / reduction_factor)`` (at least 1).
        reduction_factor: hidden / m when `bottleneck` is None (AdapterHub's default 16).
        activation: ``"relu"``, ``"gelu"``, ``"gelu_tanh"`` or ``"silu"``.
        scaling: factor of the adapter's output.
        layer_norm: a LayerNorm on each adapter's input.
        cross_attention: with `after_attention`, also after a decoder's cross-attention.
        layers_to_transform: only these layer indices (default: all).
        modules_to_save: modules trained in full and saved with the adapters (e.g. a new classifier).
    The up projections start at zero, so the model starts exactly as the base model.
    """

    style: str = "houlsby"
    bottleneck: int | None = None
    reduction_factor: float = 16
    activation: str = "relu"
    scaling: float = 1.0
    layer_norm: bool = False
    after_attention: bool | None = None
    after_ffn: bool | None = None
    parallel_ffn: bool | None = None
    cross_attention: bool = True
    layers_to_transform: list[int] | None = None
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False
    peft_type: str = field(default=PEFT_TYPE, init=False)
    peft_type_name: ClassVar[str] = PEFT_TYPE  # our format: adapter_config.json with these fields

    def __post_init__(self) -> None:
        def bad(msg: str) -> ValueError:
            return ValueError(f"AdapterConfig: {msg}")

        normalize_common(self)  # first: it makes numpy's numbers plain for the checks
        if self.style not in STYLES:
            raise bad(f"style must be one of {', '.join(STYLES)}, got {self.style!r}")
        if self.bottleneck is not None and (isinstance(self.bottleneck, bool) or not isinstance(self.bottleneck, int)
                                            or self.bottleneck < 1):
            raise bad(f"bottleneck must be a positive integer or None, got {self.bottleneck!r}")
        if isinstance(self.reduction_factor, bool) or not isinstance(self.reduction_factor, (int, float)) \
                or not self.reduction_factor > 0:
            raise bad(f"reduction_factor must be a number > 0, got {self.reduction_factor!r}")
        if self.activation not in ACTIVATIONS:
            raise bad(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        check_finite("AdapterConfig", "scaling", self.scaling)
        if not any(self.placement):
            raise bad("after_attention, after_ffn and parallel_ffn are all off: no adapter would be added")
        if self.placement[1] and self.placement[2]:
            raise bad("after_ffn and parallel_ffn together put two adapters on one FFN; choose one")

    @property
    def placement(self) -> tuple[bool, bool, bool]:
        """(after attention, after FFN, parallel to FFN) in use."""
        style = STYLES[self.style]
        overrides = (self.after_attention, self.after_ffn, self.parallel_ffn)
        return tuple(s if o is None else bool(o) for s, o in zip(style, overrides, strict=True))

    def width(self, hidden: int) -> int:
        """The bottleneck width for a model of this hidden size."""
        return self.bottleneck if self.bottleneck is not None else max(1, round(hidden / self.reduction_factor))
