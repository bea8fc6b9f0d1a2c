"""LoraModel: finds the layers a LoraConfig targets in a model, swaps in LoraLayers, and manages adapters."""

from __future__ import annotations

import re
import warnings
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from ...nn.lora import refuse_computed_weights, refuse_offloaded
from .._config import TASK_MODULES_TO_SAVE
from .._forwarding import Forwarding
from .config import LoraConfig
from .layer import LoraLayer, ModulesToSaveWrapper, is_linear

ALL_LINEAR = "all-linear"
PREFIX = "base_model.model."  # HF PEFT's key prefix in saved adapters


def _is_bias(key: str) -> bool:
    """What bias="all" trains and saves, as HF PEFT reads it: a tensor named bias (Marian's final_logits_bias is
    not one)."""
    return key == "bias" or key.endswith(".bias")


def _name_matches(name: str, keys) -> bool:
    """The module's name is a key or ends with ``.key`` (HF PEFT's rule for target_modules; modules_to_save has its
    own, :func:`saves_module`)."""
    return any(name == k or name.endswith(f".{k}") for k in keys)


def _matches(spec, name: str) -> bool:
    """A list of names, or a regular expression matched against the whole module name."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return _name_matches(name, spec)


def _pattern_value(pattern: dict, name: str, default):
    """rank_pattern / alpha_pattern lookup: the first key that is a suffix (or regex suffix) of name."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _layer_index(name: str, layers_pattern, top_level: bool = True) -> int | None:
    """Index of the block a module belongs to: the number after ``<layers_pattern>.`` (default: the first
    numbered component after the first component), e.g. 3 for ``model.layers.3.self_attn.q_proj``. With
    `top_level`, where that finds none, the number after the first component: ``layers.3.mlp`` in a bare decoder
    (what AutoModel gives). LoRA asks without it, as HF PEFT reads the index: its saves must load there."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
    if not patterns:
        m = re.match(r".*?\.[^.]*\.(\d+)\.", name) or (re.match(r"[^.]*\.(\d+)\.", name) if top_level else None)
        return int(m.group(1)) if m else None
    for pattern in patterns:
        m = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", name)
        if m:
            return int(m.group(1))
    return None


TASK_HEADS = {h for heads in TASK_MODULES_TO_SAVE.values() for h in heads}


def saves_module(name: str, modules_to_save) -> bool:
    """HF PEFT's rule for modules_to_save (its ``_is_valid_match``): the module's name is an entry or ends with
    ``.entry``. A bare suffix match took DeiT's cls_classifier and distillation_classifier, and DistilBERT's
    pre_classifier, for "classifier": trained and saved beside what HF PEFT trains, its adapters then refused as
    missing them. (The task heads are listed whole, pre_classifier among them, as HF PEFT adds them.)"""
    return bool(name and modules_to_save) and any(name == k or name.endswith(f".{k}") for k in modules_to_save)


def _in_modules_to_save(name: str, modules_to_save) -> bool:
    """The module or one above it is wrapped as a module to save: matched by the same rule as the wrapping (a regex
    here once let "classifier|score" pass the "matched nothing" check and wrap nothing, leaving the head frozen)."""
    parts = name.split(".")
    return any(saves_module(".".join(parts[:i]), modules_to_save) for i in range(1, len(parts) + 1))


# What a modules_to_save wrapper cannot stand in for: containers, whose forward is never called (the model indexes or
# iterates them), HF PEFT's list
CONTAINERS = (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)


def module_names(model: nn.Module) -> list[str]:
    """Every name of every module, a module registered twice (``self.again = self.shared``) under each: HF PEFT
    matches modules_to_save against these, and wraps the module under the name matched."""
    return [n for n, _ in model.named_modules(remove_duplicate=False)]


def check_modules_to_save(model: nn.Module, modules_to_save, wrapped: bool = True) -> None:
    """Refuses entries of modules_to_save that name no module; the task heads HF PEFT adds (``classifier`` and
    ``score`` for SEQ_CLS, ...) need not all be there, since a model has one of them or its head is named otherwise
    (BART's classification_head: then a warning, as its head stays frozen). Where the modules are `wrapped` (a
    trained copy beside the original), refuses containers as HF PEFT does: the wrapper has no items to index, so
    the model's forward failed on it ("'ModulesToSaveWrapper' object is not subscriptable")."""
    if not modules_to_save:
        return
    names = module_names(model)
    unmatched = [m for m in modules_to_save if not any(saves_module(n, [m]) for n in names)]
    given = [m for m in unmatched if m not in TASK_HEADS]
    if given:  # a typo once passed when another entry (a task head) matched
        near_top = [n for n in names if n and n.count(".") <= 1]
        raise ValueError(f"modules_to_save={modules_to_save}: {given} matched no module of the model: each entry is "
                         f"a module's name or its end after a '.' (HF PEFT's rule; not a regular expression), e.g. "
                         f"one of {near_top[:12]}")
    if unmatched and len(unmatched) == len(modules_to_save):
        warnings.warn(f"modules_to_save={modules_to_save} (the task's heads) names no module of "
                      f"{type(model).__name__}: a new head named otherwise stays frozen and unsaved; name it in "
                      "modules_to_save to train it", UserWarning, stacklevel=3)
    containers = [(n, m) for n, m in model.named_modules(remove_duplicate=False)
                  if wrapped and isinstance(m, CONTAINERS) and saves_module(n, modules_to_save)]
    if containers:
        name, module = containers[0]
        raise TypeError(f"modules_to_save cannot be applied to modules of type {type(module).__name__} ({name}, "
                        f"matched by modules_to_save={modules_to_save}): the model indexes or iterates it, which a "
                        f"trained copy's wrapper does not support (HF PEFT refuses it too); "
                        + (f"name the modules inside it instead, e.g. {name}.{next(iter(module._modules), '0')}"
                           if isinstance(module, (nn.ModuleList, nn.ModuleDict)) else
                           "name the module that holds it"))  # (a parameter container holds no modules to name)


