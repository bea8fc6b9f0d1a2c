"""MeftModel: turns a model's layer stack into reversible layers with adapters (MEFT).

The transformer layers stay where they are (their parameters keep their names); each gets its adapters
as ``<layer>.meft_adapters.<kind>``, and the layer list is replaced by a :class:`ReversibleLayerList`
which, while its parent module runs forward, presents the whole stack as one callable: the model's own
forward (embeddings, masks, rotary tables, final norm, head) runs unchanged and hands the stack the
per-layer arguments it would give layer 0.

Saved format (our own; HF PEFT has no MEFT): ``adapter_config.json`` (the MeftConfig's fields plus
``"peft_type": "MEFT"``) and ``adapter_model.safetensors`` holding every adapter tensor under its name in
the wrapped model (e.g. ``bert.encoder.layer.0.meft_adapters.ffn.down.weight``) and the full state of the
``modules_to_save``.
"""

from __future__ import annotations

import contextvars
import functools

import torch
from torch import nn

from ...nn.reversible import Block, ReconstructionReport, ReversibleLayer, eager_under_compile, reversible_stack
from .._cache import cache_key, cache_length, get_cache
from .._forwarding import Forwarding
from ..lora.model import check_modules_to_save, saves_module
from .arch import Family, find_family
from .config import MeftConfig

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class MeftAdapter(nn.Module):
    """Linear(d, bottleneck) -> activation -> dropout -> Linear(bottleneck, d), weights N(0, 0.02), biases
    zero. Computes in its own dtype (float32 in a half-precision model, so the optimizer updates small
    weights accurately) and returns its input's dtype."""

    def __init__(self, hidden: int, bottleneck: int, activation: str = "relu", dropout: float = 0.0,
                 dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck, dtype=dtype, device=device)
        self.act = _ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, hidden, dtype=dtype, device=device)
        for linear in (self.down, self.up):
            nn.init.normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(x.to(self.down.weight.dtype))))).to(x.dtype)


# The ReversibleLayerLists whose parent's forward runs in this context: per call, not on the list, so that threads
# sharing a model each see their own forward (a flag on the list, cleared by one thread's post-hook while another
# thread was inside, made that one run the plain layers: no adapters, no word). Replaced, never changed in place.
_ACTIVE: contextvars.ContextVar[frozenset] = contextvars.ContextVar("pefttorch_meft_active", default=frozenset())


class ReversibleLayerList(nn.ModuleList):
    """The model's layer list, unchanged as a container (indexing, len, state dict), except that while
    its parent's forward runs, iterating or slicing it yields one callable: the whole MEFT stack."""

    def __init__(self, layers: nn.ModuleList, runner) -> None:
        super().__init__(layers)
        self._runner = runner
        self._traced_active = False  # _ACTIVE's entry while torch.compile traces (see _set_active)

    @property
    def _active(self) -> bool:
        return self._traced_active if torch.compiler.is_compiling() else self in _ACTIVE.get()

    def __iter__(self):
        return iter([self._runner]) if self._active else super().__iter__()

    def __getitem__(self, idx):
        if isinstance(idx, slice) and self._active:
            return [self._runner]
        if isinstance(idx, slice):
            return nn.ModuleList(list(self._modules.values())[idx])
        return super().__getitem__(idx)


# Set on a key/value cache that a training forward handed back unfilled (see MeftModel._run_layers).
_UNFILLED = "_pefttorch_meft_unfilled"


def _set_active(layers: ReversibleLayerList, value: bool, *unused) -> None:
    """While torch.compile traces, on the list: dynamo cannot trace a ContextVar (a graph break per call, an error
    with fullgraph before the stack's own refusal), and a trace runs in one thread."""
    if torch.compiler.is_compiling():
        layers._traced_active = value
        return
    active = _ACTIVE.get()
    _ACTIVE.set(active | {layers} if value else active - {layers})


# The blocks of a layer, as functions of (x, context) bound to the layer's modules at call time (never
# stored closures, so copies of the model compute with their own modules).
def _layer_block(family: Family, layer, x, context):
    adapters = layer.meft_adapters
    attn = family.attention(layer, x, context, adapters["attn"] if "attn" in adapters else None)
    return family.mlp(layer, attn, context, adapters["ffn"])


def _attention_block(family: Family, layer, x, context):
    return family.attention(layer, x, context, layer.meft_adapters["attn"])


