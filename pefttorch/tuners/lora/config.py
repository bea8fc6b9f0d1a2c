"""LoraConfig: HF PEFT's LoRA configuration fields, with the same names, meanings and JSON format."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from .._config import (
    CONFIG_NAME,
    AnyValue,
    module_names,
    normalize_common,
    read_config,
    reject_unknown_fields,
    save_config,
    warn_unknown_fields,
)

# Target modules when the config gives none, per model_type (the attention projections PEFT users know).
# HF PEFT's choice for every type both know (tested); Marian and mBART have none in HF PEFT, BART's here.
_Q_V = ["q_proj", "v_proj"]
DEFAULT_TARGET_MODULES = {
    **dict.fromkeys(("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "opt", "gptj",
                     "gpt_neo", "stablelm", "marian", "mbart", "bart"), _Q_V),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra"), ["query", "value"]),
    **dict.fromkeys(("t5", "mt5"), ["q", "v"]),
    **dict.fromkeys(("gpt2", "gpt_bigcode"), ["c_attn"]),
    **dict.fromkeys(("bloom", "gpt_neox", "falcon"), ["query_key_value"]),
    "deberta-v2": ["query_proj", "value_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "codegen": ["qkv_proj"],
    "mpt": ["Wqkv"],
}
INIT_LORA_WEIGHTS = (True, False, "gaussian")

# Fields of HF PEFT's LoraConfig that pefttorch does not implement; an adapter_config.json that sets one
# to anything but its default is refused rather than loaded as something else.
_UNSUPPORTED_PEFT_FIELDS = {
    "use_dora": False, "lora_bias": False, "layer_replication": None, "trainable_token_indices": None,
    "target_parameters": None, "use_qalora": False, "alora_invocation_tokens": None, "arrow_config": None,
    "use_bdlora": None, "megatron_config": None, "kasa_config": None, "monteclora_config": None,
    "astra_config": None,  # HF PEFT 0.22: builds the adapter layers its own way
    # ties a trained embedding copy to lm_head: a saved adapter with it holds an lm_head that was loaded into the
    # (tied) base embedding here, and disable_adapter()/unload() no longer gave the base model
    "ensure_weight_tying": False,
}


@dataclass
class LoraRuntimeConfig:
    """HF PEFT's runtime options of a LoRA config, as its code reads them (pefttorch has none of them)."""

    ephemeral_gpu_offload: bool = False


# Fields of HF PEFT's LoraConfig that do not change what a loaded adapter computes: initialisation settings (the
# weights are loaded), distributed and runtime options, VeLoRA's backward-only compression (name -> HF PEFT's
# default, read back when not given)
_IGNORED_PEFT_FIELDS = {"corda_config": None, "eva_config": None, "loftq_config": AnyValue(factory=dict),
                        "lora_ga_config": None, "megatron_core": "megatron.core", "qalora_group_size": 16,
                        "runtime_config": AnyValue(factory=LoraRuntimeConfig), "velora_config": None}
