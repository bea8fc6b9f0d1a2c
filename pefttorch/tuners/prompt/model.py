"""PromptModel: prompt tuning by forward pre-hooks that put learned embeddings in front of the input.

The hooks rewrite the keyword arguments of the model's forward (and, for an encoder-decoder model, of its
encoder's, which ``generate`` calls on its own): token ids become embeddings with the prompt in front, and
everything that describes the input sequence grows with it. During generation the prompt sits in the cache after
the first call; later calls only extend the attention mask and shift positions, which ``generate`` computes
without knowing of the prompt.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import warnings

import torch
from torch import nn

from .._cache import cache_length, get_cache, refuse_static
from .._hooked import HookedModel
from .config import PromptTuningConfig

# HF PEFT needs a task type to pick its model class (its prompt tuning lives in those classes): transformers' auto
# mappings say which task each model class serves (GPT2LMHeadModel is a causal LM, not a "...ForCausalLM"); class
# name suffixes serve models outside them.
TASK_MAPPINGS = (("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "SEQ_2_SEQ_LM"),
                 ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "CAUSAL_LM"),
                 ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "SEQ_CLS"),
                 ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "TOKEN_CLS"),
                 ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "QUESTION_ANS"))
TASKS = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
         ("ForTokenClassification", "TOKEN_CLS"), ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
         ("MTModel", "SEQ_2_SEQ_LM"), ("ForQuestionAnswering", "QUESTION_ANS"))


@functools.cache
def _task_of_class_name(name: str) -> str | None:
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:
        modeling_auto = None
    for mapping, task in TASK_MAPPINGS:
        for classes in getattr(modeling_auto, mapping, {}).values():
            if name in ((classes,) if isinstance(classes, str) else classes):
                return task
    return next((task for suffix, task in TASKS if name.endswith(suffix)), None)


def task_type_of(model: nn.Module) -> str:
    """HF PEFT's task type for a model, from its class; FEATURE_EXTRACTION (with a warning) where it is unknown."""
    name = type(model).__name__
    task = _task_of_class_name(name)
    if task is None:
        warnings.warn(f"{name}: no task type known for this model class, saved as FEATURE_EXTRACTION, under which "
                      "HF PEFT loads a plain encoder (no generate, no head); set the config's task_type if the "
                      "model has a task", stacklevel=3)
        task = "FEATURE_EXTRACTION"
    return task


@functools.cache
def _parameter_names(cls: type) -> list[str]:
    """The forward's parameter names of a module class (looked up once: the hook runs on every call)."""
    return list(inspect.signature(cls.forward).parameters)[1:]  # without self


# True while an adapter is built only to have saved weights copied into it (PeftModel.from_pretrained): the initial
# prompt is then not computed; a TEXT one needed its tokenizer, which a saved adapter does not (HF PEFT skips it too)
WEIGHTS_FOLLOW: contextvars.ContextVar[bool] = contextvars.ContextVar("pefttorch_weights_follow", default=False)
# {model: where its sequence classifier pools each row}, from the top hook to the head's hook (or the call's end, if it
# raised before the head) of the same call: per call, not on the model, so that threads sharing a model
# (nn.DataParallel's replicas) keep their own; per model, so that a prompted classifier called inside another's
# forward leaves the outer one's entry alone
_POOL_AT: contextvars.ContextVar[dict | None] = contextvars.ContextVar("pefttorch_pool_at", default=None)
# What a multiple-choice model takes per choice, (batch, choices, length, ...), and flattens into the batch
PER_CHOICE = ("input_ids", "inputs_embeds", "attention_mask", "token_type_ids", "position_ids")
# The modules that hold learned (or fixed sinusoidal) absolute positions, one row per position: GPT-2's and GPT-Neo's
# `wpe`, BERT's `position_embeddings`, BART's, OPT's and Marian's `embed_positions`. A model without one (rotary,
# relative or ALiBi positions) has no hard length limit.
POSITION_TABLES = ("wpe", "position_embeddings", "embed_positions")


def _position_table(model: nn.Module) -> nn.Embedding | None:
    return next((m for name, m in model.named_modules()
                 if isinstance(m, nn.Embedding) and name.rsplit(".", 1)[-1] in POSITION_TABLES), None)


