"""IncreLoRA and AdaLoRA models: LoRA layers of variable rank, their allocator, the orthogonality
regulariser, and export as a plain LoRA adapter with the final ranks (loadable by HF PEFT)."""

from __future__ import annotations

import io
import math
import warnings
from collections import Counter

import torch
from torch import nn

from ..density.loss import counted_labels, output_loss, with_loss
from ..lora.config import LoraConfig
from ..lora.model import LoraModel, Target, plan_targets
from .allocator import AdaLoraAllocator, IncreLoraAllocator, refuse_sharded, saved_order
from .config import AdaLoraConfig, IncreLoraConfig
from .layer import RankedLoraLayer, _to_device

RankConfig = IncreLoraConfig | AdaLoraConfig


class RankedLoraModel(LoraModel):
    """A model whose targeted linear layers carry one IncreLoRA or AdaLoRA adapter.

    Call :meth:`update_and_allocate` once per optimizer step, after ``optimizer.step()`` and before
    ``zero_grad()`` (or add :class:`RankAllocationCallback` to an HF Trainer), and train with
    :class:`pefttorch.optim.RankAwareAdamW` so optimizer state follows the components.
    """

    layer_cls = RankedLoraLayer

    def __init__(self, model: nn.Module, config: RankConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True) -> None:
        super().__init__(model, config, adapter_name, autocast_adapter_dtype)
        # the orthogonality term's masks (see _orth_masks); made here, since torch.compile cannot trace creating it
        self._orth_mask_cache: dict = {}
        layers = self.lora_layers()
        allocator_cls = IncreLoraAllocator if isinstance(config, IncreLoraConfig) else AdaLoraAllocator
        try:
            self.allocator = allocator_cls(layers, adapter_name, config)
        except BaseException:  # refused (a model split over devices): the model given back as it came
            LoraModel.unload(self, merge=False)
            raise
        self._orth_hook = self.model.register_forward_hook(_OrthRegHook(self), with_kwargs=True)
        self.register_load_state_dict_pre_hook(_check_allocator_state)
        self.register_load_state_dict_post_hook(_load_allocator_state)

    # The allocator's state (statistics, history, sampling) goes into the model's state dict, so that a checkpoint,
    # the HF Trainer's included, resumes the schedule where it was rather than from fresh statistics. It travels as
    # bytes in a uint8 tensor: the Trainer writes checkpoints with safetensors, which holds only tensors.
    def get_extra_state(self) -> torch.Tensor:
        buffer = io.BytesIO()
        torch.save(self.allocator.state_dict(), buffer)
        return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor) -> None:
        # applied by _load_allocator_state, once the layers have loaded their ranks (children load after this)
        self._pending_allocator_state = state.cpu().numpy().tobytes()

    def inject_adapter(self, config: RankConfig, adapter_name: str, then=None) -> None:
        if self.peft_config:
            raise ValueError(f"a model with {type(config).__name__[:-6]} holds one adapter; it has "
                             f"{list(self.peft_config)} already")
        if not isinstance(config, (IncreLoraConfig, AdaLoraConfig)):
            raise TypeError(f"expected an IncreLoraConfig or AdaLoraConfig, got {type(config).__name__}")
        n = len(plan_targets(self.model, config))  # raises, listing the candidates, when nothing matches
        if isinstance(config, IncreLoraConfig) and config.top_h > n:
            raise ValueError(f"IncreLoraConfig: top_h={config.top_h} is larger than the number of adapted modules "
                             f"({n})")
        super().inject_adapter(config, adapter_name, then)

    def add_to_layer(self, layer: RankedLoraLayer, target: Target, config: RankConfig, adapter_name: str,
                     dtype: torch.dtype) -> None:
        if isinstance(config, IncreLoraConfig):
            reserve = config.incre_rank_num if config.advance_learning else 0
            headroom = config.target_rank if config.max_rank_per_module is None else config.max_rank_per_module
            layer.update_layer(adapter_name, capacity=max(config.init_rank + reserve, headroom + reserve),
                               rank=config.init_rank, reserve=reserve, lora_alpha=target.alpha,
                               lora_dropout=config.lora_dropout, scale_by_rank=True,
                               warmup=config.new_rank_warmup, dtype=dtype)
        else:
            layer.update_layer(adapter_name, capacity=config.init_r, rank=config.init_r, reserve=0,
                               lora_alpha=target.alpha, lora_dropout=config.lora_dropout, scale_by_rank=False,
                               dtype=dtype)

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        # plain pickle (multiprocessing, joblib, Ray) copies each view of the allocator's buffers into a storage of
        # its own: backward then wrote one copy and scoring read another. The views are made again here, after the
        # allocator and the layers are back (a deep copy or torch.load kept them views; remaking them changes nothing)
        allocator = self.__dict__.get("allocator")
        if allocator is not None:
            allocator.restore_views()

    def _apply(self, fn, *args, **kwargs):
        # model.to(device) after get_peft_model: the allocator's statistics and tiles follow the adapters
        out = super()._apply(fn, *args, **kwargs)
        if hasattr(self, "allocator"):
            self.allocator.follow_device()
        return out

    # ------------------------------------------------------------------ training

    def update_and_allocate(self, global_step: int, loss_scale: float | torch.Tensor | None = None
                            ) -> dict[str, int] | None:
        """One call per optimizer step, after ``optimizer.step()`` and before ``zero_grad()``: updates the
        importance scores and, on the schedule's steps, grows (IncreLoRA) or prunes (AdaLoRA) ranks. Returns
        {module: new rank} for the modules whose rank changed at this step, else None.

        With ``torch.amp.GradScaler``, pass `loss_scale`: the scale this step's backward ran with,
        ``scaler.get_scale()`` read before ``scaler.update()``. IncreLoRA scores from the backward itself, so its
        scores are otherwise the loss scale times too large, and as the scaler halves and doubles the scale the
        running statistics favour some steps over others: other modules grow. (AdaLoRA reads the gradients
        ``scaler.step`` has unscaled and ignores it.) :class:`RankAllocationCallback` passes it for the Trainer.

        Steps must increase: a second call for the same step (once per micro-batch under gradient accumulation) is
        ignored with a warning (it scored the same gradients again and, in IncreLoRA, allocated again), and a step
        before the last one is an error (a loop restarting its count, each epoch say, would replay the schedule)."""
        step, last = int(global_step), self.allocator.last_step
        if last is not None and step <= last:
            if step < last:
                raise ValueError(f"update_and_allocate({step}) after step {last}: steps only go forward. Pass the "
                                 f"optimizer's step count (not a per-epoch index); to go on from an earlier step, load "
                                 f"the model's state dict of that step")
            warnings.warn(f"update_and_allocate({step}) was called for step {step} already: ignored. Call it once per "
                          f"optimizer step, after optimizer.step() (under gradient accumulation, not per micro-batch)",
                          stacklevel=2)
            return None
        if loss_scale is not None and not (float(loss_scale) > 0 and math.isfinite(float(loss_scale))):
            raise ValueError(f"update_and_allocate: loss_scale must be positive and finite, got {loss_scale}")
        merged = [path for path, layer in self.allocator.layers if layer.merged]
        if merged:
            # no gradient reaches merged factors: IncreLoRA grew ranks from nothing, AdaLoRA blamed the call order
            raise RuntimeError(f"update_and_allocate({step}): the adapter is merged into the weights at {merged[:3]}"
                               f"{' ...' if len(merged) > 3 else ''} (merge_adapter()), so training does not reach "
                               "its factors: call unmerge_adapter() before training on")
        changed = self.allocator.update_and_allocate(step, loss_scale)
        self.allocator.last_step = step
        return changed

    def rank_pattern(self) -> dict[str, int]:
        """The rank in use of every adapted module (reserve components not counted)."""
        name = self.active_adapters[0]
        return {path: layer.lora_components[name].rank for path, layer in self.lora_layers()}

    def idle_parameters(self, trainable_only: bool = False) -> int:
        """Entries of the factors' storage that do not train now (spare capacity, and reserve e); with
        `trainable_only`, of the storage that requires grad (a frozen adapter's is not counted as trainable)."""
        name = self.active_adapters[0]
        idle = 0
        for _, layer in self.lora_layers():
            c = layer.lora_components[name]
            for kind, p in zip(("A", "E", "B_t"), layer.factors(name), strict=True):
                if p.requires_grad or not trainable_only:
                    idle += (c.capacity - c.trainable(kind)) * p.shape[1]
        return idle

    def orth_regularization(self) -> torch.Tensor:
        """The mean of ``||A A^T - I||_F`` and ``||B^T B - I||_F`` over the factors, one term per factor: the A and
        the B of every module with components in use, of those components (as HF PEFT's AdaLoRA: half the mean over
        the modules of their sum). The term the paper adds to the loss, times orth_reg_weight.

        It runs in every training forward, so it is built for few kernels and little host work: factors of one
        storage shape are stacked and handled by one batched product, the rows beyond each module's components
        zeroed and its identity cut to them by a mask that is cached until the ranks change (allocation events
        are rare), so a step issues five kernels per storage shape and its backward about as many."""
        name = self.active_adapters[0]
        if not torch.compiler.is_compiling():  # sharded factors failed in the stack below: the refusal comes first
            refuse_sharded(self.allocator.layers, self.allocator.adapter, self.allocator.method)
        groups: dict[tuple, tuple[list[torch.Tensor], list[int]]] = {}
        for _, layer in self.allocator.layers:  # the ranked layers, listed once (not a walk of the model per step)
            n = layer.lora_components[name].in_use
            if n == 0:
                continue
            a, _, b_t = layer.factors(name)
            for f in (a, b_t):
                factors, used = groups.setdefault((f.shape, f.device, f.dtype), ([], []))
                factors.append(f)
                used.append(n)
        terms = []
        for (shape, device, dtype), (factors, used) in groups.items():
            rows, eye = self._orth_masks(shape[0], tuple(used), device, dtype)
            stack = torch.stack(factors).mul_(rows)  # (modules, capacity, features), unused rows zeroed
            gram = torch.bmm(stack, stack.transpose(1, 2))
            terms.append(torch.linalg.vector_norm(gram - eye, dim=(1, 2)))
        if not terms:
            return torch.zeros(())
        return torch.cat([t.to(terms[0].device) for t in terms]).mean()

    def _orth_masks(self, capacity: int, used: tuple[int, ...], device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, identity) for a stack of factors with `used` components each: rows (modules, capacity, 1) is 1
        on the components in use, identity (modules, capacity, capacity) the identity cut to them. Kept until
        the ranks change; built without a host synchronisation (see _to_device)."""
        key = (capacity, used, device, dtype)
        cache = self._orth_mask_cache
        if key not in cache:
            if len(cache) > 64:  # ranks moved on: the masks of earlier ranks are not coming back
                cache.clear()
            n = _to_device(list(used), device)
            rows = (torch.arange(capacity, device=device) < n[:, None]).to(dtype)
            cache[key] = (rows[..., None], torch.diag_embed(rows))
        return cache[key]

    # ------------------------------------------------------------------ saving: a plain LoRA

    def lora_factors(self, layer: RankedLoraLayer, name: str):
        """A = diag(e) A and B of the active components, with the scaling difference folded into B so that HF
        PEFT's lora_alpha / r gives the same update; (None, None) for a module of rank 0."""
        c = layer.lora_components[name]
        if c.rank == 0:
            return None, None
        a, e, b_t = (t[:c.rank].detach() for t in layer.factors(name))
        fold = c.scaling * c.rank / self.peft_config[name].lora_alpha
        return e * a, b_t.t() * fold

    def export_adapter(self, name: str) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
        """A LoraConfig with the final ranks (``r`` the most common, ``rank_pattern`` the others; the modules of
        rank 0 left out) and the tensors of the components in use: HF PEFT loads it as a plain LoRA."""
        config = self.peft_config[name]
        ranks = {path: r for path, r in self.rank_pattern().items() if r > 0}
        if not ranks:
            raise ValueError("every module has rank 0: there is no adapter left to save")
        common = Counter(ranks.values()).most_common(1)[0][0]
        lora = LoraConfig(
            r=common, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=sorted(ranks), bias=config.bias, modules_to_save=config.modules_to_save,
            rank_pattern={path: r for path, r in ranks.items() if r != common},
            fan_in_fan_out=config.fan_in_fan_out, task_type=config.task_type,
            base_model_name_or_path=config.base_model_name_or_path, revision=config.revision,
            inference_mode=True,
        )
        return lora, self.adapter_state_dict(name)

    def unload(self, merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        model = super().unload(merge, adapter_names)
        self._orth_hook.remove()  # after: a refused merge leaves the orthogonality term in the loss
        return model


def _check_allocator_state(model: RankedLoraModel, state_dict: dict, prefix: str, *_) -> None:
    state = state_dict.get(prefix + "_extra_state")
    model._missing_allocator_state = None if state is not None else prefix
    if state is not None:
        # another method's allocator state, or one of other modules, is refused here, before the layers below load
        # anything (they load after this hook; the state itself is applied once they have, see _load_allocator_state)
        saved_order(_decoded(state.cpu().numpy().tobytes(), "cpu"), model.allocator.method, model.allocator.layers)


def _load_allocator_state(model: RankedLoraModel, incompatible_keys) -> None:
    prefix = model.__dict__.pop("_missing_allocator_state", None)
    missing = [] if prefix is None else [k for k in incompatible_keys.missing_keys if k.startswith(prefix)]
    if prefix is not None and missing == [prefix + "_extra_state"]:
        # A checkpoint from before the allocator's state was saved (every other key of the model there): the weights
        # and ranks load, the allocator keeps the statistics and schedule it has (a newly built model's: fresh ones,
        # as a resume did then). A partial load (the adapter factors alone into a live model, strict=False; the hook
        # cannot see strict) lacks other keys too and gets the key reported missing like any other.
        incompatible_keys.missing_keys.remove(missing[0])
        warnings.warn(f"{type(model.allocator).__name__}: the state dict has no allocator state ({missing[0]}; a "
                      "checkpoint saved before pefttorch kept it): the ranks and weights load, the allocator keeps "
                      "its own importance statistics and schedule (fresh ones in a newly built model)", stacklevel=2)
    # where the factors are now: a load with assign=True puts a model built on the meta device on a real one (also
    # from a checkpoint without allocator state, whose fresh statistics would stay on meta)
    model.allocator.follow_device()
    state = model.__dict__.pop("_pending_allocator_state", None)
    if state is not None:
        device = model.lora_layers()[0][1].lora_A[model.active_adapters[0]].device
        model.allocator.load_state_dict(_decoded(state, device))


def _decoded(state: bytes, device) -> dict:
    """An allocator's state from the bytes get_extra_state wrote."""
    return torch.load(io.BytesIO(state), map_location=device, weights_only=True)


def _distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _reentrant_checkpointing(model: nn.Module) -> bool:
    """Whether transformers' gradient checkpointing is on somewhere in `model` with reentrant checkpoints (torch's
    default where use_reentrant is not given)."""
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False) is True:
            keywords = getattr(getattr(m, "_gradient_checkpointing_func", None), "keywords", None) or {}
            if keywords.get("use_reentrant", True):
                return True
    return False


