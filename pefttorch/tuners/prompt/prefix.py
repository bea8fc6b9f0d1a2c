"""PrefixModel: prefix tuning by a forward pre-hook that hands the model a key/value cache holding the prefix.

Every attention layer reads keys and values from the cache in front of its own, so a cache that already holds
`n` learned keys and values per layer is the whole method: nothing inside the model changes. The hook builds
that cache when a call starts without one (or with an empty one: the first step of ``generate``), and makes
room for the prefix in what describes the sequence (the attention mask, explicit positions), as the prompt
tuning hooks do. Later generation steps find the prefix in the cache they are given.
"""

from __future__ import annotations

import contextvars
import functools
import threading

import torch
from torch import nn

from .._cache import cache_key, cache_length, refuse_static
from .config import PrefixTuningConfig
from .model import VirtualTokenModel, _first, _parameter_names, _task_of_class_name

# {model: its running calls, innermost last: (the cache each started, or None; whether it let the checkpointed layers
# keep the cache)}, from the hook that starts a call to the check when it returns. Per call, not on the model: two
# threads calling one model took each other's cache (the check read the other call's, and "layers did not read the
# prefix" was raised on a correct call); per model, so that a prefix-tuned model called inside another's forward
# leaves the outer one's alone; a stack, so that a call nested in the same model's leaves the outer call's.
_RUNNING: contextvars.ContextVar[dict | None] = contextvars.ContextVar("pefttorch_prefix_running", default=None)
# Guards the count of running calls that let the checkpointed layers (shared by all threads) keep the cache
_GRANTS = threading.Lock()


def _text_config(config):
    """A composite (e.g. vision-language) config's text part; any other config itself (asked for a "decoder
    text config", some encoder-decoder configs answer with a fresh default config)."""
    return config.get_text_config(decoder=True) if getattr(config, "text_config", None) is not None else config


def attention_shape(model: nn.Module) -> tuple[int, int, int, bool]:
    """(attention layers, key/value heads, head width, encoder-decoder) of a transformers model; the layers
    and heads of the decoder where the model has one (the prefix sits in its self-attention)."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"prefix tuning needs a transformers model with a config; {type(model).__name__} has none")
    config = _text_config(config)
    enc_dec = bool(getattr(config, "is_encoder_decoder", False))
    layers = _first(config, *(("num_decoder_layers", "decoder_layers") if enc_dec else ()), "num_hidden_layers",
                    "num_layers", "n_layer")
    heads = _first(config, *(("decoder_attention_heads",) if enc_dec else ()), "num_attention_heads", "num_heads",
                   "n_head")
    width = _first(config, "hidden_size", "d_model", "n_embd")
    if not (layers and heads and width):
        raise ValueError(f"prefix tuning cannot read the attention layout of {type(model).__name__} from its config "
                         "(it needs the layer count, num_hidden_layers / num_layers / n_layer, the head count, "
                         "num_attention_heads / num_heads / n_head, and the width, hidden_size / d_model / n_embd)")
    head_dim = _first(config, "head_dim", "d_kv") or width // heads
    kv_heads = _first(config, "num_key_value_heads") or heads  # grouped-query attention keeps fewer
    return int(layers), int(kv_heads), int(head_dim), enc_dec


def _reentrant(layer: nn.Module) -> bool:
    """Whether a transformers layer checkpoints with torch's reentrant variant (its default when not told)."""
    func = getattr(layer, "_gradient_checkpointing_func", None)
    return getattr(func, "keywords", {}).get("use_reentrant", True) is not False


