"""PeftModel and get_peft_model: HF PEFT's user-facing API over pefttorch's LoRA layers.

A PeftModel behaves like the model it wraps (forward, generate, config, HF Trainer, gradient
checkpointing; other attributes are forwarded) and reads and writes adapters in HF PEFT's format, so
adapters move freely between pefttorch and ``peft``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import types
from pathlib import Path

import torch
from torch import nn

from .nn.lora import offloaded_at
from .tuners._config import TASK_MODULES_TO_SAVE, read_config
from .tuners._forwarding import Forwarding
from .tuners._hooked import HookedModel
from .tuners.adapter import AdapterConfig, AdapterModel, ScaLearnConfig, ScaLearnModel
from .tuners.adapter.config import PEFT_TYPE as ADAPTER
from .tuners.adapter.scalearn import SCALEARN
from .tuners.lora.config import CONFIG_NAME, LoraConfig
from .tuners.lora.layer import LoraLayer, ModulesToSaveWrapper
from .tuners.lora.model import LoraModel, _is_bias
from .tuners.meft.config import PEFT_TYPE as MEFT
from .tuners.meft.config import MeftConfig
from .tuners.meft.model import MeftAdapter, MeftModel, ReversibleLayerList
from .tuners.prompt import DeptConfig, DeptModel, PrefixModel, PrefixTuningConfig, PromptModel, PromptTuningConfig
from .tuners.prompt.config import DEPT, PREFIX_TUNING, PROMPT_TUNING
from .tuners.prompt.model import WEIGHTS_FOLLOW, VirtualTokenModel
from .tuners.rank import AdaLoraConfig, IncreLoraConfig, RankedLoraModel
from .tuners.rank.layer import Components, RankedLoraLayer
from .tuners.scaling import IA3Config, SsfConfig, VectorModel
from .tuners.scaling.config import IA3, SSF
from .tuners.selective import BitFitConfig, LNTuningConfig, SelectiveModel
from .tuners.selective.config import BITFIT, LN_TUNING
from .tuners.selective.model import is_swapped_in

WEIGHTS_NAME = "adapter_model.safetensors"
# config class -> the model that carries it (subclasses before their base class: the first match wins)
_TUNERS = {MeftConfig: MeftModel, AdapterConfig: AdapterModel, ScaLearnConfig: ScaLearnModel,
           IncreLoraConfig: RankedLoraModel, AdaLoraConfig: RankedLoraModel, LoraConfig: LoraModel,
           IA3Config: VectorModel, SsfConfig: VectorModel,
           BitFitConfig: SelectiveModel, LNTuningConfig: SelectiveModel, DeptConfig: DeptModel,
           PromptTuningConfig: PromptModel, PrefixTuningConfig: PrefixModel}


def _tuner_for(config) -> type:
    """The tuner class that serves `config`; a TypeError that says what is accepted for anything else."""
    tuner = next((t for cls, t in _TUNERS.items() if isinstance(config, cls)), None)
    if tuner is None:
        kind = type(config)
        hint = (f"; for HF PEFT's {kind.__name__} use pefttorch.{kind.__name__} (same fields) if pefttorch has it, "
                "or keep HF PEFT and call pefttorch.accelerate(peft_model)") if kind.__module__.startswith("peft") \
            else ""
        raise TypeError("pefttorch.PeftModel takes a pefttorch config (" + ", ".join(c.__name__ for c in _TUNERS)
                        + f"), got {kind.__module__}.{kind.__name__}{hint}")
    return tuner


def _refuse_foreign_state(model: nn.Module) -> None:
    """Refuses a model where no adapter can be added: one whose weights 🤗 Accelerate offloads (see offloaded_at), and
    one that carries HF PEFT's layers (transformers' add_adapter, or peft's get_peft_model): pefttorch's LoRA went
    onto their base layers and onto their own lora_A/lora_B under "all-linear" (LoRA on LoRA), or a named target was
    refused as "(Linear)", HF PEFT's layer's class name."""
    # (a new adapter was created on the meta device too, never loaded by the hook, not among its weights: the outputs
    # were uninitialised memory, NaN with disk offload, and backward failed on a meta gradient)
    offloaded = offloaded_at(model)
    if offloaded is not None:
        raise ValueError(f"the model's weights are offloaded by 🤗 Accelerate (at {offloaded}: on the meta device, "
                         "loaded for each call), where an adapter cannot be created (its weights would be "
                         "uninitialised memory); load the model without offloading (a device_map of devices only), "
                         "add the adapter, then offload if needed")
    hf = next((path for path, m in model.named_modules() if type(m).__module__.startswith("peft.tuners.")), None)
    if hf is not None:
        raise ValueError(f"the model carries an HF PEFT adapter (at {hf}; added by transformers' add_adapter or by "
                         "peft.get_peft_model): pefttorch.accelerate(model) runs it with pefttorch's kernels, or "
                         "remove it before adding a pefttorch adapter")


def _adapter_trace(model: nn.Module) -> str | None:
    """Where `model` holds a pefttorch tuner's layers or hooks (left by a get_peft_model that was not unloaded), or
    None. The density loss's hooks do not count: it is attached on its own, and combines with any tuner."""
    swapped = next((name for name, p in model.named_parameters() if is_swapped_in(p)), None)
    if swapped is not None:
        return f"a parameter swapped in by BitFit or LayerNorm tuning at {swapped}"
    for path, module in model.named_modules():
        if isinstance(module, (LoraLayer, ModulesToSaveWrapper, MeftAdapter, ReversibleLayerList)):
            return f"{type(module).__name__} at {path or 'the top'}"
        tuner = _tuner_hook(module)
        if tuner is not None:
            return f"a hook of {tuner} on {path or 'the top'}"
    return None


def _tuner_hook(module: nn.Module) -> str | None:
    """The pefttorch tuner (e.g. pefttorch.tuners.scaling) whose forward hook is on `module`, or None (the density
    loss's hooks do not count)."""
    for hook in (*module._forward_pre_hooks.values(), *module._forward_hooks.values()):
        source = getattr(hook, "func", hook)  # functools.partial
        source = getattr(source, "__self__", source)  # a bound method: its tuner
        where = source.__module__ if isinstance(source, types.FunctionType) else type(source).__module__
        if where.startswith("pefttorch.tuners.") and not where.startswith("pefttorch.tuners.density"):
            return ".".join(where.split(".")[:3])
    return None