def adapter_dtype(weight_dtype: torch.dtype, autocast_adapter_dtype: bool = True) -> torch.dtype:
    """The dtype of new adapter parameters beside a weight of `weight_dtype`, as HF PEFT's autocast_adapter_dtype:
    float32 beside a 16-bit weight (cast to its dtype in forward), or with False the weight's own; float32 beside a
    weight that is not floating point (a quantized layer's integers, which no parameter that trains can have)."""
    if not weight_dtype.is_floating_point or (autocast_adapter_dtype and weight_dtype in (torch.float16,
                                                                                        torch.bfloat16)):
        return torch.float32
    return weight_dtype


@dataclass
class Target:
    name: str
    module: nn.Module  # the linear layer, or the LoraLayer already wrapping it
    r: int
    alpha: float


def resolve_target_modules(model: nn.Module, config: LoraConfig) -> list[str] | str:
    if config.target_modules is not None:
        return config.target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    defaults = type(config).default_target_modules
    if model_type in defaults:
        return defaults[model_type]
    raise ValueError(
        f"{type(config).__name__}.target_modules is not set and pefttorch has no default for model type "
        f"{model_type!r}; set it to module names, a regex or 'all-linear' (defaults exist for: {', '.join(defaults)})"
    )


def plan_targets(model: nn.Module, config: LoraConfig) -> list[Target]:
    """The layers `config` adapts, with their rank and alpha, found without changing the model.

    A layer that already carries adapters (a LoraLayer) is matched by its own name, for a second adapter.
    Raises ValueError when nothing matches (listing what could have) or when a matched module is not a
    linear layer.
    """
    spec = resolve_target_modules(model, config)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets, unsupported, linear_names = [], [], Counter()
    inside: tuple[str, ...] = ()  # subtrees of LoraLayers and modules_to_save wrappers: not candidates
    for name, module in model.named_modules():
        if not name or name.startswith(inside):
            continue
        if isinstance(module, (LoraLayer, ModulesToSaveWrapper)):
            inside += (name + ".",)
        base = module.base_layer if isinstance(module, LoraLayer) else module
        linear = is_linear(base)
        if linear:
            linear_names[name.rsplit(".", 1)[-1]] += 1
        # the head may already carry another adapter: then `module` is it, and its base is not
        matched = (linear and head is not base and head is not module) if spec == ALL_LINEAR else _matches(spec, name)
        if (not matched or (config.exclude_modules and _matches(config.exclude_modules, name))
                or _in_modules_to_save(name, config.modules_to_save)
                or (config.layers_to_transform
                    and _layer_index(name, config.layers_pattern, top_level=False) not in config.layers_to_transform)):
            continue
        if isinstance(module, ModulesToSaveWrapper):
            # another adapter's trained copy: skipped in silence, the new adapter went without LoRA there (HF PEFT
            # refuses it too)
            raise ValueError(f"target_modules={spec!r} matches {name}, which adapter(s) "
                             f"{list(module.modules_to_save)} keep a trained copy of (modules_to_save): LoRA cannot "
                             f"go on it; leave it out of target_modules (or exclude_modules), or name it in this "
                             f"adapter's modules_to_save for a copy of its own")
        if not linear:
            unsupported.append(f"{name} ({type(module).__name__})")
            continue
        r = _pattern_value(config.rank_pattern, name, config.r)
        alpha = _pattern_value(config.alpha_pattern, name, config.lora_alpha)
        targets.append(Target(name, module, r, alpha))
    if spec == ALL_LINEAR:
        _warn_of_fused_weights(model)
    warn_of_uncalled(model, [(t.name, t.module) for t in targets], "LoRA")
    if unsupported:
        raise ValueError(
            "pefttorch LoRA adapts nn.Linear and transformers Conv1D layers; these matched modules are not: "
            + ", ".join(unsupported[:10]) + (" ..." if len(unsupported) > 10 else "")
        )
    if not targets:
        available = ", ".join(f"{n} (x{c})" if c > 1 else n for n, c in sorted(linear_names.items()))
        raise ValueError(
            f"target_modules={spec!r} matched no linear layer of {type(model).__name__}"
            + (f" (with exclude_modules={config.exclude_modules!r}, layers_to_transform="
               f"{config.layers_to_transform!r})" if config.exclude_modules or config.layers_to_transform else "")
            + f". Linear layers available to match: {available or 'none'}"
            + (f". A string is a regular expression over the full module name, as in HF PEFT: for the layers "
               f"named {spec}, pass [{spec!r}] or {'.*.' + spec!r}" if isinstance(spec, str) and spec in linear_names
               else "")
        )
    return targets