@functools.cache
def _prefix_cache_class():
    from transformers import DynamicCache

    class PrefixCache(DynamicCache):
        """A DynamicCache that starts with the prefix and records which layers read it. Read-only (each layer
        gets the prefix in front of its keys, nothing is stored) while gradient checkpointing trains: a
        checkpointed layer then replays exactly what it computed, and transformers may hand it the cache."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.read_only, self.reads = False, set()  # the hook seals it once the prefix is in

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            self.reads.add(layer_idx)
            if self.read_only:
                layer = self.layers[layer_idx]
                return (torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2))
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    return PrefixCache


@functools.cache
def _read_only_cross_cache_class():
    from transformers import DynamicCache

    class CrossCache(DynamicCache):
        """An encoder-decoder model's cross-attention cache that stores nothing, for training under gradient
        checkpointing: a stored one made the recomputation read back the keys and values of the encoder's output
        that the first forward kept (without a graph under reentrant checkpointing: the encoder got no gradient
        through them, silently; a different saved-tensor count under the non-reentrant one)."""

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            return key_states, value_states

    return CrossCache


def _cache_classes() -> dict[str, type]:
    """The cache classes the hooks build and test for, resolved when the model is built (or unpickled): dynamo
    cannot trace an import from transformers' lazy module, and an import in a hook broke a compiled model's graph at
    every call."""
    from transformers import Cache, DynamicCache, EncoderDecoderCache

    return {"prefix": _prefix_cache_class(), "cross": _read_only_cross_cache_class(), "dynamic": DynamicCache,
            "enc_dec": EncoderDecoderCache, "any": Cache}


class _NeverUpdated(dict):
    """EncoderDecoderCache.is_updated for a CrossCache: the model marks a layer's cross keys and values as stored
    after computing them, and would read them back from the empty cache."""

    def __setitem__(self, key, value) -> None:
        pass


# the model types built on T5's stacks, whose encoder-only and question answering models hand their layers no cache
_T5_TYPES = ("t5", "mt5", "umt5", "longt5", "switch_transformers", "udop")


class PrefixModel(VirtualTokenModel):
    """A model with a learned key/value prefix in every attention layer (one adapter set)."""

    method = "prefix tuning"

    def __init__(self, model: nn.Module, config: PrefixTuningConfig, adapter_name: str = "default") -> None:
        name = type(model).__name__
        t5_like = getattr(getattr(model, "config", None), "model_type", None) in _T5_TYPES
        if t5_like and name.endswith(("EncoderModel", "ForTokenClassification", "ForQuestionAnswering")):
            # T5's encoder stack (and its kin's) reads no cache, and the QA model hands its decoder cache=None: the
            # prefix reached no layer. The call failed inside the model (on the grown mask, or on a second cache
            # argument) or, unmasked, after the forward; HF PEFT refuses the first two as well
            raise ValueError(f"prefix tuning cannot adapt {name}: its attention layers are handed no key/value cache, "
                             "which is where the prefix goes (an encoder-only T5 reads none; the question answering "
                             "model gives its decoder none); use prompt tuning, LoRA or (IA)^3")
        layers, heads, head_dim, enc_dec = attention_shape(model)
        given = {"num_layers": config.num_layers, "num_attention_heads": config.num_attention_heads,
                 "token_dim": config.token_dim}
        actual = {"num_layers": layers, "num_attention_heads": heads, "token_dim": heads * head_dim}
        wrong = [f"{k}={v} (the model has {actual[k]})" for k, v in given.items() if v is not None and v != actual[k]]
        if wrong:
            raise ValueError(f"PrefixTuningConfig does not fit {type(model).__name__}: {', '.join(wrong)}")
        submodules = 2 if enc_dec else 1
        if config.num_transformer_submodules not in (None, submodules):
            raise ValueError(f"PrefixTuningConfig.num_transformer_submodules={config.num_transformer_submodules}, "
                             f"but {type(model).__name__} needs {submodules}")
        # the config as HF PEFT writes it: every dimension filled in
        config = config.replace(num_layers=layers, num_attention_heads=heads, token_dim=heads * head_dim,
                                num_transformer_submodules=submodules,
                                encoder_hidden_size=config.encoder_hidden_size or heads * head_dim)
        super().__init__(model, config, adapter_name)
        self.layers, self.heads, self.head_dim = layers, heads, head_dim
        # An encoder-decoder model left without a decoder input makes one: a seq2seq LM (BART's, T5's
        # ...ForConditionalGeneration) from its labels, the token labels it is trained on; BART-family models and
        # T5's classification head from input_ids (their labels are per sequence or are positions).
        self.decoder_from_labels = (_task_of_class_name(type(model).__name__) or config.task_type) == "SEQ_2_SEQ_LM"
        weight = next(p for p in model.parameters() if p.is_floating_point())
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        factory = {"device": weight.device, "dtype": dtype}
        width, zero = 2 * layers * config.token_dim, config.init_weights == "zero"
        if config.prefix_projection and not config.inference_mode:
            # the reparameterisation: n embeddings through an MLP (nn.Embedding's and nn.Linear's inits, as HF PEFT)
            self.prefix_tokens = nn.Parameter(torch.randn(self.n, config.token_dim, **factory))
            self.prefix_mlp = nn.Sequential(nn.Linear(config.token_dim, config.encoder_hidden_size, **factory),
                                            nn.Tanh(), nn.Linear(config.encoder_hidden_size, width, **factory))
            if zero:
                nn.init.zeros_(self.prefix_mlp[-1].weight)
                nn.init.zeros_(self.prefix_mlp[-1].bias)
        else:
            init = torch.zeros if zero else torch.randn
            self.prefix_embeddings = nn.Parameter(init(self.n, width, **factory))
        self._traced_calls: tuple = ()  # _RUNNING's entry while torch.compile traces (see _set_calls)
        self._grants = 0  # running calls (in any thread) that let the checkpointed layers keep the cache
        from transformers.modeling_layers import GradientCheckpointingLayer

        self._cache_classes = _cache_classes()
        self._checkpointed = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        # the layers that read the prefix (an encoder's, a vision tower's are handed no cache)
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        for layer in self._checkpointed if decoder is None else [m for m in decoder.modules()
                                                                  if isinstance(m, GradientCheckpointingLayer)]:
            self.hook(layer.register_forward_pre_hook(self._layer_hook, with_kwargs=True))
        self.hook(model.register_forward_pre_hook(self._hook, with_kwargs=True))
        self.hook(model.register_forward_hook(self._check, always_call=True))
        self.finish()

    # The cache classes are made by functions (they subclass transformers' DynamicCache, imported lazily), which
    # pickle cannot name: a saved model (torch.save) gets them again when loaded.
    def __getstate__(self) -> dict:
        state = super().__getstate__().copy()
        del state["_cache_classes"]
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._cache_classes = _cache_classes()

    @property
    def projected(self) -> bool:
        return hasattr(self, "prefix_mlp")

    def prefix(self) -> torch.Tensor:
        """The prefix, (num_virtual_tokens, num_layers * 2 * token_dim): per layer its keys, then its values."""
        return self.prefix_mlp(self.prefix_tokens) if self.projected else self.prefix_embeddings

    @torch.no_grad()
    def fold_prefix(self) -> None:
        """Replaces the reparameterisation MLP by the prefix it computes (once training is done: the model
        computes the same, with fewer parameters and no MLP per call). The folded prefix still trains unless the
        adapter is in inference mode; an optimizer built before must be built again."""
        if not self.projected:
            return
        folded = nn.Parameter(self.prefix().detach().clone(), requires_grad=self.prefix_tokens.requires_grad)
        del self.prefix_mlp, self.prefix_tokens
        self.prefix_embeddings = folded
        name = self.active_adapters[0]
        self.peft_config[name] = self.peft_config[name].replace(prefix_projection=False)

    # ------------------------------------------------------------------ HookedModel

    def adapter_parameters(self):
        return [self.prefix_tokens, *self.prefix_mlp.parameters()] if self.projected else [self.prefix_embeddings]

    def own_tensors(self):
        # HF PEFT's key and layout; with the MLP, the prefix it computes (what HF PEFT saves, and what is loaded)
        return {"prompt_embeddings": self.prefix().detach() if self.projected else self.prefix_embeddings}

    def exported_config(self, config):
        return config.replace(prefix_projection=False)  # the file holds the prefix itself, not the MLP

    # ------------------------------------------------------------------ the cache

    def _layer_prefixes(self, batch: int):
        """(key, value) of each layer, (batch, heads, n, head width) in the model's dtype, in HF PEFT's layout:
        rows 2i and 2i+1 of the prefix for layer i; an encoder-decoder model reads a twice-repeated prefix
        four rows per layer (the other two were meant for the cross-attention, which HF PEFT leaves alone)."""
        # the dtype the model computes in now, not at construction: a later .to(torch.bfloat16) or .float() moves it
        model_dtype = next(p.dtype for p in self.model.parameters() if p.is_floating_point())
        rows = self.prefix().to(model_dtype).view(self.n, 2 * self.layers, self.heads, self.head_dim)
        step = 2
        if self.encoder_decoder:
            rows, step = torch.cat([rows, rows], dim=1), 4
        rows = rows.permute(1, 2, 0, 3)  # (rows, heads, n, head width)
        for i in range(self.layers):
            yield (rows[step * i].unsqueeze(0).expand(batch, -1, -1, -1),
                   rows[step * i + 1].unsqueeze(0).expand(batch, -1, -1, -1))

    def _prefilled_cache(self, batch: int, read_only: bool, given=None):
        """The cache a new sequence starts with, the prefix in every layer, and its part that holds the prefix (what
        `_check` reads). `given`, an empty cache the caller passed (as to the base model, to step on with it), is
        filled in place: replaced, it stayed empty and the caller's next step computed without the prefix and the
        tokens, silently."""
        classes = self._cache_classes
        if given is not None:
            if read_only:
                # the checkpointed layers store nothing (transformers drops any other cache they are handed)
                raise ValueError("prefix tuning: a key/value cache passed in cannot be filled while gradient "
                                 "checkpointing trains (the layers get a read-only cache holding the prefix); pass "
                                 "none, or train without gradient checkpointing")
            cache = given.self_attention_cache if isinstance(given, classes["enc_dec"]) else given
            for i, (key, value) in enumerate(self._layer_prefixes(batch)):
                cache.update(key, value, i)
            return given, cache
        # a decoder-only model's config says which layers slide (their cache keeps a window); an encoder-decoder
        # model's may count its encoder's layers: there the cache grows its layers as they come
        cache = classes["prefix"](config=None if self.encoder_decoder else self.model.config)
        for i, (key, value) in enumerate(self._layer_prefixes(batch)):
            cache.update(key, value, i)
        cache.read_only, cache.reads = read_only, set()
        if not self.encoder_decoder:
            return cache, cache
        if not read_only:
            return classes["enc_dec"](cache, classes["dynamic"]()), cache
        both = classes["enc_dec"](cache, classes["cross"]())
        both.is_updated = _NeverUpdated()
        return both, cache

    def _checkpointing(self, module: nn.Module) -> bool:
        return module.training and torch.is_grad_enabled() and any(m.gradient_checkpointing
                                                                     for m in self._checkpointed)

    # ------------------------------------------------------------------ the running calls

    def _calls(self) -> tuple:
        """This model's running calls in this context (thread), innermost last."""
        return self._traced_calls if torch.compiler.is_compiling() else (_RUNNING.get() or {}).get(self, ())

    def _set_calls(self, calls: tuple) -> None:
        """Sets this model's entry in _RUNNING; the dict is replaced, never changed in place, since other contexts
        may hold it. While torch.compile traces, on the model: dynamo cannot trace a ContextVar (a graph break per
        call, an error with fullgraph), and a trace runs in one thread."""
        if torch.compiler.is_compiling():
            self._traced_calls = calls
            return
        running = {m: v for m, v in (_RUNNING.get() or {}).items() if m is not self}
        if calls:
            running[self] = calls
        _RUNNING.set(running)

    def _grant(self, on: bool) -> None:
        """Lets the checkpointed layers keep a cache (transformers drops any other it hands them) for a call (on),
        or no longer once the last call that needed it, in any thread, has returned (off)."""
        if torch.compiler.is_compiling():  # one thread; dynamo cannot trace a lock
            self._grants += 1 if on else -1
        else:
            with _GRANTS:
                self._grants += 1 if on else -1
        for m in self._checkpointed:
            if self._grants:
                m._can_checkpoint_with_cache = True
            else:
                m.__dict__.pop("_can_checkpoint_with_cache", None)

    def _layer_hook(self, layer, args, kwargs):
        """A model that hands its checkpointed layers no cache (GPT-2 does, under gradient checkpointing) would fail
        deep in attention on a mask made for the prefix: say why, before the layer runs."""
        calls = self._calls()
        cache = calls[-1][0] if calls else None
        if cache is None or not getattr(cache, "read_only", False) or not layer.gradient_checkpointing:
            return
        if not any(isinstance(a, self._cache_classes["any"]) for a in (*args, *kwargs.values())):
            raise RuntimeError(f"prefix tuning: {type(self.model).__name__} hands its layers no key/value cache under "
                               "gradient checkpointing, so they cannot read the prefix; train without gradient "
                               "checkpointing")

    def _check(self, module, args, output):
        """After a call that started the cache: every attention layer must have read the prefix (a layer that
        was handed no cache computed without it: its gradient would be silently wrong)."""
        calls = self._calls()
        if not calls:  # the model's hook did not run (one before it raised)
            return
        (cache, granted), calls = calls[-1], calls[:-1]
        self._set_calls(calls)
        if granted:
            self._grant(False)
        if output is None:  # the call raised (this hook runs anyway, to clean up): its own error stands
            return
        if cache is None:
            return
        if isinstance(cache, self._cache_classes["prefix"]):
            reads = cache.reads
        else:  # the caller's, filled in place: a layer that read the prefix stored its own keys after it
            reads = {i for i, layer in enumerate(cache.layers) if layer.get_seq_length() > self.n}
        if len(reads) < self.layers:
            missing = sorted(set(range(self.layers)) - reads)
            raise RuntimeError(f"prefix tuning: attention layers {missing} did not read the prefix (the model did "
                               "not hand them the key/value cache"
                               + (", as gradient checkpointing does in this transformers version; train without it"
                                  if self._checkpointing(module) else "") + ")")

    def _hook(self, module, args, kwargs):
        # this call's entry, first (nothing before it can raise): `_check`, which runs however the call ends, takes
        # the innermost one off, which must be this call's
        self._set_calls((*self._calls(), (None, False)))
        if self.disabled:
            return None
        kw = self._keywords(module, args, kwargs)
        # the sequence the prefix goes in front of: the decoder's, in an encoder-decoder model
        names = ("decoder_input_ids", "decoder_inputs_embeds") if self.encoder_decoder else ("input_ids",
                                                                                                "inputs_embeds")
        choices = None if self.encoder_decoder else self._flatten_choices(kw)
        mask_key, positions_key = (("decoder_attention_mask", "decoder_position_ids") if self.encoder_decoder
                                   else ("attention_mask", "position_ids"))
        key = cache_key(kw, _parameter_names(type(module)))
        given = kw.get(key)
        # first: generate masks a static cache 4-D, which the mask check refused, naming a mask the user never gave
        refuse_static(given, self.method)
        self._refuse_other_masks(kw, mask_key)
        source = next((kw[k] for k in names if kw.get(k) is not None), None)
        if source is None and self.encoder_decoder:  # the decoder input the model makes (see __init__)
            source = kw.get("labels") if self.decoder_from_labels else None
            source = kw.get("input_ids") if source is None else source
            # a model that makes none (T5ForConditionalGeneration without labels) says so itself
        if source is None:
            raise ValueError(f"prefix tuning needs {' or '.join(names)}"
                             + (" (or the input_ids or labels the model makes it from)" if self.encoder_decoder
                                else ""))
        batch, length = source.shape[:2]
        # without use_cache a call computes its whole sequence; a cache it is handed is the one an earlier call
        # returned (generate passes it on even then), holding that call's keys after the prefix
        past = 0 if kw.get("use_cache") is False else cache_length(given)
        self._refuse_past_positions(past or self.n, length)  # a later step's cache holds the prefix
        if past == 0:  # a new sequence: the cache starts with the prefix
            read_only = self._checkpointing(module)
            if read_only and self.projected and any(_reentrant(m) for m in self._checkpointed
                                                    if m.gradient_checkpointing):
                # Each reentrant segment runs its own backward, through the prefix MLP that every layer's keys come
                # from: the second would find the MLP's graph freed by the first.
                raise RuntimeError("prefix tuning with prefix_projection=True cannot train under reentrant gradient "
                                   "checkpointing: use gradient_checkpointing_enable(gradient_checkpointing_kwargs="
                                   "{'use_reentrant': False}) (transformers' default), or fold_prefix() first")
            # an empty cache passed in is filled (one an earlier call filled is not: use_cache=False computes anew)
            kw[key], cache = self._prefilled_cache(batch, read_only, given if cache_length(given) == 0 else None)
            past = self.n
            self._set_calls((*self._calls()[:-1], (cache, read_only)))
            if read_only:  # checkpointed layers keep a cache that only reads (transformers drops others)
                self._grant(True)
        # the input follows the prefix (and, in a later generation step, the tokens before it): positions count
        # from the prefix's end, as the model's own do for a filled cache
        self._after_virtual_tokens(kw, past, length, batch, mask_key, positions_key)
        if kw.get(mask_key) is None and torch.compiler.is_compiling():
            # without a mask, eager transformers skips masking; traced, BERT's derives one for the input alone,
            # which failed to broadcast against the prefixed keys: an all-ones mask covering both means the same
            kw[mask_key] = torch.ones(batch, past + length, dtype=torch.long, device=source.device)
        self._unflatten_choices(kw, choices)
        return (), kw
