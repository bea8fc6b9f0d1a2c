"""HookedModel: the base of the methods that leave the base model's modules where they are.

Bottleneck adapters, (IA)^3, SSF, BitFit and LayerNorm tuning change what some modules compute through forward
hooks (or by swapping a few parameters), so the base model's own state-dict keys do not change and unloading
gives back exactly the model that came in. Such a model holds one adapter set; what they share lives here:
attribute forwarding to the wrapped model, modules_to_save, trainability, hooks, disabling and unloading.
"""

from __future__ import annotations

import logging
import re
from collections import Counter

import torch
from torch import nn

from ._forwarding import Forwarding
from .lora.layer import ModulesToSaveWrapper, is_linear
from .lora.model import (
    ALL_LINEAR,
    _in_modules_to_save,
    _layer_index,
    _matches,
    _set_submodule,
    check_modules_to_save,
    module_names,
    saves_module,
    warn_of_uncalled,
)

logger = logging.getLogger("pefttorch")


def guard_module_hooks() -> None:
    """Makes torch.compile guard its graphs on module hooks, which these methods (and the density loss) are made of.
    By default it does not (torch._dynamo.config.skip_nnmodule_hook_guards): a graph compiled before the hooks were
    added (the base model compiled in place and run once, or an earlier model of the same class in a sweep) was
    reused, and the adapter or the loss term left out in silence. Graphs compiled before, without those guards, are
    dropped (they recompile on their next call)."""
    config = torch._dynamo.config
    if getattr(config, "skip_nnmodule_hook_guards", False):  # (an option a later torch may drop)
        logger.info("pefttorch: torch.compile now guards on module hooks (pefttorch's hooked methods and the density "
                    "loss are hooks; torch._dynamo.config.skip_nnmodule_hook_guards=False), and its compiled graphs "
                    "were reset")
        config.skip_nnmodule_hook_guards = False
        torch.compiler.reset()


class HookedModel(Forwarding):
    """One adapter set on `model`. Subclasses build their parameters, then call :meth:`finish`; they list
    their trainable parameters in :meth:`adapter_parameters` and their saved tensors in :meth:`own_tensors`."""

    method = "this method"  # for error messages, e.g. "bottleneck adapters"
    key_prefix = "base_model.model."  # of modules_to_save keys in saved files (HF PEFT's)

    def __init__(self, model: nn.Module, config, adapter_name: str) -> None:
        super().__init__()
        self.model = model
        # unload() gives the model back as it came, trainability included
        self._remember_trainability(model)
        self.peft_config = {adapter_name: config}
        self.active_adapters = [adapter_name]
        self.disabled = False
        self._handles: list = []
        check_modules_to_save(model, getattr(config, "modules_to_save", None))

    def finish(self) -> None:
        """Wraps modules_to_save and marks what trains; call once the method's own parameters exist."""
        config = self.method_config
        name = self.active_adapters[0]
        inside: tuple[str, ...] = ()  # wrapped subtrees: the copy trains whole (a wrapper inside was never called)
        # under every name (HF PEFT's walk): a module registered twice is wrapped where the matched name reaches it
        for path in module_names(self.model):
            if not path or path.startswith(inside):
                continue
            module = self.model.get_submodule(path)  # as it is now: wrapped already through a shared parent, maybe
            if isinstance(module, ModulesToSaveWrapper):
                inside += (path + ".",)
            elif saves_module(path, config.modules_to_save):
                _set_submodule(self.model, path, ModulesToSaveWrapper(module, name))
                inside += (path + ".",)
        self._mark_trainable()

    # Not `config`: that name is the wrapped model's transformers config, which the HF Trainer reads through the
    # PeftModel (pad_token_id for generation, problem_type, use_cache); this property stood in front of it.
    @property
    def method_config(self):
        return self.peft_config[self.active_adapters[0]]

    def hook(self, handle) -> None:
        """Keeps a hook's handle, removed by unload()."""
        guard_module_hooks()
        self._handles.append(handle)

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        if self._handles:  # (BitFit and LayerNorm tuning swap parameters: no hooks to guard)
            guard_module_hooks()  # a loaded (or copied) model's process may have torch's default still

    def _wrappers(self):
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, ModulesToSaveWrapper)]

    # ------------------------------------------------------------------ what subclasses provide

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The method's trainable parameters (modules_to_save excluded)."""
        raise NotImplementedError

    def own_tensors(self) -> dict[str, torch.Tensor]:
        """The method's tensors as saved, by key (modules_to_save excluded); they share storage with the
        parameters, so loading copies into them."""
        raise NotImplementedError

    def on_disabled(self, disabled: bool) -> None:
        """Called when the adapter is switched off (disable_adapter) or on again."""

    def restore(self, merge: bool) -> None:
        """Called by unload() after the hooks are gone: undo (or, with `merge`, keep) any change the method made
        to the base model's own modules (merging itself is done by merge_adapter before)."""

    # ------------------------------------------------------------------ PeftModel's adapter management

    def _mark_trainable(self) -> None:
        self.requires_grad_(False)  # the model and anything a method keeps aside
        trainable = not self.method_config.inference_mode
        for p in self.adapter_parameters():
            p.requires_grad_(trainable)
        for _, wrapper in self._wrappers():
            wrapper.modules_to_save.requires_grad_(trainable)

    def inject_adapter(self, config, adapter_name: str, then=None) -> None:
        raise ValueError(f"a model with {self.method} holds one adapter set")

    def set_adapter(self, names) -> None:
        names = [names] if isinstance(names, str) else list(names)
        if names != self.active_adapters:
            raise ValueError(f"unknown adapter(s) {names}; adapters are: {self.active_adapters}")

    def delete_adapter(self, name: str) -> None:
        raise ValueError(f"{self.method} cannot be deleted one by one; use unload()")

    def set_adapters_disabled(self, disabled: bool) -> None:
        previous, self.disabled = self.disabled, disabled
        try:
            self.on_disabled(disabled)
        except BaseException:
            self.disabled = previous  # a switch that failed (e.g. an unmerge refused) leaves the adapter as it was
            raise
        for _, wrapper in self._wrappers():
            wrapper.disable_adapters = disabled

    def merge_adapter(self, adapter_names=None, safe_merge: bool = False) -> None:
        raise ValueError(f"{self.method} cannot be merged into the base weights; use unload() to remove them")

    def unmerge_adapter(self) -> None:
        return None

    def unload(self, merge: bool = False) -> nn.Module:
        """The base model without the method's hooks: with `merge`, what the adapter learned folded into its
        weights (where the algebra allows, else an error and nothing changed) and the modules in modules_to_save
        the trained copies; otherwise exactly as it came (the originals: HF PEFT 0.22's rule too)."""
        if merge:
            self.merge_adapter()  # raises before anything is removed where merging is impossible
        for h in self._handles:
            h.remove()
        self._handles = []
        self.restore(merge)
        for path, wrapper in self._wrappers():
            _set_submodule(self.model, path, wrapper.active_module() if merge else wrapper.original_module)
        self._restore_trainability(self.model)
        return self.model

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        out = dict(self.own_tensors())
        for path, wrapper in self._wrappers():
            for key, value in wrapper.modules_to_save[name].state_dict().items():
                out[f"{self.key_prefix}{path}.{key}"] = value
        return {k: v.detach() for k, v in out.items()}

    def export_adapter(self, name: str):
        return self.peft_config[name], self.adapter_state_dict(name)


