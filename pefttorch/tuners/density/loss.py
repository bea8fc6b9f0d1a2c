"""DEFT's density loss: hooks on every MLP activation that add ``weight * mean_layers(mean(a^2 / (a^2 + eps)))``
to the training loss and measure the activation density per layer.

Source: "From PEFT to DEFT: Parameter Efficient Finetuning for Reducing Activation Density in
Transformers" (Runwal, Pedapati, Chen, 2024). Named for what it computes, not "DEFT", which HF PEFT
uses for an unrelated method.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from ... import functional
from ...nn.reversible import in_reversible_forward
from .._config import module_names, plain_number
from .._hooked import guard_module_hooks
from .mlp import find_mlp_blocks


def output_loss(output) -> torch.Tensor | None:
    """The loss a model's output carries: an HF ModelOutput's (a dict), or the first item of its return_dict=False
    tuple, (loss, logits, ...) when given labels (logits are never 0-D); None if it has none."""
    if isinstance(output, dict):
        return output.get("loss")
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor) and output[0].dim() == 0:
        return output[0]
    return None


def with_loss(output, loss: torch.Tensor):
    """`output` (one output_loss found a loss in) carrying `loss` instead."""
    if isinstance(output, dict):
        output["loss"] = loss
        return output
    return (loss, *output[1:])


def counted_labels(model, labels: torch.Tensor, shift_labels) -> torch.Tensor:
    """The labels the HF Trainer counts into num_items_in_batch for this model: a causal LM's loss shifts them, so
    the Trainer counts ``labels[..., 1:]`` (or the collator's shift_labels); every other model's, all of them.
    Counting all of a causal LM's would weigh the term by L / (L - 1) of its share."""
    if isinstance(shift_labels, torch.Tensor):
        return shift_labels
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    except ImportError:  # a transformers without loss types: its Trainer counted every label
        return labels
    config = getattr(model, "config", None)
    shifts = LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss and not getattr(
        config, "is_encoder_decoder", False)
    return labels[..., 1:] if shifts else labels


@dataclass
class DensityLossConfig:
    """The density loss added to a model's training loss.

    Args:
        weight: coefficient of the loss term (the paper's code: 1.0).
        eps: smoothing of ``a^2 / (a^2 + eps)`` (the paper's code: 1e-7).
        threshold: |a| above which an activation counts as active in the reported density (default
            ``sqrt(eps)``, where an element's loss term is 1/2). Reporting only: the loss does not use it.
        target_modules: the activation modules to hook, as module names or a regular expression over the
            full names; None: the activation of every MLP block found (BERT/RoBERTa intermediate, T5's
            DenseReluDense, the gate of Llama-style gated MLPs, GPT-2, BART/Marian).
    """

    weight: float = 1.0
    eps: float = 1e-7
    threshold: float | None = None
    target_modules: list[str] | str | None = None

    def __post_init__(self) -> None:
        self.weight, self.eps = _as_float(self.weight), _as_float(self.eps)
        if not (isinstance(self.weight, float) and math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"DensityLossConfig: weight must be a finite number >= 0, got {self.weight!r}")
        if not (isinstance(self.eps, float) and math.isfinite(self.eps) and self.eps >= 1e-18):
            # below that, (a^2 + eps)^2 in the float32 gradient underflows
            raise ValueError(f"DensityLossConfig: eps must be a finite number >= 1e-18, got {self.eps!r}")
        if self.threshold is not None:
            self.threshold = _as_float(self.threshold)
            if not (isinstance(self.threshold, float) and self.threshold >= 0):
                raise ValueError(f"DensityLossConfig: threshold must be >= 0 or None, got {self.threshold!r}")
        self.target_modules = module_names(self.target_modules, "target_modules", "DensityLossConfig")

    @property
    def density_threshold(self) -> float:
        return functional.default_density_threshold(self.eps) if self.threshold is None else float(self.threshold)


def _as_float(value):
    """A number of any kind as a float (numpy's float32 was refused as "must be >= 0, got np.float32(0.1)"); anything
    else as it is, to be refused in words about it."""
    value = plain_number(value)
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _activation_modules(model: nn.Module, config: DensityLossConfig) -> dict[str, nn.Module]:
    if config.target_modules is None:
        found = {b.part_name(b.layout.act): b.activation for b in find_mlp_blocks(model)}
    else:
        spec = config.target_modules
        found = {n: m for n, m in model.named_modules(remove_duplicate=False)
                 if n and (re.fullmatch(spec, n) if isinstance(spec, str)
                           else any(n == k or n.endswith(f".{k}") for k in spec))}
        if not found:
            raise ValueError(f"DensityLossConfig.target_modules={spec!r} matched no module of {type(model).__name__}")
    shared = len({id(m) for m in found.values()}) < len(found)
    if shared:
        # one module object called by several layers: its hook could not tell the layers apart
        raise ValueError("several of the hooked activation modules are one shared object; give each layer its own")
    return found


def _check_not_attached(model: nn.Module) -> None:
    """A second density loss on a model (or on the model inside it, a PeftModel's) adds its term a second time."""
    if DensityLoss.attached_to(model) is not None:
        raise ValueError(f"{type(model).__name__} carries a density loss already, and a second would add its term "
                         "again: one per model. Remove the first to attach another: its handle's remove(), where the "
                         "handle is pefttorch.DensityLoss.attached_to(model) (a deep copy or a torch.load of a model "
                         "with a density loss carries a copy of it)")


class DensityLoss:
    """The hooks :func:`attach_density_loss` put on a model, and what they measured.

    ``loss()`` is the term to add to the training loss (done automatically when the model's output has a
    ``loss``, as HF models compute it from ``labels``). Densities are accumulated per layer and per mode
    (``"train"`` or ``"eval"``) on the device, without synchronising, until read with ``densities()``.
    """

    def __init__(self, model: nn.Module, config: DensityLossConfig) -> None:
        self.config = config
        _check_not_attached(model)
        self.modules = _activation_modules(model, config)
        guard_module_hooks()
        # per layer, (loss, elements) of each of its calls in this step's training calls: a module that runs several
        # times in one forward (BERT's chunked feed-forward, a layer shared across depths) is one layer
        self._losses: dict[str, list[tuple[torch.Tensor, int]]] = {}
        self._earlier: set[str] = set()  # the layers of _losses recorded before the call now running (see _begin_call)
        self._backward_seen = False  # whether a backward went through this step's activations (see _begin_call)
        self._step = 0  # counts the steps, so that a late backward through an earlier step's graph marks no other
        self._no_grad_layers: set[str] = set()  # layers that ran in training mode without grad (see loss())
        self._reversible = False  # whether they ran inside a reversible (MEFT) stack's forward
        self._sums: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
        self._counts: dict[str, dict[str, int]] = defaultdict(dict)
        self._root_grad = False  # whether the model's current call is a training forward with grad
        self._used = False  # whether this step's term went into a loss (see _begin_call)
        self._warned_unused = False
        self._share = None  # this call's share of the Trainer's accumulated batch (see _start)
        # Hooks are picklable objects (not closures), so models with the loss can be saved and deep-copied.
        self._handles = [m.register_forward_hook(_LayerHook(self, name)) for name, m in self.modules.items()]
        # The model's own call starts a fresh set of per-layer losses, and adds their term to its loss.
        self._handles.append(model.register_forward_pre_hook(self._start, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._add_to_output))
        self._handles.append(model.register_forward_hook(self._end, always_call=True))
        # So does the outermost call among the modules below the model that hold hooked layers, for a user who runs
        # the backbone (or model.forward, or an encoder-decoder's encoder alone) and adds loss() to a loss of their
        # own: the losses of every call of a layer are kept, and without a start of their own they piled up step
        # after step (a second backward through a freed graph). Every such module is hooked, since which of them the
        # user calls is not known (a PeftModel's tuner is never called: hooked alone, the backbone's calls piled up;
        # hooking only the modules holding all the layers missed an encoder called alone); only the outermost call
        # starts, since an inner one may run several times in one forward (ALBERT's shared layer, a chunked
        # feed-forward), and each call wiped the earlier ones.
        self._inner_depth = 0
        for ancestor in _callable_ancestors(model, list(self.modules)):
            self._handles.append(ancestor.register_forward_pre_hook(self._start_inner))
            self._handles.append(ancestor.register_forward_hook(self._end_inner, always_call=True))

    def __getstate__(self) -> dict:
        # the latest forward's losses carry its autograd graph: not part of a saved or copied model
        state = self.__dict__.copy()
        state.update(_losses={}, _no_grad_layers=set(), _reversible=False, _root_grad=False, _share=None,
                     _inner_depth=0, _earlier=set(), _backward_seen=False)
        return state

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        guard_module_hooks()  # a loaded (or copied) model's process may have torch's default still

    @staticmethod
    def attached_to(model: nn.Module) -> DensityLoss | None:
        """The density loss whose hooks are on `model` or on a module inside it (None: none is), e.g. the copy that
        a deep copy or a torch.load of a model with a density loss carries."""
        for module in model.modules():
            for hook in module._forward_hooks.values():
                if isinstance(hook, _LayerHook):
                    return hook.owner
        return None

    @property
    def layers(self) -> list[str]:
        return list(self.modules)

    def _record(self, name: str, module: nn.Module, output) -> None:
        if not isinstance(output, torch.Tensor):
            # every forward silently added nothing; the output's type shows only now (the MLP activations found by
            # default are tensors: this is target_modules naming something else)
            raise ValueError(f"the density loss hooks {name} ({type(module).__name__}), whose output is a "
                             f"{type(output).__name__}, not a tensor: DensityLossConfig.target_modules must name "
                             "activation modules (their output is the activations)")
        if output.numel() == 0:
            return
        loss, density = functional.density_loss(output, self.config.eps, self.config.density_threshold)
        if not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1:
            # Gradient checkpointing recomputes the forward inside backward: the op must run again (the
            # recomputation has to save what the forward saved) but was counted already. (A compiled model's
            # recomputation is in its backward graph and calls no hook; dynamo cannot trace the test itself.)
            return
        mode = "train" if module.training else "eval"
        if module.training and torch.is_grad_enabled():
            if name in self._earlier:
                self._drop_earlier()  # a layer of an earlier call runs again: that call was a step of its own
            self._losses.setdefault(name, []).append((loss, output.numel()))
            if output.requires_grad and not torch.compiler.is_compiling():
                output.register_hook(functools.partial(self._backward_through, self._step))
        elif module.training and self._root_grad:
            self._no_grad_layers.add(name)
            self._reversible = self._reversible or in_reversible_forward()
        if output.is_meta:
            # a shape-only dry run measures nothing; added in, its meta sum made every later sum meta, and
            # densities() failed on .item() for good
            return
        # weighted by the elements: the share over all of them, whatever the batch sizes (a short last eval batch
        # weighed as much as a full one)
        n = output.numel()
        sums = self._sums[mode]
        sums[name] = sums[name] + density * n if name in sums else density * n
        self._counts[mode][name] = self._counts[mode].get(name, 0) + n

    def _backward_through(self, step: int, grad):
        if step == self._step:
            self._backward_seen = True

    def _begin_call(self) -> None:
        """A training call of the model, or of a module below it holding hooked layers, begins. Its records join those
        of the step's earlier calls, so that the term covers every layer that ran for the step's graph: an encoder
        called on its own, whose outputs the model then takes (encoder_outputs=), and the model's call, which runs
        only the decoder. The step is over, and its records are dropped, once its term was taken (loss(), or the
        model's output took it) or a backward went through its activations, or when this call runs a layer of an
        earlier one again (see _record: a model that runs its encoder itself, the next forward of a loop)."""
        self._earlier = set(self._losses)
        if self._used or self._backward_seen:
            self._drop_earlier()

    def _drop_earlier(self) -> None:
        """Drops the records of the calls before the one now running (see _begin_call)."""
        if self._earlier and not self._used and self.config.weight and not self._warned_unused:
            # Their term went into no loss: the model's output had none to add it to (the HF Trainer computes the
            # loss itself under label_smoothing_factor or compute_loss_func) and nobody read loss(). Training then
            # silently ignores the density loss.
            self._warned_unused = True
            warnings.warn("the density loss term of the previous training forward was not added to any loss: the "
                          "model's output had no loss to add it to (the HF Trainer computes the loss itself with "
                          "label_smoothing_factor or compute_loss_func) and handle.loss() was not read. Add "
                          "handle.loss() to your loss (e.g. in a compute_loss_func)", UserWarning, stacklevel=2)
        self._losses = {name: calls for name, calls in self._losses.items() if name not in self._earlier}
        self._earlier = set()
        self._used = self._backward_seen = False
        self._step += 1

    def _start_inner(self, module, args):
        self._inner_depth += 1
        # (the model's own call began already; a recomputation in backward is no new call)
        if (self._inner_depth == 1 and not self._root_grad and module.training and torch.is_grad_enabled()
                and (torch.compiler.is_compiling() or torch._C._current_graph_task_id() == -1)):
            self._begin_call()

    def _end_inner(self, module, args, output):
        self._inner_depth -= 1  # (also when the forward raised: always_call)
        if (output is None and self._inner_depth == 0 and not self._root_grad and module.training
                and torch.is_grad_enabled()):
            self._fresh()  # a training call of the backbone that raised: as _end for the model's own call

    def _end(self, module, args, output):
        root_grad, self._root_grad = self._root_grad, False  # also when the forward raised: the next direct call
        if output is None and root_grad:                     # of the backbone starts afresh
            # a training forward that raised (a batch that ran out of memory, skipped): its partial losses went into
            # no loss, and kept, they held its graph and made the next good step warn of an unused term (which said
            # it once, and then never of a real one). A no-grad call that raised keeps the training forward's.
            self._fresh()

    def _fresh(self) -> None:
        self._losses = {}
        self._no_grad_layers = set()
        self._reversible = False
        self._earlier = set()
        self._used = self._backward_seen = False
        self._step += 1

    def _start(self, module, args, kwargs):
        self._root_grad = module.training and torch.is_grad_enabled()
        if not self._root_grad:
            return  # a no-grad call (evaluation, a reference pass) keeps the training forward's losses
        self._begin_call()
        # With the HF Trainer's loss kwargs the task loss is a sum over the micro-batch divided by the items
        # of the whole accumulated (and, across processes, gathered) batch, and the Trainer neither divides
        # by the accumulation steps nor averages over processes. Weigh the term by this micro-batch's share of
        # the items so that, summed like the task loss, it counts once per optimizer step. (It is the density
        # loss of the whole batch where the micro-batches' counted labels are in proportion to their tokens;
        # otherwise a weighted mean of the micro-batches' terms, as single-process gradient accumulation gives.)
        self._share = None
        total, labels = kwargs.get("num_items_in_batch"), kwargs.get("labels")
        if total is not None and isinstance(labels, torch.Tensor):
            self._share = counted_labels(module, labels, kwargs.get("shift_labels")).ne(-100).sum() / total

    def _check_complete(self) -> None:
        if self._no_grad_layers and self._reversible:
            # The same for MEFT's reversible layers, which run without a graph and are recomputed in backward.
            raise RuntimeError(
                f"the density loss cannot train {len(self._no_grad_layers)} hooked layer(s) inside MEFT's reversible "
                "stack: its forward keeps no autograd graph (backward recomputes the layers), so their term could not "
                "join the loss. Hook only layers outside the stack (MeftConfig(num_rev_layers=...) leaves the upper "
                "ones ordinary; DensityLossConfig(target_modules=...) picks them), or train with LoRA or adapters")
        if self._no_grad_layers:
            # Reentrant gradient checkpointing runs the layers under no_grad and recomputes them in backward,
            # too late for their term to join the loss: refuse rather than train on part of the loss.
            raise RuntimeError(
                f"the density loss saw {len(self._no_grad_layers)} hooked layer(s) run without grad inside a "
                "training forward with grad (reentrant gradient checkpointing?): use non-reentrant checkpointing, "
                "e.g. gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})")

    def _add_to_output(self, module, args, output):
        root_grad, self._root_grad = self._root_grad, False  # the call is over: layers called directly are not in it
        if not root_grad:
            return None
        self._check_complete()
        if not self._losses:
            return None
        task_loss = output_loss(output)
        if task_loss is None:
            return None
        term = self.loss()
        if self._share is not None:
            term = term * self._share.to(term.device)
        return with_loss(output, task_loss + term.to(task_loss.device, task_loss.dtype))

    def loss(self) -> torch.Tensor:
        """``weight * mean over layers of mean(a^2 / (a^2 + eps))`` of this step: the latest training forward (or
        call of a module holding hooked layers), with the earlier calls whose layers it did not run (an encoder called
        on its own for the model's encoder_outputs=) since a term was last taken or a backward went through them."""
        self._check_complete()
        if not self._losses:
            raise RuntimeError("no density loss recorded: run a forward pass in training mode with grad enabled")
        self._used = True
        losses = [_mean_over_calls(calls) for calls in self._losses.values()]
        device = losses[0].device  # layers may sit on several GPUs (device_map)
        return self.config.weight * torch.stack([v.to(device) for v in losses]).mean()

    def densities(self, mode: str = "train", reset: bool = True) -> dict[str, float]:
        """Activation density per hooked layer: the share of active elements over all of its calls in `mode` since
        the last reset."""
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        sums, counts = self._sums[mode], self._counts[mode]
        out = {name: (sums[name] / counts[name]).item() for name in self.modules if counts.get(name)}
        if reset:
            self.reset(mode)
        return out

    def mean_density(self, mode: str = "train", reset: bool = True) -> float:
        """The mean over layers of :meth:`densities` (NaN when nothing was measured)."""
        d = self.densities(mode, reset)
        return sum(d.values()) / len(d) if d else float("nan")

    def reset(self, mode: str | None = None) -> None:
        for m in ("train", "eval") if mode is None else (mode,):
            self._sums[m].clear()
            self._counts[m].clear()

    def remove(self) -> None:
        """Detaches the hooks; the model computes as before attach_density_loss."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._losses = {}

    @property
    def attached(self) -> bool:
        """Whether the hooks are on the model still (False once removed)."""
        return bool(self._handles)

    def callback(self):
        """A transformers ``TrainerCallback`` that adds the densities to the Trainer's logs."""
        from ...callbacks import DensityLossCallback

        return DensityLossCallback(self)

    def __repr__(self) -> str:
        return f"DensityLoss({len(self.modules)} layers, {self.config})"


def _callable_ancestors(model: nn.Module, names: list[str]) -> list[nn.Module]:
    """The modules below `model` that hold any of the modules `names` and may be called as they run (the backbone,
    an encoder-decoder's encoder and decoder), each down to the first ModuleList or ModuleDict of layers (not called
    itself; the layers below it are not hooked, since MEFT refuses hooks on the layers it computes itself)."""
    found = {}
    for name in names:
        path = name.split(".")[:-1]  # the module's parent, and its parents
        for depth in range(1, len(path) + 1):
            module = model.get_submodule(".".join(path[:depth]))
            if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
                break
            found[id(module)] = module
    return list(found.values())


def _mean_over_calls(calls: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """A layer's term over all its calls: the mean over all their elements, as one unchunked call would give."""
    if len(calls) == 1:
        return calls[0][0]
    total = sum(n for _, n in calls)
    return sum(loss * (n / total) for loss, n in calls)


class _LayerHook:
    """Forward hook of one activation module: records its loss and density in the owner."""

    def __init__(self, owner: DensityLoss, name: str) -> None:
        self.owner, self.name = owner, name

    def __call__(self, module, inputs, output):
        self.owner._record(self.name, module, output)


def attach_density_loss(model: nn.Module, config: DensityLossConfig | None = None) -> DensityLoss:
    """Hooks the MLP activations of `model` (or ``config.target_modules``) for the density loss.

    In training mode the term is added to ``output.loss`` whenever the model's output carries a loss (HF
    models given ``labels``, so the HF ``Trainer`` needs no change); otherwise add ``handle.loss()`` to
    your loss. Densities are measured in training and evaluation alike. ``handle.remove()`` detaches.
    """
    return DensityLoss(model, config or DensityLossConfig())


