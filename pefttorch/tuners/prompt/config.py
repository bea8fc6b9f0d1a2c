"""PromptTuningConfig and PrefixTuningConfig: learned virtual tokens in front of the input, or in front of every
attention layer's keys and values (HF PEFT's fields and formats); DeptConfig."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .._config import SavedConfig, normalize_common, reject_unknown_fields

PROMPT_TUNING = "PROMPT_TUNING"
DEPT = "DEPT"
PREFIX_TUNING = "PREFIX_TUNING"
INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")


def _positive(config, names, optional: bool) -> None:
    for key in names:
        value = getattr(config, key)
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{type(config).__name__}: {key} must be a positive integer, got {value!r}")


@dataclass
class PromptLearningConfig(SavedConfig):
    """The fields HF PEFT's prompt-learning methods share (its PromptLearningConfig's): the number of virtual
    tokens, the model dimensions they are shaped by (None: read from the model), modules_to_save and the task.
    Subclasses set `peft_type_name` and call ``super().__post_init__()``."""

    num_virtual_tokens: int = 20
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        normalize_common(self)  # first: it makes numpy's numbers plain for the checks (the subclasses' fields too)
        _positive(self, ["num_virtual_tokens"], optional=False)
        _positive(self, ["token_dim", "num_attention_heads", "num_layers"], optional=True)
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ValueError(f"{type(self).__name__}: num_transformer_submodules must be 1, 2 or None")


@reject_unknown_fields
@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning (Lester et al. 2021): `num_virtual_tokens` learned embeddings are put in front of every
    input sequence (an encoder-decoder model's encoder input); the model itself stays frozen.

    Args:
        num_virtual_tokens: length of the learned prompt.
        prompt_tuning_init: ``"SAMPLE_VOCAB"`` (default: rows of the model's own embedding matrix drawn at
            random, at the scale the model expects; Lester et al. found it better than random), ``"RANDOM"``
            (HF PEFT's default: N(0, 1), far larger than most models' embeddings) or ``"TEXT"`` (the embeddings of
            `prompt_tuning_init_text`, tokenized by the tokenizer at `tokenizer_name_or_path`, repeated or cut to
            length).
        token_dim: the embedding width; None: read from the model.
        task_type: as in HF PEFT (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ``"SEQ_2_SEQ_LM"``, ``"TOKEN_CLS"``, ...);
            None: inferred from the model class when saving (HF PEFT needs it to load the prompt).
        modules_to_save: modules trained in full and saved with the prompt (e.g. a new classifier).
    Inputs grow by the prompt: attention masks and token type ids are extended, token-level labels get -100 in
    front, position ids are shifted; a causal LM's logits include the prompt's positions, as in HF PEFT. Saved
    in HF PEFT's format (``prompt_embeddings``), loadable by ``peft.PeftModel.from_pretrained``.
    """

    prompt_tuning_init: str = "SAMPLE_VOCAB"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None
    peft_type: str = field(default=PROMPT_TUNING, init=False)
    peft_type_name: ClassVar[str] = PROMPT_TUNING

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        init = str(getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)).upper()
        if init not in INITS:
            raise ValueError(f"{name}: prompt_tuning_init must be one of {', '.join(INITS)}, got "
                             f"{self.prompt_tuning_init!r}")
        self.prompt_tuning_init = init
        if init == "TEXT" and not (self.prompt_tuning_init_text and self.tokenizer_name_or_path):
            raise ValueError(f"{name}: prompt_tuning_init='TEXT' needs prompt_tuning_init_text and "
                             "tokenizer_name_or_path")


@reject_unknown_fields
@dataclass
class DeptConfig(PromptTuningConfig):
    """DePT (Shi and Lipani 2024, "Decomposed Prompt Tuning"): a shorter prompt plus a low-rank update of the
    input's own token embeddings, ``E + A B`` position by position (A: (max_length, r), B: (r, width)), trained
    with two learning rates (see ``model.parameter_groups(prompt_lr, embedding_lr)``).

    Args:
        num_virtual_tokens, prompt_tuning_init, ...: as in PromptTuningConfig (default prompt 20 tokens).
        r: rank of the embedding update.
        max_length: positions the update covers; tokens further on (long inputs, generated tokens) get none.
    A starts Kaiming-uniform and B at zero, so the update starts at nothing. Saved in pefttorch's format
    (``prompt_embeddings``, ``dept_A``, ``dept_B``); HF PEFT has no DePT.
    """

    r: int = 8
    max_length: int = 256
    peft_type: str = field(default=DEPT, init=False)
    peft_type_name: ClassVar[str] = DEPT

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(self, ["r", "max_length"], optional=False)


@reject_unknown_fields
@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning (Li and Liang 2021): `num_virtual_tokens` learned keys and values in front of every
    attention layer's own (in the key/value cache the model reads); the model itself stays frozen.

    Args:
        num_virtual_tokens: length of the prefix.
        prefix_projection: train the prefix through the reparameterisation of the paper, a small MLP
            (``Linear(token_dim, encoder_hidden_size) -> tanh -> Linear(., num_layers * 2 * token_dim)``) over
            `num_virtual_tokens` embeddings of width `token_dim`, which steadies training; ``model.fold_prefix()``
            replaces it by the prefix it computes once training is done, and saving writes that prefix.
        encoder_hidden_size: the MLP's hidden width; None: `token_dim`.
        init_weights: None (random, as HF PEFT) or ``"zero"`` (a zero prefix, or a zero last MLP layer).
        token_dim, num_attention_heads, num_layers: the keys' width (heads x head width: for grouped-query
            attention, the key/value heads), their head count and the number of attention layers (a decoder's,
            in an encoder-decoder model); None: read from the model.
        num_transformer_submodules: 2 for encoder-decoder models (HF PEFT's layout), else 1; None: from the model.
        task_type, modules_to_save: as in PromptTuningConfig.
    As in HF PEFT, an encoder-decoder model's prefix sits in the decoder's self-attention; positions after the
    prefix are counted from its end (the model's own rule for a filled cache). Saved in HF PEFT's format
    (``prompt_embeddings``: the prefix itself, num_virtual_tokens x num_layers * 2 * token_dim).
    """

    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    init_weights: str | None = None
    peft_type: str = field(default=PREFIX_TUNING, init=False)
    peft_type_name: ClassVar[str] = PREFIX_TUNING

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        _positive(self, ["encoder_hidden_size"], optional=True)
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"{name}: init_weights must be None or 'zero', got {self.init_weights!r}")
        if self.token_dim is not None and self.num_attention_heads is not None \
                and self.token_dim % self.num_attention_heads:
            raise ValueError(f"{name}: token_dim={self.token_dim} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")

    def loaded(self) -> PrefixTuningConfig:
        """The config a saved adapter loads with. The file holds the prefix itself (HF PEFT's too, when it trained
        through the MLP): loaded, the prefix is what trains on, so there is no projection."""
        return self.replace(prefix_projection=False)

    @classmethod
    def from_dict(cls, data):
        return super().from_dict(data).loaded()