# Initialisations after which HF PEFT's loading changes the base weights too (it subtracts the principal part the
# adapter started from, or quantizes): the saved factors alone are not the adapter.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@reject_unknown_fields
@dataclass
class LoraConfig:
    """Configuration of a LoRA adapter; field names and meanings follow HF PEFT's ``LoraConfig``.

    Args:
        r: rank of the update (default 8).
        lora_alpha: the update is scaled by ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout on the adapter's input, in [0, 1).
        target_modules: module names (a module matches if its name equals one or ends with ``.name``), a
            regular expression matched against the full module name, or ``"all-linear"`` (every linear
            layer except the output head). None: the defaults for the model type (e.g. q_proj, v_proj).
        exclude_modules: names or a regular expression of modules never adapted.
        bias: which biases train and are saved with the adapter: ``"none"``, ``"all"`` or ``"lora_only"``.
        use_rslora: rank-stabilised scaling ``lora_alpha / sqrt(r)``.
        init_lora_weights: True (A Kaiming-uniform, B zero: the model starts unchanged), False (B random
            too, for tests) or ``"gaussian"`` (A normal with std 1/r).
        modules_to_save: modules trained in full and saved with the adapter (e.g. a new classifier), by name: a
            module matches if its name equals one or ends with ``.name`` (HF PEFT's rule), under any of its names
            (a module registered twice is wrapped under the name matched). Not containers (nn.ModuleDict, ...).
        rank_pattern, alpha_pattern: per-module r / lora_alpha, keyed by module name or regex.
        layers_to_transform, layers_pattern: adapt only these layer indices (of the ModuleList named by
            layers_pattern, default: the first numbered one).
        fan_in_fan_out: the base weight is stored (in, out), as in GPT-2's Conv1D.
        task_type: HF PEFT's task type (e.g. ``"CAUSAL_LM"``, ``"SEQ_CLS"``); as in HF PEFT, SEQ_CLS and TOKEN_CLS
            add ``classifier`` and ``score`` to modules_to_save, QUESTION_ANS ``qa_outputs`` (the new head trains).
        density_loss: a :class:`pefttorch.DensityLossConfig` (or its fields as a dict) to train with DEFT's
            density loss on the MLP activations (see :func:`pefttorch.attach_density_loss`); pefttorch only,
            a training setting: not written to adapter_config.json.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    modules_to_save: list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    fan_in_fan_out: bool = False
    task_type: str | None = None
    inference_mode: bool = False
    base_model_name_or_path: str | None = None
    revision: str | None = None
    density_loss: Any = None  # DensityLossConfig | dict | None

    peft_type = "LORA"
    # target_modules per model_type when the config gives none (AdaLoRA has HF PEFT's list of its own)
    default_target_modules: ClassVar[dict[str, list[str]]] = DEFAULT_TARGET_MODULES
    # HF PEFT's fields pefttorch lacks, accepted at their defaults (see reject_unknown_fields)
    FOREIGN_FIELDS: ClassVar[dict] = {**_UNSUPPORTED_PEFT_FIELDS,
                                      **{k: v if isinstance(v, AnyValue) else AnyValue(v)
                                         for k, v in _IGNORED_PEFT_FIELDS.items()}}

    def __post_init__(self) -> None:
        def bad(msg: str) -> ValueError:
            return ValueError(f"LoraConfig: {msg}")

        # None for none, as HF PEFT takes it (its AdaLoRA writes null for them)
        self.rank_pattern = {} if self.rank_pattern is None else self.rank_pattern
        self.alpha_pattern = {} if self.alpha_pattern is None else self.alpha_pattern
        normalize_common(self, "rank_pattern", "alpha_pattern")  # the subclasses' fields too (IncreLoRA's, AdaLoRA's)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise bad(f"r must be a positive integer, got {self.r!r}")
        if not isinstance(self.lora_alpha, (int, float)) or not math.isfinite(self.lora_alpha):
            raise bad(f"lora_alpha must be a finite number, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise bad(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise bad(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if not (isinstance(self.init_lora_weights, bool) or self.init_lora_weights == "gaussian"):
            raise bad(f"init_lora_weights={self.init_lora_weights!r} is not supported by pefttorch; supported: "
                      f"{', '.join(map(repr, INIT_LORA_WEIGHTS))}")
        for name, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if not isinstance(pattern, dict):
                raise bad(f"{name} must be a dict of module name (or regex) to value, got {type(pattern).__name__}")
        for key, rank in self.rank_pattern.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
                raise bad(f"rank_pattern[{key!r}] must be a positive integer, got {rank!r}")
        for key, alpha in self.alpha_pattern.items():
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
                raise bad(f"alpha_pattern[{key!r}] must be a finite number, got {alpha!r}")
        self.target_modules = module_names(self.target_modules, "target_modules", "LoraConfig")
        self.exclude_modules = module_names(self.exclude_modules, "exclude_modules", "LoraConfig")
        self.layers_pattern = module_names(self.layers_pattern, "layers_pattern", "LoraConfig")
        if isinstance(self.target_modules, list):
            self.target_modules = sorted(set(self.target_modules))
            if not self.target_modules:
                raise bad("target_modules is empty")
        if self.layers_pattern and not self.layers_to_transform:
            raise bad("layers_pattern only makes sense together with layers_to_transform")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            # as HF PEFT, which refuses to load such a config: a regex names the layers itself
            raise bad(f"layers_to_transform cannot be used with target_modules={self.target_modules!r} (a string: a "
                      f"regular expression over the full module name, or 'all-linear'); list the module names, or "
                      f"write the layer indices into the regex")
        if self.density_loss is not None:
            from ..density import DensityLossConfig

            if isinstance(self.density_loss, dict):
                self.density_loss = DensityLossConfig(**self.density_loss)
            if not isinstance(self.density_loss, DensityLossConfig):
                raise bad(f"density_loss must be a DensityLossConfig, a dict of its fields or None, got "
                          f"{type(self.density_loss).__name__}")

    @property
    def scaling(self) -> float:
        return self.scaling_for(self.r, self.lora_alpha)

    def scaling_for(self, r: int, alpha: float) -> float:
        return alpha / (math.sqrt(r) if self.use_rslora else r)

    # ---------------------------------------------------------------- HF PEFT's adapter_config.json

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("density_loss")  # a training setting of pefttorch's, unknown to HF PEFT
        d["peft_type"] = self.peft_type
        return d

    def save(self, directory: str | Path) -> None:
        save_config(self, directory)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """From an adapter_config.json written by pefttorch or HF PEFT.

        Fields of HF PEFT that do not change what a LoRA adapter computes (or are at their defaults) are
        ignored; a different adapter type, or a LoRA feature pefttorch does not implement, is an error.
        """
        peft_type = data.get("peft_type", "LORA")
        if peft_type not in ("LORA", cls.peft_type):  # (a subclass reads its own to_dict: IncreLoRA's, AdaLoRA's)
            raise ValueError(f"adapter type {peft_type!r} is not supported: {cls.__name__} loads "
                             f"{' and '.join(dict.fromkeys(('LORA', cls.peft_type)))} configs")
        for key, default in _UNSUPPORTED_PEFT_FIELDS.items():
            value = data.get(key, default)
            if value not in (default, None, False, {}, []):
                raise ValueError(f"this LoRA adapter uses {key}={value!r}, which pefttorch does not support")
        names = {f.name for f in fields(cls)}
        warn_unknown_fields("LoraConfig", data, names | set(_UNSUPPORTED_PEFT_FIELDS) | set(_IGNORED_PEFT_FIELDS))
        kwargs = {k: v for k, v in data.items() if k in names}
        init = kwargs.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
            raise ValueError(f"this LoRA adapter was initialised with init_lora_weights={init!r}, after which HF PEFT "
                             f"also changes the base weights when loading it; pefttorch does not. Convert it to a "
                             f"plain LoRA with HF PEFT (save_pretrained(..., path_initial_model_for_weight_conversion="
                             f"...)) and load that")
        if init not in INIT_LORA_WEIGHTS:
            # The initialisation of a trained adapter does not matter for loading it.
            kwargs["init_lora_weights"] = True
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> LoraConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: not a saved adapter")
        return cls.from_dict(read_config(path))