@contextlib.contextmanager
def _tensors_from(model: nn.Module, state_dict: dict[str, torch.Tensor] | None):
    """While open, `model`'s parameters and buffers named in `state_dict` are its tensors (the model's own are put
    back on exit): what save_pretrained(state_dict=...) reads the adapters from. A tensor registered in several
    places (tied weights; BitFit's tuned biases, in their modules and in the tuner) is replaced in all of them."""
    if state_dict is None:
        yield
        return
    places: dict[int, list[tuple[dict, str]]] = {}  # every registration of each tensor
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for attr, t in table.items():
                if t is not None:
                    places.setdefault(id(t), []).append((table, attr))
    swapped = []
    try:
        for key, value in state_dict.items():
            owner_name, _, attr = key.rpartition(".")
            try:
                owner = model.get_submodule(owner_name)
            except AttributeError:
                owner = None
            own = () if owner is None else (owner._parameters, owner._buffers)
            tables = [t for t in own if t.get(attr) is not None]
            if not tables:
                if owner is not None and attr == "_extra_state":
                    continue  # a module's own state, not an adapter tensor (IncreLoRA/AdaLoRA's ranks: see below)
                raise ValueError(f"save_pretrained: state_dict key {key!r} is not a parameter or buffer of this model "
                                 f"(give the state dict of the PeftModel itself, keyed as its state_dict())")
            for table, name in places.get(id(tables[0][attr]), [(tables[0], attr)]):
                swapped.append((table, name, table[name]))
                table[name] = value
        # An IncreLoRA/AdaLoRA layer's ranks and component order, which the export reads from the model, must be the
        # model's now where the state dict has the layer's tensors: a snapshot from before a rank allocation (or of
        # parameters alone, without the ranks) was saved under today's ranks, wrong or not loadable
        for path, module in model.named_modules():
            if not isinstance(module, Components):
                continue
            layer = path.rpartition(".lora_components.")[0]
            if not any(f"{layer}.{n}" in state_dict for n, _ in model.get_submodule(layer).named_parameters()):
                continue
            ranks = state_dict.get(f"{path}._extra_state")
            if not (isinstance(ranks, torch.Tensor) and torch.equal(ranks.cpu(), module.get_extra_state())):
                what = (f"has tensors of {layer} but not its ranks ({path}._extra_state)" if ranks is None
                        else f"'s ranks at {path} are not the model's now (a snapshot from before a rank allocation)")
                raise ValueError(f"save_pretrained: the state_dict{' ' if ranks is None else ''}{what}: keep a copy of "
                                 "the model instead (copy.deepcopy) and save_pretrained that")
        yield
    finally:
        for table, attr, original in reversed(swapped):
            table[attr] = original


def _with_task_heads(config, task_type):
    """`config` with the new head of `task_type` (HF PEFT's modules_to_save for SEQ_CLS, TOKEN_CLS, QUESTION_ANS) in
    its modules_to_save: a copy where one is missing, else `config` itself."""
    heads = TASK_MODULES_TO_SAVE.get(task_type)
    if not (heads and hasattr(config, "replace") and hasattr(config, "modules_to_save")):
        return config
    have = list(config.modules_to_save or [])
    missing = [h for h in heads if h not in have]
    return config.replace(modules_to_save=have + missing) if missing else config