class _OrthRegHook:
    """Adds ``orth_reg_weight * orth_regularization()`` to the wrapped model's ``loss`` in training mode (as HF
    PEFT's AdaLoRA does), whenever the output carries one."""

    def __init__(self, owner: RankedLoraModel) -> None:
        self.owner = owner

    def __call__(self, module, args, kwargs, output):
        owner = self.owner
        weight = owner.peft_config[owner.active_adapters[0]].orth_reg_weight
        loss = output_loss(output)  # (a return_dict=False tuple's too: the term was left out of it, without a word)
        if not module.training or weight == 0 or not torch.is_grad_enabled():
            return None
        # disabled or merged: the factors are out of the forward, and the term alone trained them (a merged
        # factor's change then came out of the weight at unmerge as a different update: the base weight was lost)
        if any(layer.disable_adapters or layer.merged for _, layer in owner.allocator.layers):
            return None
        if loss is None:
            if isinstance(output, (dict, tuple)) and not getattr(self, "warned", False):  # (a tensor: its user's loss)
                # the HF Trainer computes the loss itself under label_smoothing_factor or compute_loss_func: the term
                # had nothing to join, and training would go on without it without a word
                self.warned = True
                warnings.warn("orth_reg_weight > 0 but the model's output has no loss to add the orthogonality term "
                              "to (the HF Trainer computes the loss itself with label_smoothing_factor or "
                              "compute_loss_func): add orth_reg_weight * model.orth_regularization() to your loss "
                              "(if it has it already, this warning can be ignored)", UserWarning, stacklevel=2)
            return None
        if not getattr(self, "warned_reentrant", False) and _distributed() and _reentrant_checkpointing(module):
            # the term reads every factor outside the checkpointed layers, whose reentrant backward reads them again:
            # two gradients for one parameter in one backward, which DDP refuses with "marked ready twice" (unless
            # static_graph=True, which AdaLoRA's pruning then breaks): said once, with the remedy, before DDP's
            # words (a warning, not an error: this process cannot see the DDP wrapper or its static_graph)
            self.warned_reentrant = True
            warnings.warn("orth_reg_weight > 0 with reentrant gradient checkpointing under DistributedDataParallel "
                          "fails with 'marked as ready twice' (AdaLoRA also with static_graph=True once it prunes): "
                          "use non-reentrant checkpointing (gradient_checkpointing_enable(gradient_checkpointing_"
                          "kwargs={'use_reentrant': False}), transformers' default), or orth_reg_weight=0",
                          UserWarning, stacklevel=2)
        # With the HF Trainer's loss kwargs the micro-batches' losses are summed over the accumulated batch (each is
        # divided by the whole batch's item count): weigh the term by this micro-batch's share of the items, so it
        # counts once per optimizer step however the batch is split (as the density loss does).
        total, labels = kwargs.get("num_items_in_batch"), kwargs.get("labels")
        if total is not None and isinstance(labels, torch.Tensor):
            weight = weight * (counted_labels(module, labels, kwargs.get("shift_labels")).ne(-100).sum() / total)
        return with_loss(output, loss + weight * owner.orth_regularization().to(loss.device, loss.dtype))
