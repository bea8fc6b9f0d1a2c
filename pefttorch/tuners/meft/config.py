"""MeftConfig: reversible adapters (MEFT, Liao, Tan and Monz, NeurIPS 2023)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ...ops import coupling_scale_ok, opmath_dtype
from .._config import normalize_common, reject_unknown_fields, save_config, warn_unknown_fields

PEFT_TYPE = "MEFT"

# variant -> (lam, beta, swap) as in the paper
VARIANTS = {
    "meft1": (0.1, 1.0, True),  # F = the pretrained layer (FFN adapter in parallel), G = an adapter
    "meft2": (1.0, 0.1, True),  # F = an adapter, G = the pretrained layer (FFN adapter in parallel)
    "meft3": (0.1, 0.1, False),  # F = the attention block, G = the MLP block, each with an adapter
}
ACTIVATIONS = ("relu", "gelu", "silu", "tanh")
_FLOAT_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}


@reject_unknown_fields
@dataclass
class MeftConfig:
    """Configuration of reversible adapters (MEFT).

    The model's layers become reversible: two streams, both starting as the embedding output, pass
    through ``y1 = lam * x1 + F(x2)``, ``y2 = beta * x2 + G(y1)``; backward reconstructs each layer's
    input from its output instead of keeping activations, so activation memory stops growing with depth.
    The stack's output is the mean of the two streams.

    Args:
        variant: ``"meft1"`` (F = the pretrained layer with a parallel adapter on its FFN, G = an adapter;
            lam 0.1, beta 1, streams swapped after each layer), ``"meft2"`` (F = an adapter, G = the
            pretrained layer with an FFN adapter; lam 1, beta 0.1, swapped) or ``"meft3"`` (F = the
            attention block with an adapter, G = the MLP block with an adapter; lam = beta = 0.1, no swap).
        bottleneck: the adapters' inner width (Linear(d, bottleneck) -> activation -> dropout ->
            Linear(bottleneck, d), weights N(0, 0.02), biases zero).
        lam, beta: override the variant's scales: normal numbers of the kernels' compute dtype, float32 (float64 for
            float64 streams), since backward divides by them.
        num_rev_layers: only the lowest N layers are reversible; the rest run as ordinary layers with
            their adapters on the mean of the streams (None: all).
        adapter_dropout: dropout inside the adapters, in [0, 1).
        adapter_activation: ``"relu"`` (default), ``"gelu"``, ``"silu"`` or ``"tanh"``.
        stream_dtype: dtype of the two streams (float32 by default, whatever the model's dtype); F and G run in
            the model's dtype. Use float64 for more than two or three layers: float32 streams are reconstructed
            to about 1e-7, which each coupling multiplies by 1/lam or 1/beta, while float64 streams (with the
            cast guard of :mod:`pefttorch.nn.reversible`) keep a 16-layer bf16 meft1/meft2 stack within about
            1e-7 to 1e-6, growing with the width (measured: 8e-8 at hidden 64, 3e-7 at 256, 2e-6 at 2048).
        modules_to_save: modules (by name, e.g. a new classifier) trained in full, in place, and saved
            with the adapters; one name must match (as for LoRA). A copy of their original tensors is kept (as
            HF PEFT keeps the original module) for ``disable_adapter()``, which computes with it.
        task_type: HF PEFT's task type; as for the other configs, SEQ_CLS and TOKEN_CLS add ``classifier`` and
            ``score`` to modules_to_save, QUESTION_ANS ``qa_outputs`` (the new head trains).
        debug_reconstruction: after each backward, ``model.reconstruction_errors()`` gives the error of
            every reconstructed layer input (keeps a copy of each layer's input: debugging only).
    """

    variant: str = "meft1"
    bottleneck: int = 8
    lam: float | None = None
    beta: float | None = None
    num_rev_layers: int | None = None
    adapter_dropout: float = 0.0
    adapter_activation: str = "relu"
    stream_dtype: torch.dtype = torch.float32
    modules_to_save: list[str] | None = None
    debug_reconstruction: bool = False
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False
    peft_type: str = field(default=PEFT_TYPE, init=False)

    def __post_init__(self) -> None:
        def bad(msg: str) -> ValueError:
            return ValueError(f"MeftConfig: {msg}")

        normalize_common(self)  # as the other configs: plain numbers, a task's new head (SEQ_CLS: classifier/score)
        if self.variant not in VARIANTS:
            raise bad(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if isinstance(self.bottleneck, bool) or not isinstance(self.bottleneck, int) or self.bottleneck <= 0:
            raise bad(f"bottleneck must be a positive int, got {self.bottleneck!r}")
        if self.num_rev_layers is not None and (
                isinstance(self.num_rev_layers, bool) or not isinstance(self.num_rev_layers, int)
                or self.num_rev_layers < 0):
            raise bad(f"num_rev_layers must be None or an int >= 0, got {self.num_rev_layers!r}")
        if not 0.0 <= self.adapter_dropout < 1.0:
            raise bad(f"adapter_dropout must be in [0, 1), got {self.adapter_dropout}")
        if self.adapter_activation not in ACTIVATIONS:
            raise bad(f"adapter_activation must be one of {', '.join(ACTIVATIONS)}, got {self.adapter_activation!r}")
        if isinstance(self.stream_dtype, str):
            self.stream_dtype = _FLOAT_DTYPES.get(self.stream_dtype.removeprefix("torch."), self.stream_dtype)
        if self.stream_dtype not in _FLOAT_DTYPES.values():
            raise bad(f"stream_dtype must be a floating dtype ({', '.join(_FLOAT_DTYPES)}), got {self.stream_dtype!r}")
        for name in ("lam", "beta"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad(f"{name} must be a number, got {value!r}")
            if not coupling_scale_ok(value, self.stream_dtype):
                info = torch.finfo(opmath_dtype(self.stream_dtype))
                raise bad(f"{name} must be a finite non-zero number (backward divides by it), normal in {info.dtype}, "
                          f"the reversible kernels' compute dtype for {str(self.stream_dtype).removeprefix('torch.')} "
                          f"streams (magnitude {info.tiny:.4g} to {info.max:.4g}), got {value!r}")

    @property
    def scales(self) -> tuple[float, float, bool]:
        """(lam, beta, swap) in use."""
        lam, beta, swap = VARIANTS[self.variant]
        return (lam if self.lam is None else float(self.lam), beta if self.beta is None else float(self.beta), swap)

    # ---------------------------------------------------------------- adapter_config.json (our format)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stream_dtype"] = str(self.stream_dtype).removeprefix("torch.")
        d["peft_type"] = PEFT_TYPE
        return d

    def save(self, directory: str | Path) -> None:
        save_config(self, directory)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MeftConfig:
        if data.get("peft_type") != PEFT_TYPE:
            raise ValueError(f"not a MEFT adapter config (peft_type {data.get('peft_type')!r})")
        names = {f.name for f in fields(cls) if f.init}
        warn_unknown_fields(cls.__name__, data, names)  # (a misspelt field was dropped without a word)
        return cls(**{k: v for k, v in data.items() if k in names})