class PeftModel(Forwarding):
    """A model with a PEFT method's adapter: LoRA (IncreLoRA's or AdaLoRA's of changing rank), MEFT's reversible
    adapters, bottleneck adapters (and ScaLearn's mix of several), (IA)^3, SSF, BitFit, LayerNorm tuning, prompt
    tuning, DePT or prefix tuning. Build one with :func:`get_peft_model` or :meth:`from_pretrained`.

    With IncreLoRA or AdaLoRA, ``update_and_allocate(step)`` and ``rank_pattern()`` reach the
    :class:`~pefttorch.tuners.rank.RankedLoraModel`; ``save_pretrained`` writes a plain LoRA adapter with the
    final ranks."""

    wrapped_attribute = "base_model"

    def __init__(self, model: nn.Module, config: LoraConfig | MeftConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True) -> None:
        super().__init__()
        tuner = _tuner_for(config)
        # a task_type set after the config was made (the config adds its heads when made): the head trains and is
        # saved all the same, as HF PEFT derives it here (it stayed frozen and unsaved, and the save did not load)
        config = _with_task_heads(config, getattr(config, "task_type", None))
        if isinstance(model, PeftModel):
            raise TypeError("the model has adapters already: use add_adapter() to add another")
        _refuse_foreign_state(model)
        trace = _adapter_trace(model)
        if trace is not None:
            # a second tuner on the same modules would re-initialise the first one's adapter in place and leave
            # its saves inconsistent (HF PEFT warns of the same and goes on)
            # only LoRA holds several adapters: the others refuse add_adapter, which was a circular hint for them
            several = any(isinstance(m, LoraLayer) and not isinstance(m, RankedLoraLayer) for m in model.modules())
            advice = ("Use that PeftModel's add_adapter() for another adapter, or its unload() first" if several else
                      "Its method holds one adapter set per model: call that PeftModel's unload() first")
            raise ValueError(
                f"the model holds a pefttorch adapter already ({trace}): it was given to get_peft_model before. "
                f"{advice}; to adapt the model twice independently, deep-copy it before the first get_peft_model")
        # (the tuners with parameters of a dtype, and their subclasses: ScaLearn's sources and scales)
        if issubclass(tuner, (LoraModel, VectorModel, AdapterModel)):
            self.base_model = tuner(model, config, adapter_name, autocast_adapter_dtype)
        else:
            self.base_model = tuner(model, config, adapter_name)
        self.density_loss = None  # the DensityLoss hooks when an adapter's config asks for the density loss
        try:
            self._attach_density_loss(config)
        except Exception:
            self.base_model.unload(merge=False)  # the model is given back as it came
            raise
        if _checkpointing_enabled(model):
            self._enable_input_require_grads()
        self.register_state_dict_post_hook(_drop_aliases)
        self.register_load_state_dict_pre_hook(_fill_dropped_aliases)
        self.register_load_state_dict_post_hook(_restore_ties)
        # Show the wrapped model's forward signature to tools that inspect it (the HF Trainer keeps the
        # dataset columns the model's forward accepts).
        self.__class__ = _class_for(type(model))

    def forward(self, *args, **kwargs):
        _refuse_mixed_batch(kwargs)
        return self.base_model.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        _refuse_mixed_batch(kwargs)
        if isinstance(self.base_model, VirtualTokenModel):  # continuing from a returned cache, see there
            return self.base_model.generate(*args, **kwargs)
        return self.base_model.model.generate(*args, **kwargs)

    # ------------------------------------------------------------------ inspection

    def resize_token_embeddings(self, *args, **kwargs):
        """transformers' resize, refused where it would replace a module that carries a tuner's hook ((IA)^3's or
        SSF's vector on lm_head): the new module has none, and the vector stopped applying and training in silence
        (HF PEFT's and pefttorch's LoRA layers are refused by transformers itself)."""
        model = self.get_base_model()
        for kind in ("input", "output"):
            module = getattr(model, f"get_{kind}_embeddings", lambda: None)()
            tuner = None if module is None else _tuner_hook(module)
            if tuner is not None:
                raise TypeError(f"resize_token_embeddings would replace the {kind} embeddings, which carry a hook of "
                                f"{tuner} (the adapter there would stop applying): resize the base model before "
                                "get_peft_model, or leave that module out of the adapter's target_modules")
        return model.resize_token_embeddings(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        return self.base_model.peft_config

    @property
    def active_adapters(self) -> list[str]:
        return list(self.base_model.active_adapters)

    @property
    def active_adapter(self) -> str:
        return self.base_model.active_adapters[0]

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters), each tensor counted once. With IncreLoRA or AdaLoRA, the
        components that train now (spare capacity is storage, not parameters)."""
        seen, trainable, total = set(), 0, 0
        for p in self.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        if isinstance(self.base_model, RankedLoraModel):  # spare capacity is storage, not parameters
            trainable -= self.base_model.idle_parameters(trainable_only=True)
            total -= self.base_model.idle_parameters()
        return trainable, total

    def update_and_allocate(self, global_step: int, loss_scale: float | torch.Tensor | None = None):
        """IncreLoRA's and AdaLoRA's rank allocation step; with torch.amp.GradScaler, pass `loss_scale` (see
        :meth:`pefttorch.tuners.rank.RankedLoraModel.update_and_allocate`)."""
        if not isinstance(self.base_model, RankedLoraModel):
            # (the lookup used to fall through to the wrapped model: "'LlamaForCausalLM' has no attribute ...")
            config = self.base_model.peft_config[self.active_adapter]
            raise AttributeError("update_and_allocate is for rank-allocating adapters (IncreLoraConfig, "
                                 f"AdaLoraConfig); this model's adapter is a {type(config).__name__}")
        return self.base_model.update_and_allocate(global_step, loss_scale)

    @property
    def active_peft_config(self):
        """The active adapter's config (HF PEFT's property)."""
        return self.peft_config[self.active_adapter]

    @property
    def modules_to_save(self) -> set[str] | None:
        """The names in every adapter's modules_to_save (None where none has any), as HF PEFT's property."""
        names = {n for c in self.peft_config.values() for n in (getattr(c, "modules_to_save", None) or [])}
        return names or None

    @property
    def base_model_torch_dtype(self) -> torch.dtype | None:
        return getattr(self.get_base_model(), "dtype", None)

    def disable_adapter_layers(self) -> None:
        """Switches every adapter off until :meth:`enable_adapter_layers` (HF PEFT's; ``disable_adapter()`` is
        the same as a context manager); adapters added meanwhile start disabled (HF PEFT's would run)."""
        self.base_model.set_adapters_disabled(True)

    def enable_adapter_layers(self) -> None:
        self.base_model.set_adapters_disabled(False)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Whether the named adapters' parameters (their modules_to_save copies included) train, as HF PEFT's. The
        LoRA family's set_adapter marks what trains again, as HF PEFT's does."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if not names:
            raise ValueError("set_requires_grad: name at least one adapter")
        self._check_adapter_names(names)
        owned = getattr(type(self.base_model), "_owned_parameters", None)  # (on the class: see set_adapter)
        if owned is not None:
            params = [p for name in names for p in owned(self.base_model, name)]
        elif isinstance(self.base_model, HookedModel):  # one adapter set, named by the check above
            params = [*self.base_model.adapter_parameters(),
                      *(p for _, w in self.base_model._wrappers() for p in w.modules_to_save.parameters())]
        else:
            raise NotImplementedError(f"set_requires_grad is not implemented for {type(self.base_model).__name__}; "
                                      "use requires_grad_ on the parameters you mean")
        for p in params:
            p.requires_grad_(requires_grad)

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, commit_description: str | None = None,
                    private: bool | None = None, token: bool | str | None = None, revision: str | None = None,
                    create_pr: bool = False, tags: list[str] | None = None, **save_kwargs) -> str:
        """Uploads the adapters as :meth:`save_pretrained` writes them (``save_kwargs`` go there) to the hub repo
        `repo_id`, created if missing; returns the commit's URL. (The lookup used to reach the wrapped
        transformers model's push_to_hub, which uploaded the whole model with LoRA-renamed keys.) `tags` go into
        a model card, which pefttorch does not write: refused."""
        import tempfile

        from huggingface_hub import create_repo, upload_folder

        if tags:
            raise ValueError("push_to_hub(tags=...): pefttorch writes no model card to put tags in; add them on the "
                             "hub")
        repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, **save_kwargs)
            return upload_folder(repo_id=repo_id, folder_path=folder, token=token, revision=revision,
                                 create_pr=create_pr, commit_message=commit_message or "Upload adapter (pefttorch)",
                                 commit_description=commit_description)

    def __getattr__(self, name: str):
        if name in _HF_PEFT_ONLY:
            # the lookup would go on to the wrapped model: "'LlamaForCausalLM' object has no attribute ...", or
            # transformers' own adapter methods of the same name (disable_adapters: "No adapter loaded")
            raise AttributeError(f"pefttorch's PeftModel has no {name} (HF PEFT's){_HF_PEFT_ONLY[name]}")
        return super().__getattr__(name)

    # The HF Trainer tells a causal LM by this name (with label smoothing it shifts the labels only then) and special-
    # cases HF PEFT's wrapper; ours said "PeftModelFor...", so the Trainer smoothed the current token, not the next:
    # the wrapped model's name, as the Trainer is training that model. The repr keeps our class's name.
    def _get_name(self) -> str:
        return self.base_model.model._get_name()

    def __repr__(self) -> str:
        return type(self).__name__ + super().__repr__()[len(self._get_name()):]

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    # ------------------------------------------------------------------ adapters

    def add_adapter(self, adapter_name: str, peft_config: LoraConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Adds a second (third, ...) adapter; it is not made active (see set_adapter). HF PEFT's arguments:
        `autocast_adapter_dtype` for this adapter (float32 in a 16-bit model, or with False the model's dtype; the
        model's own setting was used), `low_cpu_mem_usage` accepted and ignored (the adapter is created in place)."""
        del low_cpu_mem_usage
        self._refuse_other_method(peft_config, "add_adapter")
        # as HF PEFT: on a classification model every adapter gets its own trainable copy of the new head
        peft_config = _with_task_heads(peft_config, getattr(next(iter(self.peft_config.values())), "task_type", None))
        _refuse_foreign_state(self.get_base_model())  # (offloaded after get_peft_model: adapters on meta)
        with self._adapter_autocast(autocast_adapter_dtype):
            # the density loss attached inside the injection: refused (another config's is on), it undoes the
            # adapter too. The new adapter is added frozen, not activated; what trained before trains still
            self.base_model.inject_adapter(peft_config, adapter_name,
                                           then=lambda: self._attach_density_loss(peft_config))

    def _refuse_other_method(self, config, caller: str) -> None:
        if _tuner_for(config) is not type(self.base_model):
            raise TypeError(f"{caller}: this model's adapters are {type(self.base_model).__name__}'s; an adapter of "
                            f"{type(config).__name__} cannot join them (one method per model)")

    @contextlib.contextmanager
    def _adapter_autocast(self, autocast_adapter_dtype: bool):
        """The tuner's autocast_adapter_dtype set for one adapter's injection (where the tuner has the setting)."""
        before = getattr(self.base_model, "autocast_adapter_dtype", None)
        if before is not None:
            self.base_model.autocast_adapter_dtype = autocast_adapter_dtype
        try:
            yield
        finally:
            if before is not None:
                self.base_model.autocast_adapter_dtype = before

    def _attach_density_loss(self, config) -> None:
        if getattr(config, "density_loss", None) is None:
            return
        if self.density_loss is not None and not self.density_loss.attached:
            self.density_loss = None  # its handle's remove() detached it
        if self.density_loss is not None:
            if self.density_loss.config != config.density_loss:
                raise ValueError("a density loss with another config is attached already: one per model")
            return
        from .tuners.density import attach_density_loss

        # hooked on this wrapper, so the term joins the loss of the calls the user (or Trainer) makes
        self.density_loss = attach_density_loss(self, config.density_loss)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activates one adapter, or several whose updates add up; only active adapters train. For the LoRA family,
        as in HF PEFT, the activated adapters train even if they were loaded for inference (``is_trainable=False``),
        and with `inference_mode` they are frozen (they alone). The methods that hold one adapter set leave it as
        it is, and `inference_mode` freezes the whole model."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)  # (an iterator, once)
        if isinstance(self.base_model, LoraModel):
            self.base_model.set_adapter(names, inference_mode=inference_mode)
        else:
            self.base_model.set_adapter(names)  # checks the names before anything changes
            if inference_mode:
                self.requires_grad_(False)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)
        if not any(getattr(c, "density_loss", None) is not None for c in self.peft_config.values()):
            self._detach_density_loss()  # its only config went with the adapter (as unload() detaches it)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within the block the model computes as the base model (modules_to_save use their originals), also with
        adapters added in it: they start disabled, and are enabled with the others on leaving it."""
        self.base_model.set_adapters_disabled(True)
        try:
            yield
        finally:
            self.base_model.set_adapters_disabled(False)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Adds the active (or the given) adapters into the base weights. With `safe_merge`, a merge that would
        leave a non-finite weight is undone and raises instead."""
        self._check_adapter_names(adapter_names)
        if safe_merge:
            self.base_model.merge_adapter(adapter_names, safe_merge=True)
        else:
            self.base_model.merge_adapter(adapter_names)

    def unmerge_adapter(self, force_reshard: bool = False) -> None:
        """Takes the merged adapters out of the base weights. (`force_reshard` is HF PEFT's, for FSDP-sharded
        weights, which pefttorch's merges read and write as they are: accepted and unused.)"""
        del force_reshard
        self.base_model.unmerge_adapter()

    def _check_adapter_names(self, adapter_names) -> None:
        """Refuses names that are no adapter of the model (merging would skip them silently, as HF PEFT's does;
        saving would have nothing to write)."""
        if adapter_names is None:
            return
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names is a list of adapter names, got the string {adapter_names!r}")
        unknown = [n for n in adapter_names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; adapters are: {list(self.peft_config)}")

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        """The base model with the active (or the given) adapters merged into its weights, LoRA layers (and density
        loss hooks) removed. `safe_merge` as in merge_adapter; `progressbar` is accepted for HF PEFT's signature
        (merging is a pass over the adapted layers, quick enough not to need one)."""
        del progressbar
        self._check_adapter_names(adapter_names)
        if isinstance(self.base_model, LoraModel):
            for _, wrapper in self.base_model.save_wrappers():
                wrapper.merged_module(adapter_names)  # refuses two trained copies to keep before anything merges
        if safe_merge:
            self._refuse_non_finite_kept(adapter_names)
            self.merge_adapter(adapter_names, safe_merge=True)
        if isinstance(self.base_model, LoraModel):
            model = self.base_model.unload(merge=True, adapter_names=adapter_names)
        else:  # the other tuners hold one adapter set: the checked names are that one (or [], nothing to merge)
            model = self.base_model.unload(merge=adapter_names is None or bool(adapter_names))
        # after the unload, which may refuse (a base weight it cannot merge into): the model then trains on as
        # before, with its density loss (detached first, the loss changed in silence)
        self._detach_density_loss()
        return model

    def _refuse_non_finite_kept(self, adapter_names: list[str] | None) -> None:
        """safe_merge's check of what merge_and_unload keeps as trained, beside the merged weights: the trained
        copies of modules_to_save and trained biases (LoRA's bias="all"/"lora_only"). A NaN there was kept in
        silence, where the same tensor trained by BitFit or LayerNorm tuning was refused."""
        kept = []
        for path, wrapper in self.base_model.model.named_modules():
            if not isinstance(wrapper, ModulesToSaveWrapper):
                continue
            module = wrapper.merged_module(adapter_names if isinstance(self.base_model, LoraModel) else None)
            if module is not wrapper.original_module:
                kept += [(f"{path}.{name}", p) for name, p in module.named_parameters()]
        # the biases LoRA's bias setting trains, by every adapter's config (requires_grad is off in a loaded adapter;
        # the biases are the base model's, kept whichever adapters merge)
        if isinstance(self.base_model, LoraModel):
            bias = {c.bias for c in self.peft_config.values()}
            if "all" in bias:
                kept += [(name, p) for name, p in self.base_model.model.named_parameters()
                         if _is_bias(name) and "lora_" not in name and ".modules_to_save." not in name
                         and ".original_module." not in name]
            elif "lora_only" in bias:
                kept += [(f"{path}.base_layer.bias", layer.base_layer.bias) for path, layer in
                         self.base_model.lora_layers() if layer.base_layer.bias is not None]
        # (an offloaded tensor, on the meta device, holds no values to check: the merge's own refusal speaks)
        bad = [name for name, p in kept
               if p.is_floating_point() and not p.is_meta and not bool(torch.isfinite(p).all())]
        if bad:
            raise ValueError(f"safe_merge: NaN or inf in the trained {', '.join(bad[:3])}"
                             f"{' ...' if len(bad) > 3 else ''}, which the merged model would keep; nothing was merged")

    def unload(self) -> nn.Module:
        """The base model as it was, adapter layers (and density loss hooks) removed, nothing merged: modules in
        modules_to_save are the originals, as HF PEFT 0.22 gives them back (0.21 gave the trained copies);
        merge_and_unload() keeps the trained copies."""
        model = self.base_model.unload(merge=False)
        self._detach_density_loss()  # after, as in merge_and_unload
        return model

    def _detach_density_loss(self) -> None:
        if self.density_loss is not None:
            self.density_loss.remove()
            self.density_loss = None

    # ------------------------------------------------------------------ gradient checkpointing

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        """The wrapped model's gradient_checkpointing_enable, keeping the adapters reachable."""
        self.base_model.model.gradient_checkpointing_enable(**kwargs)
        self._enable_input_require_grads()

    def activation_checkpointing_enable(self, **kwargs) -> None:
        """The wrapped model's activation_checkpointing_enable (transformers 5's name for it), keeping the
        adapters reachable."""
        self.base_model.model.activation_checkpointing_enable(**kwargs)
        self._enable_input_require_grads()

    def _enable_input_require_grads(self) -> None:
        # With reentrant checkpointing a segment whose inputs need no grad returns outputs that need none
        # either: the frozen embeddings would cut the adapters off from the loss. Make them need grad.
        model = self.base_model.model
        # once: transformers' gradient_checkpointing_enable may have called it already, and a second call replaces
        # the handles it keeps, so that disable_input_require_grads() left the first hook firing for good
        if getattr(model, "_require_grads_hooks", None) or hasattr(model, "_require_grads_hook"):
            return
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()

    # ------------------------------------------------------------------ saving and loading

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        selected_adapters: list[str] | None = None, save_embedding_layers: str | bool = "auto",
                        is_main_process: bool = True, path_initial_model_for_weight_conversion: str | None = None, *,
                        state_dict: dict[str, torch.Tensor] | None = None, **kwargs) -> None:
        """Writes each adapter in HF PEFT's format: ``adapter_config.json`` and
        ``adapter_model.safetensors``; the adapter "default" in `save_directory`, others in
        ``save_directory/<name>`` (as HF PEFT does).

        As in HF PEFT, a process with ``is_main_process=False`` writes nothing (so that the processes of a
        distributed run do not all write the same files), and `state_dict` (keyed as this model's ``state_dict()``)
        gives the tensors to save instead of the model's own: under FSDP2 pass the full state dict
        (``torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))``, which every process must call), since the model's parameters are
        then shards. ``save_embedding_layers=True`` also writes the input and output embedding layers' weights (a
        resized vocabulary's new rows), as HF PEFT does, and loading puts them back; where the adapter wraps an
        embedding layer, that layer's base weights alone; ``"auto"`` (the default) writes those, as HF PEFT's does
        short of asking the hub whether the vocabulary was resized. The arguments come in HF PEFT's order;
        ``safe_serialization`` and HF PEFT's other keyword arguments are accepted and ignored (the format is always
        safetensors, which HF PEFT loads), and ``path_initial_model_for_weight_conversion`` (converting a PiSSA or
        OLoRA adapter, initialisations pefttorch does not have) is refused. ``selected_adapters=[]`` writes
        nothing, as HF PEFT."""
        from .integrations.hf_format import save_adapter, saved_embedding_tensors

        if not isinstance(safe_serialization, bool):
            # save_pretrained(d, ["b"]) chose adapters before the order became HF PEFT's: said, not saving them all
            raise TypeError(f"save_pretrained: safe_serialization (the second argument, as in HF PEFT) is True or "
                            f"False, got {safe_serialization!r}; pass the adapters as selected_adapters=")
        del safe_serialization
        if path_initial_model_for_weight_conversion is not None:
            raise ValueError("save_pretrained(path_initial_model_for_weight_conversion=...) converts PiSSA/OLoRA "
                             "adapters, which pefttorch does not initialise: its adapters are saved as they are")
        if selected_adapters is not None and not isinstance(selected_adapters, (list, tuple)):
            raise TypeError(f"save_pretrained: selected_adapters is a list of adapter names or None, got "
                            f"{selected_adapters!r}")

        if save_embedding_layers not in (True, False, "auto"):
            raise ValueError(f"save_pretrained: save_embedding_layers is True, False or 'auto', got "
                             f"{save_embedding_layers!r}")
        self._check_adapter_names(selected_adapters)
        if not is_main_process:
            return
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        base = self.get_base_model()
        with _tensors_from(self, state_dict):
            for name in names:
                directory = Path(save_directory) if name == "default" else Path(save_directory) / name
                config = self.peft_config[name]
                if config.base_model_name_or_path is None:
                    config.base_model_name_or_path = getattr(getattr(base, "config", None), "_name_or_path",
                                                             None) or None
                config, tensors = self.base_model.export_adapter(name)
                tensors = {**saved_embedding_tensors(base, name, save_embedding_layers), **tensors}
                save_adapter(directory, config, tensors)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config=None, autocast_adapter_dtype: bool = True,
                        low_cpu_mem_usage: bool = False, torch_device: str | None = None, **kwargs) -> PeftModel:
        """Loads an adapter saved by pefttorch or by HF PEFT (LoRA) into `model`.

        HF PEFT's arguments are taken: `config` (a config to use instead of the saved one), ``subfolder=`` (the
        adapter lies in ``model_id/subfolder``, as save_pretrained writes a non-default adapter), and the hub's
        download options (``revision``, ``token``, ``cache_dir``...), which a local folder does not need.
        `low_cpu_mem_usage` and `torch_device` change nothing here: the adapter is created on the model's device
        and the saved tensors are copied straight into it (so a model on the meta device is refused: materialize
        it first).

        With ``is_trainable=False`` (the default, as in HF PEFT) the adapter is frozen and the model put
        in eval mode. A missing file, keys that do not fit the model or an unsupported adapter type raise
        and leave `model` unchanged.
        """
        del low_cpu_mem_usage, torch_device
        model_id = _adapter_folder(model_id, kwargs, "from_pretrained")
        if config is None:
            config = _load_config(model_id, is_trainable)
        else:
            config = copy.deepcopy(config)
            config.inference_mode = not is_trainable
            if isinstance(config, PrefixTuningConfig):
                # with the MLP the prefix would be computed, a fresh tensor the saved one was copied into and lost
                config = config.loaded()
        loading = WEIGHTS_FOLLOW.set(True)
        try:
            peft_model = cls(model, config, adapter_name, autocast_adapter_dtype)
        finally:
            WEIGHTS_FOLLOW.reset(loading)
        try:
            peft_model._load_weights(model_id, adapter_name)
        except Exception:
            peft_model.base_model.unload(merge=False)  # the model as it was given
            raise
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     torch_device: str | None = None, autocast_adapter_dtype: bool = True,
                     low_cpu_mem_usage: bool = False, **kwargs) -> None:
        """Loads another saved adapter next to the existing ones (not made active). Takes HF PEFT's arguments as
        :meth:`from_pretrained` does (``subfolder=``; `torch_device` and `low_cpu_mem_usage` change nothing); with
        ``is_trainable=False`` (the default) the adapter is frozen and the model put in eval mode, as HF PEFT does."""
        del torch_device, low_cpu_mem_usage
        model_id = _adapter_folder(model_id, kwargs, "load_adapter")
        config = _load_config(model_id, is_trainable)
        self._refuse_other_method(config, "load_adapter")  # (an IA3 folder into a LoRA model: "no attribute 'bias'")
        _refuse_foreign_state(self.get_base_model())  # (offloaded after get_peft_model: adapters on meta)
        with self._adapter_autocast(autocast_adapter_dtype):
            # weights loaded inside the injection: a file that does not fit undoes it whole (deleting the adapter
            # left empty LoRA layers and modules_to_save wrappers, and the model frozen again)
            self.base_model.inject_adapter(config, adapter_name,
                                           then=lambda: self._load_weights(model_id, adapter_name))
        owned = getattr(type(self.base_model), "_owned_parameters", None)  # (on the class: see set_requires_grad)
        if is_trainable and owned is not None:
            # the loaded adapter is added frozen, not activated, and made trainable as HF PEFT leaves it: an
            # optimizer built from the parameters that require grad, before set_adapter activates it, left it out.
            # Adding or loading another adapter later leaves it so (until the next set_adapter, which trains the
            # active adapters only, here and in HF PEFT)
            for p in owned(self.base_model, adapter_name):
                p.requires_grad_(True)
        if not is_trainable:
            self.eval()  # for inference: dropout (the adapters' and the model's) off, as HF PEFT's load_adapter

    def _load_weights(self, model_id, adapter_name: str) -> None:
        from .integrations.hf_format import load_adapter_weights

        load_adapter_weights(Path(model_id), self.base_model, adapter_name)