def _mlp_block(family: Family, layer, x, context):
    return family.mlp(layer, x, context, layer.meft_adapters["ffn"])


def _adapter_block(layer, x, context):
    return layer.meft_adapters["coupling"](x)


def _adapter_kinds(variant: str, reversible: bool) -> tuple[str, ...]:
    if variant == "meft3":
        return ("attn", "ffn")
    return ("ffn", "coupling") if reversible else ("ffn",)


def _saved_tensors(targets, aliases: dict | None = None) -> dict[tuple[str, str], torch.Tensor]:
    """The parameters and buffers of the modules_to_save `targets` ((path, module) pairs) by (path, name), each
    tensor once (a tied weight, or a saved module inside another: exchanged twice, it would be back), MEFT's own
    adapters left out (a saved layer holds them: they are the adapter, which disabling switches off otherwise).
    `aliases`, if given, receives every (path, name) of each tensor -> the key it is listed under."""
    out, first = {}, {}
    for path, module in targets:
        for name, t in [*module.named_parameters(remove_duplicate=False),
                        *module.named_buffers(remove_duplicate=False)]:
            if ".meft_adapters." in f".{name}":
                continue
            key = first.setdefault(id(t), (path, name))
            if key == (path, name):
                out[key] = t
            if aliases is not None:
                aliases[path, name] = key
    return out


