"""IA3Config and SsfConfig: learned vectors that rescale (and, for SSF, shift) what linear layers compute."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .._config import TargetedConfig, module_names, reject_unknown_fields

IA3 = "IA3"
SSF = "SSF"

# (IA)^3 per model type (Liu et al. 2022): keys, values and the FFN's intermediate activation, which is the
# input of the FFN's output projection (a "feedforward" module, scaled on its input). BERT's FFN output layer is
# "<layer>.output.dense" while its attention output is "<layer>.attention.output.dense": a regex tells them apart.
IA3_DEFAULTS = {
    "bert": (r".*\.(?:key|value|\d+\.output\.dense)", r".*\.\d+\.output\.dense"),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),  # HF PEFT's choice for Qwen and Gemma: queries
    "t5": (["k", "v", "wo"], ["wo"]),
    "marian": (["k_proj", "v_proj", "fc2"], ["fc2"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
}
# A family's default serves its relatives; HF PEFT's own differ for bart (q_proj, not k_proj) and mt5 (wi_1's output,
# no feedforward module), and it has none for marian/mbart (documented in IA3Config).
IA3_ALIASES = {"roberta": "bert", "mistral": "llama", "qwen3": "qwen2", "gemma": "qwen2", "gemma2": "qwen2",
               "mt5": "t5", "mbart": "marian", "bart": "marian"}


@reject_unknown_fields
@dataclass
class IA3Config(TargetedConfig):
    """(IA)^3 (Liu et al. 2022): each targeted linear layer's output is multiplied by a learned vector, or, for
    `feedforward_modules`, its input. Fields and saved format are HF PEFT's ``IA3Config``'s.

    Args:
        target_modules: module names (a module matches if its name equals one or ends with ``.name``), a regex
            matched against the whole module name, or ``"all-linear"``. None: keys (queries for Qwen and Gemma, as
            in HF PEFT), values and the FFN's output projection for BERT, Llama, Qwen, Gemma, T5, Marian/BART and
            GPT-2 families.
        feedforward_modules: the targets scaled on their input (the FFN intermediate activation). None (as in HF
            PEFT): the model type's default feedforward modules, those of them among the targets (none for a model
            type without defaults). The defaults are pefttorch's and differ from HF PEFT's in places:
            for BERT the FFN's output projection only, where HF PEFT's suffix ``output.dense`` takes the
            attention's output projection too; for BART (and mBART, Marian: HF PEFT has no default for them) keys,
            values and ``fc2``'s input, where HF PEFT's BART takes queries (``q_proj``) instead of keys; for mT5
            T5's (keys, values and ``wo``'s input), where HF PEFT's takes ``k``, ``v`` and ``wi_1``, all on their
            output. Saves name the modules, so either library loads them as they were trained; for HF PEFT's
            choice, set ``target_modules`` and ``feedforward_modules``.
        exclude_modules: names or a regex of modules never adapted.
        layers_to_transform: only these layer indices (pefttorch's; saved as an exact regex for HF PEFT).
        fan_in_fan_out: accepted for HF PEFT compatibility; the layer type decides the layout.
        init_ia3_weights: vectors start at one, so the model starts as the base model (False: random, for tests).
        modules_to_save: modules trained in full and saved with the vectors (e.g. a new classifier).
    Merging (``merge_and_unload``) folds the vectors into the layers' weights and biases.
    """

    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True
    peft_type: str = field(default=IA3, init=False)
    peft_type_name: ClassVar[str] = IA3

    def __post_init__(self) -> None:
        self._check()
        self.feedforward_modules = module_names(self.feedforward_modules, "feedforward_modules", "IA3Config")
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise ValueError(f"IA3Config: feedforward_modules must be among target_modules; not there: {extra}")

    # not a field of HF PEFT's IA3Config: the export writes exact module regexes instead
    peft_only_fields: ClassVar[tuple[str, ...]] = ("layers_to_transform",)


@reject_unknown_fields
@dataclass
class SsfConfig(TargetedConfig):
    """SSF (Lian et al. 2022, "Scaling & Shifting Your Features"): each targeted module's output y becomes
    ``scale * y + shift`` with learned per-feature vectors (over the last dimension).

    Args:
        target_modules: as in IA3Config; default ``"all-linear"`` (every linear layer but the output head).
            Names or a regex may also pick LayerNorm / RMSNorm modules (their output is rescaled too).
        exclude_modules, layers_to_transform, modules_to_save: as in IA3Config.
        init_ssf_weights: scale ones and shift zeros, so the model starts as the base model (False: random).
    Merging folds scale and shift into a linear layer's weight and bias (or an nn.LayerNorm's); modules whose
    computation cannot absorb them (e.g. an RMSNorm without bias) raise when merged. Saved in pefttorch's format
    (HF PEFT has no SSF): ``base_model.model.<module>.ssf_scale`` and ``.ssf_shift``.
    """

    target_modules: list[str] | str | None = "all-linear"
    init_ssf_weights: bool = True
    peft_type: str = field(default=SSF, init=False)
    peft_type_name: ClassVar[str] = SSF

    def __post_init__(self) -> None:
        self._check()
        if self.target_modules is None:
            raise ValueError("SsfConfig: target_modules must be set (default 'all-linear')")