# A tensor reachable under several keys (tied input and output embeddings; BitFit's tuned copies, held by the tuner
# and by their modules) is listed once in a PeftModel's state dict, as transformers' save_pretrained does: safetensors
# refuses to write shared tensors, and the HF Trainer writes a PeftModel's checkpoints with it. Loading puts the kept
# key's tensor back under the dropped keys, so a strict load passes, and a load with assign=True (into a model built
# on the meta device) leaves tied tensors tied, not one loaded and the other on meta.
def _alias_identity(t) -> tuple:
    """What two names of one tensor share: its storage view (a state dict holds detached copies, new objects), or
    the object itself where there is no storage to compare (meta, empty, a wrapper subclass such as FSDP2's DTensor,
    whose storage cannot be read)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if (isinstance(t, torch.Tensor) and t.layout == torch.strided and t.device.type != "meta" and t.numel()
            and not is_traceable_wrapper_subclass(t)):
        with contextlib.suppress(RuntimeError, NotImplementedError):
            return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device
    return ("object", id(t))


def _alias_groups(module: nn.Module) -> list[list[str]]:
    """Names of one tensor among those a state dict holds (a non-persistent buffer has no key, even where it aliases
    a saved tensor: filling one in would be an unexpected key)."""
    groups: dict[tuple, list[str]] = {}
    for name, t in (*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)):
        owner, _, attr = name.rpartition(".")
        if attr not in module.get_submodule(owner)._non_persistent_buffers_set:
            groups.setdefault(_alias_identity(t), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _drop_aliases(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    seen = set()
    for key in [k for k in state_dict if k.startswith(prefix)]:
        identity = _alias_identity(state_dict[key])
        if identity in seen:
            del state_dict[key]
        seen.add(identity)


def _fill_dropped_aliases(module: nn.Module, state_dict: dict, prefix: str, *_) -> None:
    ties = []
    for names in _alias_groups(module):
        kept = next((prefix + n for n in names if prefix + n in state_dict), None)
        if kept is None:
            continue  # all missing: reported as missing
        for n in names:
            state_dict.setdefault(prefix + n, state_dict[kept])
        tensors = [module.get_parameter(n) if _is_parameter(module, n) else module.get_buffer(n) for n in names]
        loaded = _alias_identity(state_dict[kept])
        if all(t is tensors[0] for t in tensors) and all(_alias_identity(state_dict[prefix + n]) == loaded
                                                          for n in names):
            ties.append(names)
    module._ties_to_restore = ties  # for _restore_ties, after the load
    _fill_declared_ties(module, state_dict, prefix)


def _fill_declared_ties(module: nn.Module, state_dict: dict, prefix: str) -> None:
    """Keys the saving model dropped as aliases, for a loading model whose tied tensors are not one (yet): built
    under accelerate's init_empty_weights, transformers 5 leaves lm_head and the embeddings separate meta tensors,
    and the dropped key was missing (strict) or left lm_head on meta or uninitialised (strict=False). The ties its
    transformers models declare (all_tied_weights_keys: {} where the config unties them) say which key it is."""
    names = None
    for path, sub in module.named_modules():
        tied = getattr(sub, "all_tied_weights_keys", None)
        if not isinstance(tied, dict) or not tied:
            continue
        if names is None:
            names = {n for n, _ in (*module.named_parameters(remove_duplicate=False),
                                    *module.named_buffers(remove_duplicate=False))}
        base = f"{path}." if path else ""
        for target, source in tied.items():
            # where an adapter wraps a tied module the tensor is its base layer's (lm_head.base_layer.weight, or
            # lm_head.original_module.weight beside a modules_to_save copy), not under the declared name
            have = [n for n in _wrapped_names(base + target) if n in names and prefix + n not in state_dict]
            given = next((prefix + n for n in _wrapped_names(base + source) if prefix + n in state_dict), None)
            if have and given is not None:
                state_dict[prefix + have[0]] = state_dict[given]


def _wrapped_names(name: str) -> tuple[str, ...]:
    """A module's tensor `name` and its names where an adapter wraps the module."""
    owner, _, attr = name.rpartition(".")
    return name, f"{owner}.base_layer.{attr}", f"{owner}.original_module.{attr}"