def first_position(model: nn.Module) -> int:
    """The position a model numbers its first token with: padding_idx + 1 for a position table with a padding index
    (RoBERTa, XLM-R, CamemBERT), else 0."""
    table = _position_table(model)
    return table.padding_idx + 1 if table is not None and table.padding_idx is not None else 0


def position_limit(model: nn.Module) -> int | None:
    """How many positions a model with absolute position embeddings has (config.max_position_embeddings, GPT-2's
    n_positions), or None for a model without them. Those before its first_position are used up (RoBERTa's limit was
    2 too high)."""
    if _position_table(model) is None:
        return None
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = _first(config, "max_position_embeddings", "n_positions")
    if not limit:
        return None
    return int(limit) - first_position(model)


def _first(config, *names):
    """The first of a config's fields `names` that is set (models name the same field differently)."""
    return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)


class VirtualTokenModel(HookedModel):
    """What prompt and prefix tuning share: `n` virtual tokens in front of the input, which everything that
    describes the input sequence (masks, positions) must make room for, and HF PEFT's file layout."""

    key_prefix = "base_model."  # HF PEFT wraps no tuner model around a prompt-learning model: one level less

    def __init__(self, model: nn.Module, config, adapter_name: str) -> None:
        super().__init__(model, config, adapter_name)
        self.n = config.num_virtual_tokens
        self.encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        self.max_positions = position_limit(model)

    def generate(self, *args, **kwargs):
        """The model's generate; continuing from a cache an earlier call returned (``past_key_values=``, with the
        whole sequence as input, transformers' documented pattern) is made to work. generate takes the cache's
        length for the number of input tokens it holds, which the virtual tokens in it make too large: it fed the
        wrong tokens, silently. Here generate is given the tokens after the cached ones (with the whole sequence's
        mask, which it reads as "only the new inputs were passed"), and the cached ones are put back in front of
        the sequences it returns."""
        cache = get_cache(kwargs)  # under either name (transformers 5.25 renamed past_key_values to cache)
        if cache_length(cache) == 0:
            return self.model.generate(*args, **kwargs)
        key = "inputs" if "inputs" in kwargs else "input_ids"
        ids = args[0] if args else kwargs.get(key)
        if self.encoder_decoder or ids is None or kwargs.get("inputs_embeds") is not None:
            raise NotImplementedError(f"{self.method}: continuing generate from a returned key/value cache works "
                                      "for decoder-only models given input_ids; pass the whole sequence again "
                                      "without past_key_values")
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        if mask.shape[-1] != ids.shape[-1]:  # only the new tokens, with the whole sequence's mask: generate's own
            return self.model.generate(*args, **kwargs)
        cached = cache_length(cache) - self.n
        if not 0 <= cached < ids.shape[-1]:
            raise ValueError(f"{self.method}: the cache holds {cached} tokens of the sequence besides the "
                             f"{self.n} virtual ones, the input {ids.shape[-1]}: pass the whole sequence, with at "
                             "least one token more than the cache holds")
        kwargs.pop(key, None)
        # a total length (max_length, min_length, where no new-token count overrides it) is counted from the input
        # generate is given: from the tokens after the cached ones. Each setting as generate reads it: the call's
        # keyword, else the call's generation config, else the model's; unset (None, or 0 for min_length) stays so
        configs = [c for c in (kwargs.get("generation_config") or (args[1] if len(args) > 1 else None),
                               self.model.generation_config) if c is not None]

        def setting(name):
            return next((v for v in (kwargs.get(name), *(getattr(c, name, None) for c in configs)) if v), None)

        for total, new in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
            if setting(new) is None and setting(total) is not None:
                kwargs[total] = max(setting(total) - cached, 0)
        out = self.model.generate(ids[:, cached:], *args[1:], **{**kwargs, "attention_mask": mask})
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        head = ids[:, :cached].repeat_interleave(sequences.shape[0] // ids.shape[0], dim=0)
        sequences = torch.cat([head.to(sequences.device), sequences], dim=-1)
        if isinstance(out, torch.Tensor):
            return sequences
        out.sequences = sequences
        return out

    def _keywords(self, module: nn.Module, args: tuple, kwargs: dict) -> dict:
        """All arguments by keyword (transformers models take input_ids first; others must be named)."""
        if not args:
            return dict(kwargs)
        names = _parameter_names(type(module))
        if len(args) > len(names):
            raise TypeError(f"{type(module).__name__}: too many positional arguments")
        return {**dict(zip(names, args, strict=False)), **kwargs}

    def _flatten_choices(self, kw: dict) -> tuple[int, int] | None:
        """A multiple-choice model's input, (batch, choices, length), flattened into the batch in `kw` as the model
        itself flattens it (BertForMultipleChoice views every input as (batch * choices, length)), so that the
        virtual tokens go in front of each choice; returns (batch, choices) for `_unflatten_choices`, or None for
        any other input."""
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        if not ((ids is not None and ids.dim() == 3) or (embeds is not None and embeds.dim() == 4)):
            return None
        shape = tuple((ids if ids is not None else embeds).shape[:2])
        for key in PER_CHOICE:
            value = kw.get(key)
            if isinstance(value, torch.Tensor) and tuple(value.shape[:2]) == shape and value.dim() >= 3:
                kw[key] = value.flatten(0, 1)
        return shape

    @staticmethod
    def _unflatten_choices(kw: dict, shape: tuple[int, int] | None) -> None:
        """The inputs `_flatten_choices` flattened, (batch, choices, ...) again, now with the virtual tokens."""
        if shape is None:
            return
        for key in PER_CHOICE:
            value = kw.get(key)
            if isinstance(value, torch.Tensor) and value.shape[0] == shape[0] * shape[1]:
                kw[key] = value.unflatten(0, shape)

    def _refuse_other_masks(self, kw: dict, key: str = "attention_mask") -> None:
        """A 4-D (batch, 1, queries, keys) or 3-D mask has no rows and columns for the virtual tokens (it failed
        deep inside attention on the sizes, or indexed past its end): refused before anything runs."""
        mask = kw.get(key)
        if isinstance(mask, torch.Tensor) and mask.dim() != 2:
            raise ValueError(f"{self.method} takes a 2-D {key} (batch, length); got shape {tuple(mask.shape)}")

    def _refuse_past_positions(self, cached: int, length: int) -> None:
        """The virtual tokens take positions too: an input within the model's limit may not be once they are added
        (GPT-2 failed with "index out of range in self", BERT on an unrelated size). `cached`: the positions in
        front of the input's `length` tokens (the virtual tokens, and any tokens in the cache)."""
        if self.max_positions is not None and cached + length > self.max_positions:
            past = f" and {cached - self.n} cached tokens" if cached > self.n else ""
            raise ValueError(f"{self.method}: {length} tokens after {self.n} virtual tokens{past} take "
                             f"{cached + length} positions, more than the {self.max_positions} of "
                             f"{type(self.model).__name__} (config.max_position_embeddings); pass at most "
                             f"{self.max_positions - cached} tokens")

    def _grow(self, kw: dict, key: str, batch: int, fill: int) -> None:
        """`kw[key]` (batch, length, ...) with `n` entries of `fill` in front."""
        value = kw.get(key)
        if value is not None:
            front = torch.full((batch, self.n, *value.shape[2:]), fill, dtype=value.dtype, device=value.device)
            kw[key] = torch.cat([front, value.expand(batch, *value.shape[1:])], dim=1)

    def _after_virtual_tokens(self, kw: dict, past: int, length: int, batch: int, mask_key: str = "attention_mask",
                              positions_key: str = "position_ids") -> None:
        """A call whose `length` tokens follow `past` cached ones, the virtual tokens among them, where the
        caller's bookkeeping (generate's) does not count them: the 2-D mask, explicit positions and
        cache_position (passed before transformers 5.24) are made to."""
        mask = kw.get(mask_key)
        if mask is not None and mask.dim() == 2 and mask.shape[1] == past + length - self.n:
            self._grow(kw, mask_key, batch, 1)
        if kw.get(positions_key) is not None:
            kw[positions_key] = kw[positions_key] + self.n
        if kw.get("cache_position") is not None:
            kw["cache_position"] = torch.arange(past, past + length, device=kw["cache_position"].device)

    def exported_config(self, config):
        """The config as saved (fields HF PEFT needs that the user may have left to be read from the model)."""
        return config

    def export_adapter(self, name: str):
        config = self.peft_config[name]
        task = config.task_type or task_type_of(self.model)
        tensors = self.adapter_state_dict(name)
        heads = [n for n in ("classifier", "score") if isinstance(getattr(self.model, n, None), nn.Module)]
        modules_to_save = config.modules_to_save
        if task == "SEQ_CLS" and not config.modules_to_save and heads:
            # HF PEFT's sequence classifier always loads its head from the file: write the (frozen) head in use
            modules_to_save = heads
            for head in heads:
                for key, value in getattr(self.model, head).state_dict().items():
                    tensors[f"{self.key_prefix}{head}.{key}"] = value.detach()
        config = self.exported_config(config).replace(task_type=task, modules_to_save=modules_to_save)
        return config, tensors


class PromptModel(VirtualTokenModel):
    """A model with a learned prompt (one adapter set, named by the PeftModel)."""

    method = "prompt tuning"

    def __init__(self, model: nn.Module, config: PromptTuningConfig, adapter_name: str = "default",
                 extra: dict[str, nn.Parameter] | None = None) -> None:
        super().__init__(model, config, adapter_name)
        for name, param in (extra or {}).items():  # a variant's own parameters, registered before finish()
            self.register_parameter(name, param)
        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if not isinstance(embedding, nn.Embedding):
            raise ValueError(f"prompt tuning needs a transformers model with an nn.Embedding input embedding; "
                             f"{type(model).__name__} has {type(embedding).__name__}")
        # the model's own modules, kept unregistered here (registered twice they would be saved twice)
        object.__setattr__(self, "embedding", embedding)
        width = embedding.embedding_dim
        if config.token_dim not in (None, width):
            raise ValueError(f"PromptTuningConfig.token_dim={config.token_dim} but the model embeds tokens in {width}")
        object.__setattr__(self, "encoder", model.get_encoder() if self.encoder_decoder else None)
        # Marian-style encoders scale embeddings they compute from ids, not embeddings they are given
        self.embed_scale = float(getattr(self.encoder, "embed_scale", 1.0) or 1.0)
        weight = embedding.weight
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        rows = self.n * (config.num_transformer_submodules or 1)  # HF PEFT's seq2seq files hold 2n, use n
        self.prompt = nn.Parameter(self._initial_prompt(config, rows).to(device=weight.device, dtype=dtype))
        # A sequence classifier's labels are per sequence, whatever their shape (multi-label (batch, labels) may be as
        # wide as the input): only other models' labels of the input's length are per token and grow with the prompt.
        self.sequence_labels = (config.task_type or _task_of_class_name(type(model).__name__)) == "SEQ_CLS"
        self.hook(model.register_forward_pre_hook(self._top_hook, with_kwargs=True))
        if self.encoder is not None:
            self.hook(self.encoder.register_forward_pre_hook(self._encoder_hook, with_kwargs=True))
        self.finish()
        # A decoder sequence classifier pools its head's output at each row's last token that is not padding, found
        # in input_ids; given the prompted embeddings instead it pools the last column, a pad token on right-padded
        # rows (HF PEFT's prompt tuning does). The head's hook puts the right token's logits there. After finish(),
        # which may wrap the head: a hook of the head itself would be deep-copied into the wrapper's copy.
        head = next((h for h in (getattr(model, n, None) for n in ("score", "classifier")) if isinstance(h, nn.Module)),
                    None)  # CTRL's and ModernBERT-decoder's are `classifier`; an encoder's, 2-D, is left alone
        self._pools = self.sequence_labels and self.encoder is None and head is not None
        self._traced_pool: torch.Tensor | None = None  # _POOL_AT's entry while torch.compile traces (see _pool_at)
        if self._pools:
            self.hook(head.register_forward_hook(self._pool_hook))
            self.hook(model.register_forward_hook(self._end_pool, always_call=True))

    @torch.no_grad()
    def _initial_prompt(self, config: PromptTuningConfig, rows: int) -> torch.Tensor:
        weight = self.embedding.weight
        if WEIGHTS_FOLLOW.get():  # loading: the saved prompt replaces it (TEXT init needed the tokenizer for nothing)
            return torch.zeros(rows, weight.shape[1], device="cpu")
        if weight.device.type == "meta":  # no values to start from: a meta prompt, loaded or materialized with it
            return torch.empty(rows, weight.shape[1], device="meta")
        if config.prompt_tuning_init == "RANDOM":
            return torch.randn(rows, weight.shape[1], device="cpu")  # the global CPU generator's draws
        if config.prompt_tuning_init == "SAMPLE_VOCAB":
            ids = torch.randint(0, weight.shape[0], (rows,), device="cpu")
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **(config.tokenizer_kwargs or {}))
            text_ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
            if not text_ids:
                raise ValueError("PromptTuningConfig: prompt_tuning_init_text tokenizes to nothing")
            ids = torch.tensor((text_ids * (rows // len(text_ids) + 1))[:rows])
        # the module called, not its weight indexed: BART's and Gemma's embeddings scale inside their forward
        return self.embedding(ids.to(weight.device)).float().cpu() * self.embed_scale

    # ------------------------------------------------------------------ HookedModel

    def adapter_parameters(self):
        return [self.prompt]

    def own_tensors(self):
        return {"prompt_embeddings": self.prompt}  # HF PEFT's key

    def exported_config(self, config):
        return config.replace(token_dim=self.embedding.embedding_dim,
                              num_transformer_submodules=config.num_transformer_submodules or 1)

    # ------------------------------------------------------------------ the hooks

    def _prompt(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        return self.prompt[: self.n].to(dtype).unsqueeze(0).expand(batch, -1, -1)

    def _embeddings(self, kw: dict, start: int = 0) -> torch.Tensor:
        """The input's embeddings (from `kw`'s ids if it has none), whose first token sits at position `start`
        of the input (after the prompt)."""
        embeds = kw.get("inputs_embeds")
        if embeds is not None and kw.get("input_ids") is not None:
            # as the model itself: it cannot tell which of the two is the input (the ids were silently dropped)
            raise ValueError(f"{self.method}: you must specify exactly one of input_ids or inputs_embeds")
        if embeds is None:
            ids = kw.get("input_ids")
            if ids is None:
                raise ValueError("prompt tuning needs input_ids or inputs_embeds")
            embeds = self.embedding(ids)
            if self.embed_scale != 1.0:
                embeds = embeds * self.embed_scale
        return self.update_embeddings(embeds, start, kw.get("attention_mask"))

    def update_embeddings(self, embeds: torch.Tensor, start: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        """What a variant changes in the input's own embeddings (DePT: a low-rank update per position). The input's
        first token is at column `start` of the whole sequence (a generation step's); `mask`, the attention mask
        (over the whole sequence, the virtual tokens not included), says which columns are tokens."""
        return embeds

    def _with_prompt(self, kw: dict) -> int:
        """Puts the prompt in front of the input embeddings in `kw`; returns the input's own length."""
        embeds = self._embeddings(kw)
        batch, length = embeds.shape[:2]
        kw["input_ids"] = None
        kw["inputs_embeds"] = torch.cat([self._prompt(batch, embeds.dtype), embeds], dim=1)
        return length

    def _top_hook(self, module, args, kwargs):
        self._pool_at(None)
        if self.disabled:
            return None
        kw = self._keywords(module, args, kwargs)
        if self.encoder_decoder:  # the encoder's hook checks the input's length against the positions
            self._refuse_other_masks(kw)
            self._mask_for_encoder_output(kw)
            return (), kw
        n = self.n
        choices = self._flatten_choices(kw)
        # first: generate masks a static cache 4-D, which the mask check refused, naming a mask the user never gave
        refuse_static(get_cache(kw), self.method)
        self._refuse_other_masks(kw)
        past_length = cache_length(get_cache(kw))
        source = kw.get("inputs_embeds") if kw.get("inputs_embeds") is not None else kw.get("input_ids")
        if source is None:
            raise ValueError("prompt tuning needs input_ids or inputs_embeds")
        batch, length = source.shape[:2]
        self._refuse_past_positions(past_length or n, length)  # a generation step's cache holds the prompt
        if past_length == 0:  # the whole input: the prompt goes in front
            self._pool_at(self._last_real_tokens(module, kw.get("input_ids")))
            self._with_prompt(kw)
            self._grow(kw, "attention_mask", batch, 1)
            self._grow(kw, "token_type_ids", batch, 0)
            labels = kw.get("labels")
            if labels is not None and not self.sequence_labels and labels.dim() >= 2 and labels.shape[1] == length:
                self._grow(kw, "labels", batch, -100)
            for name in ("start_positions", "end_positions"):  # a question answering model's: they index the input
                if kw.get(name) is not None:
                    # The model clamps them to [0, its length] and ignores its length (a span outside the input): a
                    # negative one stays the first token, one past the input stays past it, none lands on the prompt
                    kw[name] = kw[name].clamp(min=0) + n
            positions = kw.get("position_ids")
            if positions is not None:
                # the prompt takes the positions from the row's first real token on, and the input moves past it:
                # the caller's numbering kept, whatever it starts from (RoBERTa's own from padding_idx + 1, where a
                # prompt at 0 sat on the padding row; generate's from 0; padding, masked, not counted)
                positions = positions.expand(batch, positions.shape[-1]) if positions.dim() == 2 else positions
                mask = kw.get("attention_mask")
                real = mask[:, n:] != 0 if mask is not None and mask.dim() == 2 and mask.shape[1] == n + length \
                    else torch.ones_like(positions, dtype=torch.bool)
                start = torch.where(real, positions, positions.max()).amin(dim=1, keepdim=True)
                front = start + torch.arange(n, device=positions.device, dtype=positions.dtype)
                kw["position_ids"] = torch.cat([front, positions + n], dim=1)
            if kw.get("cache_position") is not None:
                kw["cache_position"] = torch.arange(n + length, device=kw["cache_position"].device)
        else:  # a generation step: the prompt is in the cache; generate's bookkeeping does not know of it
            if type(self).update_embeddings is not PromptModel.update_embeddings:
                kw["inputs_embeds"], kw["input_ids"] = self._embeddings(kw, start=past_length - n), None
            self._after_virtual_tokens(kw, past_length, length, batch)
        self._unflatten_choices(kw, choices)
        return (), kw

    def _last_real_tokens(self, model: nn.Module, ids: torch.Tensor | None) -> torch.Tensor | None:
        """Where a sequence classifier pools each row, after the prompt: its last token that is not padding, as
        transformers finds it from input_ids (None: no ids, or no pad token to find)."""
        config = getattr(model, "config", None)
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        pad = getattr(config, "pad_token_id", None)
        if not self._pools or ids is None or pad is None or ids.dim() != 2:
            return None
        positions = torch.arange(ids.shape[-1], device=ids.device, dtype=torch.int32)
        return self.n + (positions * (ids != pad).to(torch.int32)).argmax(-1)

    def _pool_at(self, last: torch.Tensor | None) -> None:
        """Sets (None: clears) this model's entry in _POOL_AT; the dict is replaced, never changed in place, since
        other contexts (threads) may hold it. While torch.compile traces, on the model: dynamo cannot trace a
        ContextVar (a graph break per call, an error with fullgraph), and a trace runs in one thread."""
        if torch.compiler.is_compiling():
            self._traced_pool = last
            return
        pools = {m: v for m, v in (_POOL_AT.get() or {}).items() if m is not self}
        if last is not None:
            pools[self] = last
        _POOL_AT.set(pools)

    def _pool_hook(self, module, args, output):
        last = self._traced_pool if torch.compiler.is_compiling() else (_POOL_AT.get() or {}).get(self)
        self._pool_at(None)  # one forward's
        if last is None or not isinstance(output, torch.Tensor) or output.dim() != 3:
            return None
        rows = torch.arange(output.shape[0], device=output.device)
        output = output.clone()
        output[rows, -1] = output[rows, last.to(output.device)]
        return output

    def _end_pool(self, module, args, output) -> None:
        """Clears this call's _POOL_AT entry however the call ends: a forward that raised before the head (an id
        past the vocabulary) left it, and its key (this model) kept the whole model alive after the caller let it
        go."""
        self._pool_at(None)

    def _mask_for_encoder_output(self, kw: dict) -> None:
        """An encoder-decoder model's attention mask (also the decoder's cross-attention mask) must cover the
        prompt the encoder output starts with."""
        mask = kw.get("attention_mask")
        if mask is None:
            return
        encoder_outputs = kw.get("encoder_outputs")
        if encoder_outputs is not None:
            short = mask.shape[1] == encoder_outputs[0].shape[1] - self.n
        else:
            source = kw.get("inputs_embeds") if kw.get("inputs_embeds") is not None else kw.get("input_ids")
            short = source is not None and mask.shape[1] == source.shape[1]
        if short:
            self._grow(kw, "attention_mask", mask.shape[0], 1)

    def _encoder_hook(self, module, args, kwargs):
        if self.disabled:
            return None
        kw = self._keywords(module, args, kwargs)
        self._refuse_other_masks(kw)
        mask, source = kw.get("attention_mask"), kw.get("inputs_embeds")
        source = kw.get("input_ids") if source is None else source
        if source is not None:
            self._refuse_past_positions(self.n, source.shape[1])
        if mask is not None and source is not None and mask.shape[1] == source.shape[1] + self.n:
            # the top hook widened it for the encoder output: the input's own columns are the ones DePT's
            # positions count, and the prompt's (ones) go back in front below
            kw["attention_mask"] = mask[:, self.n:]
        length = self._with_prompt(kw)
        mask = kw.get("attention_mask")
        if mask is not None and mask.shape[1] == length:
            self._grow(kw, "attention_mask", mask.shape[0], 1)
        return (), kw


class DeptModel(PromptModel):
    """DePT: prompt tuning with a shorter prompt and a low-rank, per-position update of the input embeddings."""

    method = "DePT"
    key_prefix = "base_model.model."  # pefttorch's own format: as the other hooked methods

    def __init__(self, model: nn.Module, config, adapter_name: str = "default") -> None:
        width, weight = model.get_input_embeddings().embedding_dim, model.get_input_embeddings().weight
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        a = torch.empty(config.max_length, config.r, device=weight.device, dtype=dtype)
        nn.init.kaiming_uniform_(a, a=5**0.5)  # as nn.Linear's weight, LoRA's A
        b = torch.zeros(config.r, width, device=weight.device, dtype=dtype)  # the update starts at nothing
        # set before PromptModel's __init__, which marks what trains
        super().__init__(model, config, adapter_name, extra={"dept_A": nn.Parameter(a), "dept_B": nn.Parameter(b)})

    def update_embeddings(self, embeds: torch.Tensor, start: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        length, rows = embeds.shape[1], self.dept_A.shape[0]
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] >= length:
            # A token's position counts the tokens before it, not the columns: a left-padded row in a batch gets
            # the update it gets alone (with right padding, as in training, and no padding, the two agree)
            positions = (mask.long().cumsum(-1)[:, -length:] - 1).clamp(min=0, max=rows)  # rows: past max_length
            table = torch.cat([self.dept_A @ self.dept_B, self.dept_B.new_zeros(1, self.dept_B.shape[1])])
            return embeds + nn.functional.embedding(positions, table).to(embeds.dtype)
        covered = max(0, min(length, rows - start))  # positions past max_length get no update
        if covered == 0:
            return embeds
        update = (self.dept_A[start:start + covered] @ self.dept_B).to(embeds.dtype)
        if covered < length:
            update = torch.cat([update, update.new_zeros(length - covered, update.shape[1])])
        return embeds + update

    def adapter_parameters(self):
        return [self.prompt, self.dept_A, self.dept_B]

    def own_tensors(self):
        return {"prompt_embeddings": self.prompt, "dept_A": self.dept_A, "dept_B": self.dept_B}

    def export_adapter(self, name: str):
        return self.peft_config[name], self.adapter_state_dict(name)

    def parameter_groups(self, prompt_lr: float, embedding_lr: float, **options) -> list[dict]:
        """Optimizer parameter groups with DePT's two learning rates (the paper's prompt lr is far larger than
        the embedding update's), plus any modules_to_save at the embedding rate; `options` (e.g.
        weight_decay) go into every group."""
        rest = [p for _, w in self._wrappers() for p in w.modules_to_save.parameters() if p.requires_grad]
        return [{"params": [self.prompt], "lr": prompt_lr, **options},
                {"params": [self.dept_A, self.dept_B, *rest], "lr": embedding_lr, **options}]