def warn_of_uncalled(model: nn.Module, found: list[tuple[str, nn.Module]], method: str) -> None:
    """Warns of targets the model reads the weights of instead of calling them: nn.MultiheadAttention's out_proj,
    whose weight and bias its forward hands to F.multi_head_attention_forward. An adapter there (a LoRA layer, a
    hook) never runs: no effect, no gradient, as in HF PEFT (which has an MHA layer of its own for it). A warning,
    not a refusal: naming out_proj, the usual attention target, must not refuse a model that holds an MHA anywhere
    (SigLIP's pooling head), nor HF PEFT's adapters for it."""
    read = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    names = [name for name, module in found if id(getattr(module, "base_layer", module)) in read]
    if names:
        warnings.warn(f"{method} on {names[:5]}{' ...' if len(names) > 5 else ''}: nn.MultiheadAttention reads its "
                      "out_proj's weight instead of calling the layer, so an adapter there has no effect (as in HF "
                      "PEFT); exclude_modules leaves them out", UserWarning, stacklevel=4)


def _warn_of_fused_weights(model: nn.Module) -> None:
    """"all-linear" takes linear layers; a mixture of experts in transformers 5 keeps its experts as 3-D parameters
    of one module, which HF PEFT's all-linear adapts too (target_parameters, which pefttorch does not support):
    left alone silently, most of such a model's weights went without an adapter."""
    # by the module's class name (MixtralExperts, Qwen2MoeExperts, ...): 3-D parameters are also ViT's class token and
    # position embeddings, RWKV's time mixing, a weight-normed conv's parts
    fused = [f"{name}.{p}" if name else p for name, m in model.named_modules() if "expert" in type(m).__name__.lower()
             for p, t in m.named_parameters(recurse=False) if t.dim() >= 3]
    if fused:
        warnings.warn(f'target_modules="all-linear" adapts linear layers only; {len(fused)} weight(s) of other '
                      f"layers are left alone ({', '.join(fused[:3])}{' ...' if len(fused) > 3 else ''}: a mixture "
                      f"of experts' fused experts?), which HF PEFT adapts with target_parameters, not supported here",
                      UserWarning, stacklevel=3)