def _is_parameter(module: nn.Module, name: str) -> bool:
    owner, _, attr = name.rpartition(".")
    return attr in module.get_submodule(owner)._parameters


def _restore_ties(module: nn.Module, incompatible_keys) -> None:
    """assign=True puts a new tensor under each key: names that were one tensor, and loaded one, are one again."""
    for names in module.__dict__.pop("_ties_to_restore", ()):
        first = module.get_parameter(names[0]) if _is_parameter(module, names[0]) else module.get_buffer(names[0])
        for name in names[1:]:
            owner, _, attr = name.rpartition(".")
            setattr(module.get_submodule(owner), attr, first)


def _checkpointing_enabled(model: nn.Module) -> bool:
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # new name first: no warning
        if hasattr(type(model), attr):
            return bool(getattr(model, attr))
    return False


# HF PEFT's from_pretrained/load_adapter pass these to the hub's download; a local folder needs none of them.
_HUB_ARGUMENTS = ("revision", "token", "use_auth_token", "cache_dir", "force_download", "local_files_only",
                  "proxies", "resume_download", "ephemeral_gpu_offload", "use_safetensors")


def _adapter_folder(model_id, kwargs: dict, caller: str) -> Path:
    """`model_id`, or its `subfolder` (HF PEFT's argument); other keyword arguments must be the hub's download
    options (ignored: pefttorch loads local folders), or HF PEFT's loading options at their defaults, or an error
    names them."""
    subfolder = kwargs.pop("subfolder", None)
    # HF PEFT 0.22 can load keys that do not fit the model with a warning or in silence; pefttorch refuses them
    # always, as its "error": each value is taken (the strictest is what happens), anything else refused
    check = kwargs.pop("strict_adapter_check", "warn")
    if check not in ("warn", "error", "ignore"):
        raise ValueError(f"{caller}: strict_adapter_check must be one of 'warn', 'error' or 'ignore', got {check!r}")
    for key in ("key_mapping", "ignore_mismatched_sizes"):  # at their defaults (None or {}, False) they do nothing
        value = kwargs.pop(key, None)
        if value is not None and value is not False and not (isinstance(value, dict) and not value):
            raise ValueError(f"{caller}({key}={value!r}): pefttorch loads the saved keys and shapes as they are")
    unknown = [k for k in kwargs if k not in _HUB_ARGUMENTS]
    if unknown:
        raise TypeError(f"{caller}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}")
    return Path(model_id) / subfolder if subfolder else Path(model_id)