def find_modules(model: nn.Module, spec, config, accept, what: str) -> list[tuple[str, nn.Module]]:
    """Modules that `spec` (names, a regex, "all-linear", or None: every module `accept`s) selects in `model`,
    minus exclude_modules, modules outside layers_to_transform and modules_to_save; each must satisfy `accept`.
    Raises naming what could have matched."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found, rejected, candidates = [], [], Counter()
    inside: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if not name or name.startswith(inside):
            continue
        if isinstance(module, ModulesToSaveWrapper):
            inside += (name + ".",)
            continue
        if accept(module):
            candidates[name.rsplit(".", 1)[-1]] += 1
        if spec is None:
            matched = accept(module)
        else:
            matched = (is_linear(module) and module is not head) if spec == ALL_LINEAR else _matches(spec, name)
        if (not matched or (config.exclude_modules and _matches(config.exclude_modules, name))
                or _in_modules_to_save(name, config.modules_to_save)
                or (config.layers_to_transform and _layer_index(name, None) not in config.layers_to_transform)):
            continue
        if not accept(module):
            rejected.append(f"{name} ({type(module).__name__})")
            continue
        found.append((name, module))
    if rejected:
        raise ValueError(f"{type(config).__name__} adapts {what}; these matched modules are not: "
                         + ", ".join(rejected[:10]) + (" ..." if len(rejected) > 10 else ""))
    if not found:
        available = ", ".join(f"{n} (x{c})" if c > 1 else n for n, c in sorted(candidates.items()))
        raise ValueError(f"target_modules={spec!r} matched none of the {what} of {type(model).__name__}"
                         + (f" (layers_to_transform={config.layers_to_transform!r})"
                            if config.layers_to_transform else "")
                         + f"; available to match: {available or 'none'}")
    warn_of_uncalled(model, found, type(config).__name__)
    return found


def refuse_shared_modules(model: nn.Module, found, method: str) -> None:
    """Refuses a found module registered in more than one place (``self.again = self.shared``; not one inside a
    shared parent, reached through it alone). HF PEFT puts its layer in the place its name reaches, and the model's
    call through the other place runs the plain module; this method acts on the module object, so on every call
    through it: the same adapter file gave other outputs here than in HF PEFT. `found`: (path, module) pairs."""
    places: dict[int, set[tuple[int, str]]] = {}
    for parent in model.modules():
        for attr, child in parent._modules.items():
            if child is not None:
                places.setdefault(id(child), set()).add((id(parent), attr))
    shared = [(path, m) for path, m in found if len(places.get(id(m), ())) > 1]
    if shared:
        path, module = shared[0]
        names = [n for n, m in model.named_modules(remove_duplicate=False) if m is module]
        raise ValueError(f"{method}: {path} is one module registered under more than one name ({', '.join(names)}); "
                         f"{method} act on the module, so on the model's call through each name, while HF PEFT's, "
                         f"on the one its name reaches only (the same adapter would compute otherwise there). "
                         f"Leave it out (exclude_modules=[{path!r}]) or give each use its own module")


def exact_regex(paths) -> str | None:
    """A regex that matches exactly these module paths (for saved configs that must pick the same modules)."""
    return "|".join(re.escape(p) for p in paths) if paths else None