class MeftModel(Forwarding):
    """Holds the adapted model as ``self.model`` and the config as ``self.peft_config[adapter_name]``."""

    def __init__(self, model: nn.Module, config: MeftConfig, adapter_name: str = "default") -> None:
        super().__init__()
        eager_under_compile()
        family = find_family(model)
        parent, attr = family.container(model)
        layers = getattr(parent, attr)
        if isinstance(layers, ReversibleLayerList):
            raise ValueError("this model has MEFT adapters already")
        depth = len(layers)
        n_rev = depth if config.num_rev_layers is None else config.num_rev_layers
        if n_rev > depth:
            raise ValueError(f"MeftConfig: num_rev_layers={n_rev} but the model has {depth} layers")
        for layer in layers:
            family.check_layer(layer)
        self._refuse_split_shared_layers(layers, n_rev, config.variant)
        hidden = model.config.hidden_size
        if config.bottleneck > hidden:
            raise ValueError(f"MeftConfig: bottleneck {config.bottleneck} is wider than the hidden size {hidden}")
        targets = self._modules_to_save(model, config)

        self.model = model
        self.peft_config = {adapter_name: config}
        self.active_adapters = [adapter_name]
        self.reversible = True  # False: the same two-stream model, with activations cached by autograd
        self.disabled = False
        self._family = family
        self._container = (parent, attr)
        # the user's container itself, which unload() puts back (its hooks, attributes, identity); in __dict__, not
        # registered as a submodule: its layers would show twice in the state dict
        self.__dict__["_original_layers"] = layers
        self._num_rev = n_rev
        self._report = ReconstructionReport(debug=config.debug_reconstruction)
        self._remember_trainability(model)

        for p in model.parameters():
            p.requires_grad_(False)
        for i, layer in enumerate(layers):
            weight = next(layer.parameters())
            dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
            layer.meft_adapters = nn.ModuleDict({
                kind: MeftAdapter(hidden, config.bottleneck, config.adapter_activation, config.adapter_dropout,
                                  dtype=dtype, device=weight.device)
                for kind in _adapter_kinds(config.variant, i < n_rev)
            })
        wrapped = ReversibleLayerList(layers, self._run_layers)
        setattr(parent, attr, wrapped)
        # the refusal on the backbone too: model.bert(...) / model.model(...) (feature extraction) skips the top
        backbones = dict.fromkeys((model, getattr(model, "base_model", model)))
        self._hooks = [parent.register_forward_pre_hook(functools.partial(_set_active, wrapped, True)),
                       parent.register_forward_hook(functools.partial(_set_active, wrapped, False), always_call=True),
                       *(m.register_forward_pre_hook(self._refuse_per_layer_outputs, with_kwargs=True)
                         for m in backbones)]
        trainable = not config.inference_mode
        for layer in layers:
            layer.meft_adapters.requires_grad_(trainable)
        for _, module in targets:
            module.requires_grad_(trainable)
        # modules_to_save train in place: the base model's own tensors are kept aside (as HF PEFT keeps the original
        # module) for disable_adapter(), which computed with the trained ones (see set_adapters_disabled)
        aliases = {}
        self.__dict__["_saved_originals"] = {k: t.detach().clone()
                                             for k, t in _saved_tensors(targets, aliases).items()}
        self._saved_aliases = aliases  # a tied weight's every name -> its key there (see _trained_state)
        self._saved_paths = [path for path, _ in targets]
        # while disabled, what is saved is still what was learned (the originals are in the parameters then)
        self._hooks += [module.register_state_dict_post_hook(functools.partial(self._trained_state, path))
                        for path, module in targets]

    @staticmethod
    def _refuse_split_shared_layers(layers: nn.ModuleList, n_rev: int, variant: str) -> None:
        """A layer module holds one set of adapters: one that appears both below num_rev_layers and above it (weight
        sharing across depth) would need a reversible layer's and an ordinary one's, and for meft1/meft2 they differ
        (the coupling adapter: a KeyError at forward). Shared layers that are all reversible or all ordinary work,
        and so does a split for meft3, whose two kinds of layer hold the same adapters."""
        if _adapter_kinds(variant, True) == _adapter_kinds(variant, False):
            return
        first: dict[int, int] = {}
        for i, layer in enumerate(layers):
            j = first.setdefault(id(layer), i)
            if j < n_rev <= i:
                raise ValueError(f"MeftConfig: layers {j} and {i} are the same module, and num_rev_layers={n_rev} "
                                 f"makes {j} reversible and {i} ordinary, which take different {variant} adapters "
                                 f"(a module holds one set); make both reversible or both ordinary (num_rev_layers "
                                 f"<= {j} or > {i})")

    @staticmethod
    def _modules_to_save(model: nn.Module, config: MeftConfig) -> list[tuple[str, nn.Module]]:
        # LoRA's rules; trained in place, so a container is fine, and a module registered twice (``self.again =
        # self.shared``) is found under the name matched (HF PEFT's walk), once
        check_modules_to_save(model, config.modules_to_save, wrapped=False)
        found: dict[int, tuple[str, nn.Module]] = {}
        for n, m in model.named_modules(remove_duplicate=False):
            if saves_module(n, config.modules_to_save):
                found.setdefault(id(m), (n, m))
        return list(found.values())

    # ------------------------------------------------------------------ the stack

    @property
    def layers(self) -> nn.ModuleList:
        parent, attr = self._container
        return getattr(parent, attr)

    def reversible_layers(self) -> list[ReversibleLayer]:
        config = self.peft_config[self.active_adapters[0]]
        lam, beta, swap = config.scales
        family, out = self._family, []
        for layer in list(self.layers._modules.values())[: self._num_rev]:
            adapter = Block(functools.partial(_adapter_block, layer), [layer.meft_adapters["coupling"]]) \
                if config.variant != "meft3" else None
            if config.variant == "meft1":
                f, g = Block(functools.partial(_layer_block, family, layer), [layer]), adapter
            elif config.variant == "meft2":
                f, g = adapter, Block(functools.partial(_layer_block, family, layer), [layer])
            else:
                f = Block(functools.partial(_attention_block, family, layer), [layer])
                g = Block(functools.partial(_mlp_block, family, layer), [layer])
            out.append(ReversibleLayer(f, g, lam, beta, swap))
        return out

    def _refuse_per_layer_outputs(self, model, args, kwargs) -> None:
        """transformers records hidden states and attention maps from the layer modules' own calls, which the
        reversible stack does not make: refuse, instead of returning empty tuples."""
        if self.disabled:
            return
        for flag in ("output_hidden_states", "output_attentions"):
            if kwargs.get(flag, getattr(model.config, flag, False)):
                raise ValueError(f"MEFT: {flag}=True is not supported: the reversible layers run as a two-stream "
                                 "stack and have no per-layer outputs to record (with adapters disabled the model "
                                 "runs its own layers and has them)")

    def _refuse_layer_hooks(self, layers: list[nn.Module]) -> None:
        """Hooks on a layer module run from its __call__, which the adapted model never makes (the reversible stack
        computes a layer from its attention and MLP blocks, as F and G, again in backward; the ordinary layers above
        it too, their FFN adapter being added between the blocks): refuse, instead of running without them. So for
        an instance forward (🤗 Accelerate's add_hook_to_module, which device_map dispatch and offloading use), never
        called either. (Global module hooks are left alone: they run for the blocks' modules, not the layer.)"""
        grad = torch.is_grad_enabled()  # (backward hooks miss nothing where there is no backward)
        for layer in layers:
            forward = layer.__dict__.get("forward")
            # the class's own forward bound to it is no hook (what Accelerate's remove_hook_from_module leaves)
            own = forward is None or getattr(forward, "__func__", None) is type(layer).forward
            kinds = [kind for kind, hooks in (("forward pre-hooks", layer._forward_pre_hooks),
                                              ("forward hooks", layer._forward_hooks),
                                              ("backward hooks", grad and layer._backward_hooks),
                                              ("backward pre-hooks", grad and layer._backward_pre_hooks),
                                              ("a forward of its own (an 🤗 Accelerate hook?)", not own)) if hooks]
            if kinds:
                name = next(n for n, m in self.model.named_modules() if m is layer)
                raise ValueError(f"MEFT: the layer {name} has {' and '.join(kinds)}, which would not run: with MEFT's "
                                 "adapters on, the layers are computed from their attention and MLP blocks, not "
                                 "called; remove them (hooks on the blocks' modules run, again when backward "
                                 "recomputes them), or run with adapters disabled, where the model calls its own "
                                 "layers")

    def _run_layers(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        layers = list(self.layers._modules.values())
        if self.disabled:
            for layer in layers:
                hidden_states = layer(hidden_states, *args, **kwargs)
            return hidden_states
        self._refuse_layer_hooks(layers)
        config = self.peft_config[self.active_adapters[0]]
        context = self._family.context(args, kwargs)
        dtype = hidden_states.dtype
        stack = self.reversible_layers()
        grad = torch.is_grad_enabled()
        # the ordinary layers above the stack that gradient_checkpointing_enable() marked (HF's own checkpointing
        # lives in the layer's __call__, which the two-stream model never makes)
        upper = layers[self._num_rev:]
        checkpointed = [grad and layer.training and getattr(layer, "gradient_checkpointing", False) for layer in upper]
        cache = get_cache(context)
        if cache is not None and getattr(cache, _UNFILLED, False):
            raise ValueError("MEFT: this key/value cache was handed back empty by a training forward (backward "
                             "recomputes attention, so that forward did not fill it); continue from a forward run "
                             "under torch.no_grad(), as generate() does")
        if cache is not None and (any(checkpointed) or self._stack_recomputed(stack, hidden_states)):
            if cache_length(cache) > 0:
                raise ValueError("MEFT: a reversible backward cannot recompute attention over a filled "
                                 "key/value cache; train without past_key_values")
            context[cache_key(context)] = None  # backward recomputes attention: it must not write twice
            setattr(cache, _UNFILLED, True)  # the model hands it back empty: refused if a later call passes it
        x = hidden_states.to(config.stream_dtype)
        y1, y2 = reversible_stack(stack, x, x, context, dtype, reversible=self.reversible, report=self._report)
        h = ((y1 + y2) * 0.5).to(dtype) if stack else hidden_states
        for layer, checkpoint in zip(upper, checkpointed, strict=True):
            if checkpoint:
                h = layer._gradient_checkpointing_func(functools.partial(_layer_block, self._family, layer), h,
                                                        context)
            else:
                h = _layer_block(self._family, layer, h, context)
        return h

    def _stack_recomputed(self, stack: list[ReversibleLayer], hidden_states: torch.Tensor) -> bool:
        """Whether backward will recompute the reversible stack: with grad enabled, when something in it trains (as
        reversible_stack decides; a frozen model called with grad enabled runs it as plain layers)."""
        return (torch.is_grad_enabled() and self.reversible and len(stack) > 0 and (hidden_states.requires_grad or any(
            p.requires_grad for layer in stack for block in (layer.f, layer.g) for m in block.modules
            for p in m.parameters())))

    def reconstruction_errors(self) -> list[float]:
        """Per reversible layer (bottom first), the error of its reconstructed input in the last backward,
        relative to the input's largest magnitude. Needs ``MeftConfig(debug_reconstruction=True)``."""
        if not self._report.debug:
            raise RuntimeError("per-layer errors are recorded only with MeftConfig(debug_reconstruction=True); "
                               "reconstruction_error() gives the stack's, always")
        return list(self._report.errors)

    def reconstruction_error(self) -> float | None:
        """The error of the stack's input as the last backward reconstructed it (relative to its largest
        magnitude), or None before the first reversible backward."""
        return self._report.input_error

    # ------------------------------------------------------------------ PeftModel's adapter API

    def set_adapter(self, names) -> None:
        names = [names] if isinstance(names, str) else list(names)
        if names != self.active_adapters:
            raise ValueError(f"MEFT holds one adapter ({self.active_adapters[0]!r}); cannot activate {names}")

    def inject_adapter(self, config, adapter_name: str, then=None) -> None:
        raise NotImplementedError("MEFT holds one adapter per model: its layers are rebuilt around it")

    def delete_adapter(self, name: str) -> None:
        raise NotImplementedError("MEFT holds one adapter per model: use unload() to remove it")

    def set_adapters_disabled(self, disabled: bool) -> None:
        if disabled != self.disabled:
            self._swap_saved_originals(disabled)
        self.disabled = disabled

    def _swap_saved_originals(self, disabling: bool) -> None:
        """Exchanges the modules_to_save's tensors with those kept aside: with adapters disabled the model computes
        with the base model's own (the parameters stay the same objects, so an optimizer is unaffected), frozen as
        HF PEFT's original module is (a reference forward in the block sent gradients to the trained head)."""
        kept = self.__dict__.get("_saved_originals", {})  # (absent from models pickled before it was kept)
        if not kept:
            return
        trainable = self.__dict__.setdefault("_saved_trainable", {})
        for key, t in _saved_tensors([(p, self.model.get_submodule(p)) for p in self._saved_paths]).items():
            current = t.data
            t.data = kept[key].to(device=current.device, dtype=current.dtype)  # (the model may have moved since)
            kept[key] = current
            if isinstance(t, nn.Parameter):
                if disabling:
                    trainable[key] = t.requires_grad
                    t.requires_grad_(False)
                else:
                    t.requires_grad_(trainable.pop(key, t.requires_grad))

    def _trained_state(self, path: str, module: nn.Module, state: dict, prefix: str, metadata) -> None:
        """state_dict hook of a module_to_save: while disabled, its trained tensors (kept aside then) are saved."""
        if not self.disabled:
            return
        kept = self.__dict__.get("_saved_originals", {})
        aliases = getattr(self, "_saved_aliases", {})
        for name in list(state):
            key = aliases.get((path, name[len(prefix):]))
            if name.startswith(prefix) and key in kept:
                state[name] = kept[key]

    def merge_adapter(self, adapter_names=None, safe_merge: bool = False) -> None:
        raise NotImplementedError("MEFT's adapters change how layers connect: they cannot be merged into weights")

    def unmerge_adapter(self) -> None:
        raise NotImplementedError("MEFT's adapters are never merged")

    def unload(self, merge: bool = False) -> nn.Module:
        """The model with its original layer list, adapters removed, trainability as it came (modules_to_save
        keep what they learned: they were trained in place)."""
        if merge:
            self.merge_adapter()
        parent, attr = self._container
        if not isinstance(getattr(parent, attr), ReversibleLayerList):
            # a second unload() emptied the restored layer list (it is the original container then)
            raise RuntimeError("MEFT: this model was unloaded already; its layers are the base model's again")
        self.set_adapters_disabled(False)  # the trained modules_to_save in place, which the model keeps
        self.__dict__.pop("_saved_originals", None)
        for hook in self._hooks:
            hook.remove()
        layers = self.__dict__.pop("_original_layers", None)  # (absent from models pickled before it was kept)
        if layers is None:
            layers = nn.ModuleList()
        layers._modules.clear()
        layers._modules.update(self.layers._modules)  # the layers in place now (one may have been replaced)
        layers.training = self.layers.training  # the wrapper, not it, followed train()/eval()
        for layer in layers:
            del layer.meft_adapters
        setattr(parent, attr, layers)
        self._restore_trainability(self.model)
        return self.model

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors (sharing storage with the model's) under their names in the wrapped model."""
        config = self.peft_config[name]
        out = {k: v for k, v in self.model.state_dict().items() if ".meft_adapters." in k}
        for path, module in self._modules_to_save(self.model, config):
            out.update({f"{path}.{k}": v for k, v in module.state_dict().items()})
        return {k: v.detach() for k, v in out.items()}

    def export_adapter(self, name: str) -> tuple[MeftConfig, dict[str, torch.Tensor]]:
        """What save_pretrained writes for adapter `name`: its config and tensors."""
        return self.peft_config[name], self.adapter_state_dict(name)