def _load_config(model_id, is_trainable: bool) -> LoraConfig | MeftConfig:
    directory = Path(model_id)
    if not directory.is_dir():
        raise FileNotFoundError(f"{model_id}: no such adapter directory (pefttorch loads from local folders)")
    if not (directory / CONFIG_NAME).is_file():
        # The HF Trainer saves only peft's and transformers' own models with save_pretrained; a pefttorch
        # PeftModel it writes as the state dict of the whole model (checkpoints and trainer.save_model()).
        hint = (": this looks like the HF Trainer's save of the whole model (model.safetensors); load it with "
                "model.load_state_dict(safetensors.torch.load_file(...)) into the same PeftModel, or write the "
                "adapter with model.save_pretrained(dir) after training") \
            if (directory / "model.safetensors").is_file() else ""
        raise FileNotFoundError(f"{model_id}: no {CONFIG_NAME}, not a saved adapter{hint}")
    data = read_config(directory / CONFIG_NAME)
    readers = {MEFT: MeftConfig.from_dict, ADAPTER: AdapterConfig.from_dict, IA3: IA3Config.from_dict,
               SSF: SsfConfig.from_dict, BITFIT: BitFitConfig.from_dict, LN_TUNING: LNTuningConfig.from_dict,
               PROMPT_TUNING: PromptTuningConfig.from_dict, DEPT: DeptConfig.from_dict,
               PREFIX_TUNING: PrefixTuningConfig.from_dict, SCALEARN: ScaLearnConfig.from_dict}
    peft_type = data.get("peft_type", "LORA")
    if peft_type not in readers and peft_type != "LORA":
        raise ValueError(f"{model_id}: adapter type {peft_type!r} is not supported; pefttorch loads "
                         + ", ".join(["LORA", *readers]))
    config = readers.get(peft_type, LoraConfig.from_dict)(data)
    config.inference_mode = not is_trainable
    return config