def warn_of_tied_weights(model: nn.Module, merging: list[tuple[str, str, torch.Tensor]], stacklevel: int) -> None:
    """A weight that another module shares (an lm_head tied to the input embeddings) takes a merged update for both:
    the merged model is then not the adapter model. Said, as HF PEFT does, rather than done silently. `merging`:
    (module path, parameter name, parameter) of each weight about to take an update."""
    users: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        users.setdefault(id(p), []).append(n)
    for path, name, weight in merging:
        others = [n for n in users.get(id(weight), []) if n != name]
        if others:
            warnings.warn(f"merging into the weight of {path}, which {others[0].rpartition('.')[0]} shares (tied "
                          f"weights, e.g. tie_word_embeddings): the update changes that module too, so the merged "
                          f"model's outputs differ from the adapter model's. To merge exactly, give {path} its own "
                          f"copy of the weight first", UserWarning, stacklevel=stacklevel)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


class LoraModel(Forwarding):
    """Holds the adapted model as ``self.model`` (so keys read ``base_model.model.…`` inside a PeftModel,
    as in HF PEFT) and the adapters' configs as ``self.peft_config``."""

    layer_cls = LoraLayer  # what a targeted linear layer becomes

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True) -> None:
        super().__init__()
        self.model = model
        # unload() gives the model back as it came, trainability included
        self._remember_trainability(model)
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapters: list[str] = []
        self.autocast_adapter_dtype = autocast_adapter_dtype
        self.inject_adapter(config, adapter_name)
        self.set_adapter([adapter_name], inference_mode=config.inference_mode)

    # ------------------------------------------------------------------ adapters

    def lora_layers(self):
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, LoraLayer)]

    def save_wrappers(self):
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, ModulesToSaveWrapper)]

    def inject_adapter(self, config: LoraConfig, adapter_name: str, then=None) -> None:
        """Adds adapter `adapter_name` to every layer `config` targets. Checks what it can first; on any error the
        model is left as it was (what was changed is undone), an error of `then()` included, called once the adapter
        is in (load_adapter loads its weights there)."""
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} exists already")
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter names must be non-empty strings and contain no '.', got {adapter_name!r}")
        if hasattr(nn.ModuleDict(), adapter_name):  # the layers keep adapters in ModuleDicts, keyed by name
            raise ValueError(f"adapter name {adapter_name!r} is taken by an attribute of torch's nn.ModuleDict, "
                             f"which holds each layer's adapters: choose another")
        with_bias = [n for n, c in self.peft_config.items() if getattr(c, "bias", "none") != "none"]
        if config.bias != "none" and with_bias:
            # the biases are the base model's, shared by every adapter: training one adapter's changed the other's
            raise ValueError(f"adapter {with_bias[0]!r} trains biases (bias={self.peft_config[with_bias[0]].bias!r}) "
                             f"already: one adapter per model may have bias other than 'none', as in HF PEFT")
        targets = plan_targets(self.model, config)
        check_modules_to_save(self.model, config.modules_to_save)
        # what trains when a later adapter comes stays so, as HF PEFT's injection keeps it: setting the active
        # adapters again froze an inactive adapter loaded to train, unfroze an active one set with inference_mode,
        # and froze what the user had unfrozen
        kept = [(p, p.requires_grad) for p in self.model.parameters()] if self.peft_config else []
        # inside disable_adapter() the new layers start disabled too: the model computes as the base model there
        disabled = any(m.disable_adapters for _, m in (*self.lora_layers(), *self.save_wrappers()))
        # What an error halfway (a layer refusing its settings, out of memory) must undo: layers swapped in, the
        # adapter's entries in layers that had other adapters, modules_to_save wrappers and copies.
        swapped, extended, wrapped, copied = [], [], [], []
        try:
            corrected = self._inject(targets, config, adapter_name, swapped, extended, wrapped, copied)
            self.peft_config[adapter_name] = config
            if then is not None:
                then()
        except BaseException:
            self.peft_config.pop(adapter_name, None)
            for layer in extended:
                layer.delete_adapter(adapter_name)
            for name, layer in swapped:
                _set_submodule(self.model, name, layer.base_layer)
            for wrapper in copied:
                if adapter_name in wrapper.modules_to_save:
                    del wrapper.modules_to_save[adapter_name]
            for name, module, requires_grad in wrapped:
                for p, flag in zip(module.parameters(), requires_grad, strict=True):
                    p.requires_grad_(flag)
                _set_submodule(self.model, name, module)
            raise
        self.model.requires_grad_(False)  # as HF PEFT's injection: set_adapter then marks what trains
        if kept:
            # the new layers follow the active adapters, a merged adapter is taken out (HF PEFT's injection calls
            # set_adapter too); the new adapter stays frozen, load_adapter(is_trainable=True) unfreezes it
            self.set_adapter(self.active_adapters)
            for p, requires_grad in kept:
                p.requires_grad_(requires_grad)
        if disabled:
            self.set_adapters_disabled(True)
        if corrected:
            # The layer type decides the layout (Conv1D stores its weight (in, out), nn.Linear (out, in)); a
            # Conv1D with the default fan_in_fan_out=False is simply served as what it is.
            warnings.warn(f"fan_in_fan_out=True does not fit {len(corrected)} nn.Linear layer(s) "
                          f"({', '.join(corrected[:3])}{' ...' if len(corrected) > 3 else ''}): using (out, in)",
                          stacklevel=2)

    def _inject(self, targets: list[Target], config: LoraConfig, adapter_name: str, swapped: list, extended: list,
                wrapped: list, copied: list) -> list[str]:
        """inject_adapter's changes to the model, each recorded as it is made (see there); returns the names of the
        nn.Linear layers fan_in_fan_out=True did not fit."""
        corrected = []
        for t in targets:
            if isinstance(t.module, LoraLayer):
                layer = t.module
                extended.append(layer)
            else:
                fan_in_fan_out = not isinstance(t.module, nn.Linear)  # Conv1D stores (in, out)
                if config.fan_in_fan_out and not fan_in_fan_out:
                    corrected.append(t.name)
                layer = self.layer_cls(t.module, fan_in_fan_out=fan_in_fan_out)
                _set_submodule(self.model, t.name, layer)
                swapped.append((t.name, layer))
            self.add_to_layer(layer, t, config, adapter_name,
                              adapter_dtype(layer.base_layer.weight.dtype, self.autocast_adapter_dtype))
        # under every name (HF PEFT's walk): a module registered twice is wrapped where the matched name reaches it
        for name in module_names(self.model):
            if not saves_module(name, config.modules_to_save):
                continue
            module = self.model.get_submodule(name)  # as it is now: a wrapper put in under another name, maybe
            parents = self._parents(name)
            if any(isinstance(p, LoraLayer) for p in parents):
                # an adapter's name (lora_A.<name>) taken for a module's: its factors would be copied and trained
                # in full (HF PEFT refuses this too); raised here, the injection is undone
                raise ValueError(f"modules_to_save={config.modules_to_save} matches {name}, part of a LoRA layer: an "
                                 f"adapter's name is also a name in modules_to_save; rename the adapter")
            if isinstance(module, LoraLayer):
                # another adapter's LoRA layer (this one's targets leave its modules_to_save out): the wrapper took
                # the whole layer, its factors copied and trained in full, and the saves did not load (HF PEFT
                # refuses this too); raised here, the injection is undone
                raise TypeError(f"modules_to_save={config.modules_to_save} matches {name}, which adapter(s) "
                                f"{list(module.lora_A)} adapt with LoRA: a trained copy cannot be made of a LoRA "
                                f"layer; remove {name} from this adapter's modules_to_save or from the other "
                                f"adapter's target_modules")
            if isinstance(module, ModulesToSaveWrapper):
                if adapter_name not in module.modules_to_save:  # (else reached again: a parent registered twice)
                    copied.append(module)
                    module.add_adapter(adapter_name)
            elif not any(isinstance(p, ModulesToSaveWrapper) for p in parents):
                # recorded first: the wrapper freezes the original before copying it, which may fail
                wrapped.append((name, module, [p.requires_grad for p in module.parameters()]))
                _set_submodule(self.model, name, ModulesToSaveWrapper(module, adapter_name))
        return corrected

    def add_to_layer(self, layer: LoraLayer, target: Target, config: LoraConfig, adapter_name: str,
                     dtype: torch.dtype) -> None:
        """Gives `layer` adapter `adapter_name` (a subclass's variant of LoRA overrides this)."""
        layer.update_layer(adapter_name, target.r, target.alpha, config.lora_dropout, config.init_lora_weights,
                           config.use_rslora, dtype=dtype)

    def _parents(self, name: str):
        parts = name.split(".")
        return [self.model.get_submodule(".".join(parts[:i])) for i in range(1, len(parts))]

    def set_adapter(self, names: str | list[str], inference_mode: bool = False) -> None:
        """Makes these adapters the active ones: their parameters train (with `inference_mode` they are frozen), the
        others' are frozen, as HF PEFT's set_adapter. Merged adapters are taken out of the weights first."""
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown or not names:
            raise ValueError(f"unknown adapter(s) {unknown}; adapters are: {list(self.peft_config)}")
        for path, wrapper in self.save_wrappers():
            # A module replaced by a trained copy runs one copy: a second active adapter's copy would train as if used
            # and be ignored in forward (HF PEFT refuses this too).
            both = [n for n in names if n in wrapper.modules_to_save]
            if len(both) > 1:
                raise ValueError(f"adapters {both} each keep their own copy of {path} (modules_to_save); only one "
                                 "of them can be active at a time")
        merged = [layer for _, layer in self.lora_layers() if layer.merged]
        if merged:
            # a merged adapter left in the weights adds to the active ones, also to themselves (an inactive adapter
            # merged by name stayed in when the active adapters were set again): take all out, as HF PEFT does
            refuse_offloaded(self._bases(merged), "unmerging for set_adapter", root=self.model)
            warnings.warn("set_adapter on a merged model: unmerging the merged adapters first", stacklevel=3)
            for layer in merged:
                layer.unmerge()
        self._activate(names, inference_mode)

    def _activate(self, names: list[str], inference_mode: bool = False) -> None:
        """set_adapter without the unmerging (delete_adapter's, as HF PEFT's layers switch there)."""
        self.active_adapters = names
        for _, layer in self.lora_layers():
            layer.active_adapters = [n for n in names if n in layer.lora_A]
        for _, wrapper in self.save_wrappers():
            wrapper.active_adapter = next((n for n in names if n in wrapper.modules_to_save), None)
        self._mark_trainable(inference_mode)

    def _mark_trainable(self, inference_mode: bool = False) -> None:
        """HF PEFT's set_adapter rule: the active adapters' parameters (and the biases their configs train) train,
        unless `inference_mode`, every other adapter's are frozen; nothing is remembered (an adapter loaded for
        inference trains once activated). Parameters no adapter owns keep what they have (an embedding the user
        unfroze, say), as HF PEFT's set_adapter leaves them."""
        for name in self.peft_config:
            for p in self._owned_parameters(name):
                p.requires_grad_(False)
        for name in [] if inference_mode else self.active_adapters:
            for p in self._owned_parameters(name):
                p.requires_grad_(True)

    def _owned_parameters(self, name: str):
        """What adapter `name` trains: its factors, its modules_to_save copies, and the biases its config trains."""
        config = self.peft_config[name]
        for _, layer in self.lora_layers():
            if name in layer.lora_A:
                yield from layer.adapter_parameters(name)
                if config.bias == "lora_only" and layer.base_layer.bias is not None:
                    yield layer.base_layer.bias
        for _, wrapper in self.save_wrappers():
            if name in wrapper.modules_to_save:
                yield from wrapper.modules_to_save[name].parameters()
        if config.bias == "all":
            yield from (p for n, p in self.model.named_parameters()
                        if _is_bias(n) and ".original_module." not in n)

    def delete_adapter(self, name: str) -> None:
        if name not in self.peft_config:
            raise ValueError(f"unknown adapter {name!r}; adapters are: {list(self.peft_config)}")
        if len(self.peft_config) == 1:
            raise ValueError(f"{name!r} is the only adapter: a model needs one (unload() returns the base model)")
        merged = [path for path, layer in self.lora_layers() if name in layer.merged_adapters]
        if merged:  # refused before anything changes (it froze the adapter, which then stayed frozen once unmerged)
            raise RuntimeError(f"adapter {name!r} is merged into the base weight of {merged[0]}"
                               f"{f' and {len(merged) - 1} more' if len(merged) > 1 else ''}; unmerge before deleting "
                               "it")
        was_active = name in self.active_adapters
        for p in self._owned_parameters(name):  # its biases stay in the model
            p.requires_grad_(False)
        for _, layer in self.lora_layers():
            layer.delete_adapter(name)
        for _, wrapper in self.save_wrappers():
            if name in wrapper.modules_to_save:
                del wrapper.modules_to_save[name]
        del self.peft_config[name]
        if was_active:
            # as HF PEFT: the adapters active now train (also one frozen by set_adapter(..., inference_mode=True)),
            # merged ones stay merged; deleting an inactive adapter leaves what trains as it was
            self._activate([a for a in self.active_adapters if a != name] or [next(iter(self.peft_config))])

    def set_adapters_disabled(self, disabled: bool) -> None:
        if disabled:  # (the layers unmerge in forward)
            refuse_offloaded(self._bases(layer for _, layer in self.lora_layers() if layer.merged),
                             "disabling a merged adapter (an unmerge)", root=self.model)
        for _, layer in self.lora_layers():
            layer.disable_adapters = disabled
        for _, wrapper in self.save_wrappers():
            wrapper.disable_adapters = disabled

    # ------------------------------------------------------------------ merging and unloading

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Adds the active (or the given) adapters into the base weights. With `safe_merge`, a layer whose merged
        weight would hold a NaN or an inf is restored from a copy, what this call merged elsewhere is taken out
        again, and a ValueError says where."""
        pending = self._pending(adapter_names)
        # (merged before offloading: nothing to write)
        refuse_offloaded(self._bases(pending), "a merge", root=self.model)
        self._check_mergeable(adapter_names)
        self._warn_of_tied_weights(adapter_names)
        if safe_merge:
            # a dry run first, one layer at a time, each restored from its copy: a failure found after other layers
            # had merged was undone there by subtracting the update, which does not round back to the weight (the
            # refused merge changed the base weights by up to a bfloat16 step), and copies of them all would double
            # the memory of the adapted weights
            for name, layer in self.lora_layers():
                if layer not in pending:
                    continue
                before, weight = list(layer.merged_adapters), layer.base_layer.weight.detach().clone()
                layer.merge(adapter_names)
                finite = bool(torch.isfinite(layer.base_layer.weight).all())
                with torch.no_grad():
                    layer.base_layer.weight.copy_(weight)
                layer.merged_adapters[:] = before
                if not finite:
                    raise ValueError(f"safe_merge: merging into {name} gives a weight with NaN or inf; nothing was "
                                     "merged")
        for _, layer in self.lora_layers():
            layer.merge(adapter_names)

    def _pending(self, adapter_names: list[str] | None) -> list[LoraLayer]:
        """The layers merging the active (or the given) adapters would write into (one is not merged there yet)."""
        return [layer for _, layer in self.lora_layers()
                if any(n in layer.lora_A and n not in layer.merged_adapters
                       for n in (layer.active_adapters if adapter_names is None else adapter_names))]

    def _bases(self, layers) -> list[tuple[str, nn.Module]]:
        """(path, module) of what a merge or unmerge of `layers` writes and reads (the base layers, and the factors,
        whose own offloading failed the merge half-way inside the kernel), for refuse_offloaded."""
        paths = {id(layer): path for path, layer in self.lora_layers()}
        return [(f"{paths[id(layer)]}.{name}", getattr(layer, name)) for layer in layers
                for name in ("base_layer", "lora_A", "lora_B") if isinstance(getattr(layer, name, None), nn.Module)]

    def _check_mergeable(self, adapter_names: list[str] | None) -> None:
        merging = []
        for path, layer in self.lora_layers():
            names = layer.active_adapters if adapter_names is None else adapter_names
            if any(n in layer.lora_A and n not in layer.merged_adapters for n in names):
                merging.append((f"{path}.base_layer", layer.base_layer))
        refuse_computed_weights("merging", merging)

    def _warn_of_tied_weights(self, adapter_names: list[str] | None) -> None:
        merging = []
        for path, layer in self.lora_layers():
            names = layer.active_adapters if adapter_names is None else adapter_names
            if any(n in layer.lora_A and n not in layer.merged_adapters for n in names):
                merging.append((path, f"{path}.base_layer.weight", layer.base_layer.weight))
        warn_of_tied_weights(self.model, merging, stacklevel=5)

    def unmerge_adapter(self) -> None:
        refuse_offloaded(self._bases(layer for _, layer in self.lora_layers() if layer.merged), "an unmerge",
                         root=self.model)
        for _, layer in self.lora_layers():
            layer.unmerge()

    def unload(self, merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        """Replaces every LoraLayer by its base layer (with the active, or the given, adapters merged in if
        `merge`, else exactly the original weights) and every modules_to_save wrapper by the merged adapter's
        copy if `merge` (see ModulesToSaveWrapper.merged_module), else the original (the model as it came, as HF
        PEFT 0.22 gives it; 0.21 gave the trained copy)."""
        # first: a refusal (two merged adapters with a copy each) comes before anything changed
        written = self._pending(adapter_names) if merge else [layer for _, layer in self.lora_layers() if layer.merged]
        refuse_offloaded(self._bases(written), "a merge" if merge else "an unmerge", root=self.model)
        kept = {name: wrapper.merged_module(adapter_names) if merge else wrapper.original_module
                for name, wrapper in self.save_wrappers()}
        if merge:
            self._check_mergeable(adapter_names)
            self._warn_of_tied_weights(adapter_names)
        for name, layer in self.lora_layers():
            if merge:
                layer.merge(adapter_names)
            else:
                layer.unmerge()
            _set_submodule(self.model, name, layer.base_layer)
        for name, module in kept.items():
            _set_submodule(self.model, name, module)
        self._restore_trainability(self.model)
        return self.model

    # ------------------------------------------------------------------ state dicts in HF PEFT's format

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter `name`'s tensors under HF PEFT's saved key names (``base_model.model.<path>.lora_A.weight``,
        the adapter name removed), biases per ``config.bias`` and modules_to_save copies included.

        The tensors share storage with the model's parameters: loading copies into them."""
        config = self.peft_config[name]
        out: dict[str, torch.Tensor] = {}
        dropped = set()  # layers saved without factors (rank 0): loaded as plain layers, so their bias is <path>.bias
        for path, layer in self.lora_layers():
            if name in layer.lora_A:
                a, b = self.lora_factors(layer, name)
                if a is None:
                    dropped.add(path)
                    if config.bias == "lora_only" and layer.base_layer.bias is not None:
                        out[f"{PREFIX}{path}.bias"] = layer.base_layer.bias
                    continue
                out[f"{PREFIX}{path}.lora_A.weight"] = a
                out[f"{PREFIX}{path}.lora_B.weight"] = b
                if config.bias == "lora_only" and layer.base_layer.bias is not None:
                    out[f"{PREFIX}{path}.base_layer.bias"] = layer.base_layer.bias
        for path, wrapper in self.save_wrappers():
            if name in wrapper.modules_to_save:
                for key, value in wrapper.modules_to_save[name].state_dict().items():
                    out[f"{PREFIX}{path}.{key}"] = value
        if config.bias == "all":
            for key, value in self.model.state_dict().items():
                if _is_bias(key) and ".lora_" not in key and ".original_module." not in key \
                        and ".modules_to_save." not in key:
                    path = key.removesuffix(".base_layer.bias")
                    out[f"{PREFIX}{path}.bias" if path in dropped else f"{PREFIX}{key}"] = value
        return {k: v.detach() for k, v in out.items()}

    def lora_factors(self, layer: LoraLayer, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(A, B) of adapter `name` in `layer` as saved in HF PEFT's format, or (None, None) to save none."""
        return layer.lora_A[name].weight, layer.lora_B[name].weight

    def export_adapter(self, name: str) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
        """What save_pretrained writes for adapter `name`: its config and tensors."""
        return self.peft_config[name], self.adapter_state_dict(name)