def get_peft_model(model: nn.Module, peft_config: LoraConfig | MeftConfig, adapter_name: str = "default",
                   mixed: bool = False, autocast_adapter_dtype: bool = True, revision: str | None = None,
                   low_cpu_mem_usage: bool = False) -> PeftModel:
    """Adds an adapter to `model` (as HF PEFT's get_peft_model does) and freezes everything else.

    With a LoraConfig, the layers `peft_config.target_modules` matches (nn.Linear, or GPT-2's Conv1D)
    become pefttorch LoRA layers computed by the fused kernel; with ``autocast_adapter_dtype`` (the
    default, as in HF PEFT) adapter weights of a float16/bfloat16 model are kept in float32. An
    IncreLoraConfig or AdaLoraConfig gives them a rank that changes during training (see
    :class:`IncreLoraConfig`). With a MeftConfig, the layer stack becomes reversible, with adapters (see
    :class:`MeftConfig`). `low_cpu_mem_usage` is accepted for HF PEFT's signature: adapters are small and
    created on the model's device either way. `revision` (of the base model) is recorded in the config where it
    has the field, as HF PEFT does; ``mixed=True`` (HF PEFT's PeftMixedModel) is not supported.
    """
    del low_cpu_mem_usage
    if mixed:
        raise ValueError("get_peft_model(mixed=True): pefttorch has no mixed model of several adapter types")
    if revision is not None and hasattr(peft_config, "revision"):
        peft_config.revision = revision
    return PeftModel(model, peft_config, adapter_name, autocast_adapter_dtype)


# HF PEFT's PeftModel methods pefttorch does not have (or has under another name), said as such
_HF_PEFT_ONLY = {
    "disable_adapters": ": use disable_adapter() (a context manager) or disable_adapter_layers()",
    "enable_adapters": ": use enable_adapter_layers()",
    "set_adapters": ": use set_adapter(), which takes a list",
    "add_weighted_adapter": "",
    "get_layer_status": "",
    "get_model_status": "",
    "create_or_update_model_card": "",
    "has_active_enabled_adapter": "",
    "set_additional_trainable_modules": ": list the modules in the config's modules_to_save",
    "get_prompt": "",
    "get_prompt_embedding_to_save": "",
    "prepare_model_for_gradient_checkpointing": ": use gradient_checkpointing_enable()",
}


def _refuse_mixed_batch(kwargs: dict) -> None:
    """HF PEFT's adapter_names= (a different adapter per row) is not implemented: refused, since the wrapped model's
    forward takes **kwargs and dropped it, and every row ran the active adapter in silence."""
    if kwargs.pop("adapter_names", None) is not None:
        raise ValueError("adapter_names= (a different adapter per row, HF PEFT's mixed-batch inference) is not "
                         "supported by pefttorch: run the rows of each adapter as their own batch after "
                         "set_adapter(name), or under disable_adapter() for the base model's rows")


# One PeftModel subclass per wrapped model class, whose forward shows that class's signature.
_CLASSES: dict[type, type] = {}


def _class_for(model_cls: type) -> type:
    if model_cls not in _CLASSES:
        @functools.wraps(model_cls.forward)
        def forward(self, *args, **kwargs):
            _refuse_mixed_batch(kwargs)
            return self.base_model.model(*args, **kwargs)

        forward.__doc__ = f"Calls the wrapped {model_cls.__name__}'s forward. " + (model_cls.forward.__doc__ or "")
        _CLASSES[model_cls] = type(f"PeftModelFor{model_cls.__name__}", (PeftModel,),
                                   {"forward": forward, "__module__": __name__, "__qualname__": "PeftModel"})
    return _CLASSES[model_cls]


# Pickling (torch.save of a whole model, deepcopy) cannot name the per-class subclasses: rebuild them. The state
# comes third, set after the object exists: inside the arguments, its references back to the model (the state dict
# hooks') made deepcopy build a second copy, which the first's hooks then pointed to, dead ("hook of a dead Module").
def _reduce(self):
    return (_rebuild, (type(self.base_model.model),), self.__dict__.copy())


def _rebuild(model_cls, state: dict | None = None):
    obj = PeftModel.__new__(_class_for(model_cls))
    if state is not None:  # pickled before the state came third
        obj.__dict__.update(state)
    return obj


PeftModel.__reduce__ = _reduce
