"""LoRA layers whose rank changes during training (IncreLoRA grows it, AdaLoRA prunes it).

Each adapter is a sum of rank-1 components ``b_k e_k a_k`` (an SVD-like form: E holds the "singular
values"), stored component-major with spare capacity, so a change of rank moves no memory:

    lora_A[name]    (capacity, in)    rows a_k
    lora_E[name]    (capacity, 1)     e_k
    lora_B_t[name]  (capacity, out)   rows b_k (B transposed: every factor indexes components on dim 0)

Slots ``[0, rank)`` are the active components, ``[rank, rank + reserve)`` IncreLoRA's reserve (A and B
train, e stays fixed at a small value until the component is activated: "advance learning"), and the
rest unused. The forward hands only the first ``rank + reserve`` components to the fused LoRA kernel,
so compute follows the rank in use, not the capacity.

Every slot carries an id that changes whenever its component is replaced or moved, so an optimizer (see
:class:`pefttorch.optim.RankAwareAdamW`) can keep per-component state right across growth, pruning and
reordering without being told about each event.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ... import functional, ops
from ...reference import opmath_dtype
from ..lora.layer import LoraLayer, calls_only_linear, dropout_p

# dim 0 of each factor indexes components; kinds name the factor for the optimizer
KINDS = ("A", "E", "B_t")


def _normal_like(t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """N(0, 1) values shaped like t, drawn from a CPU generator (the global one by default) whatever t's device: a
    run then allocates the same components on a GPU as on the CPU (CUDA's generator draws other numbers). A few
    small tensors per event."""
    return torch.randn(t.shape, dtype=t.dtype, generator=generator, device="cpu").to(t.device)


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """A small integer tensor on `device`, without a host synchronisation: torch.tensor(..., device="cuda") copies
    from pageable memory and waits for the stream, which on a GPU stalled every training step here (the
    regulariser runs in each forward; the optimizer moves state on allocation events)."""
    t = torch.tensor(values, device="cpu")  # on the CPU whatever torch's default device
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)  # the caching host allocator keeps it until copied


# Factors whose storage was replaced by one of another size (grow(), _shrink_for_load()). A stock optimizer's state
# for them keeps the old shape: torch.optim.AdamW then fails on the shapes, its fused variant writes out of bounds.
# Keyed by id: a WeakSet would compare two references to one tensor with the tensor's elementwise ==.
_resized: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_fit_hook = None


def _note_resized(p: nn.Parameter) -> None:
    global _fit_hook
    _resized[id(p)] = p
    if _fit_hook is None:  # registered once, by the first resize: until then no optimizer pays for the check
        _fit_hook = register_optimizer_step_pre_hook(_fit_optimizer_state)


# Adafactor's factored second moments (transformers' and torch's): a factor per row, which follows the rows, and one
# per column, which does not. Everything else per entry has the factor's own shape.
_ROW_FACTORS = ("exp_avg_sq_row", "row_var")
_COLUMN_FACTORS = ("exp_avg_sq_col", "col_var")


def _fresh_value(optimizer: torch.optim.Optimizer, p: nn.Parameter, key: str) -> float:
    """What `optimizer` starts a new entry's state `key` at: zero but for Rprop's step size (lr) and Adagrad's sum
    (initial_accumulator_value)."""
    group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
    if key == "step_size" and isinstance(optimizer, torch.optim.Rprop):
        return float(group["lr"])
    if key == "sum" and isinstance(optimizer, torch.optim.Adagrad):
        return float(group["initial_accumulator_value"])
    return 0.0


def _fit_optimizer_state(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Before any optimizer's step: its per-entry state of a resized factor (moments, momentum buffers, Adafactor's
    row factors) is cut or extended along the component dimension to the factor's rows, the new rows at the state
    the optimizer starts an entry with (their components have not trained). The rest keeps what it had (the stale
    moments README mentions: only :class:`pefttorch.optim.RankAwareAdamW`, which matches its state by component
    id and is skipped here, gets the components right). A state of another layout is refused by name: guessed, it
    would train the new components wrong, or crash, or (fused AdamW, unresized) write out of bounds."""
    from ...optim import RankAwareAdamW

    if isinstance(optimizer, RankAwareAdamW):
        return
    for p in list(_resized.values()):
        state = optimizer.state.get(p)  # not state[p]: the defaultdict would add an entry
        if not state:
            continue
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0 or key in _COLUMN_FACTORS \
                    or value.shape[0] == p.shape[0]:
                continue
            if value.shape[1:] != p.shape[1:] and key not in _ROW_FACTORS:
                raise RuntimeError(
                    f"{type(optimizer).__name__} keeps state {key!r} of shape {tuple(value.shape)} for a factor "
                    f"IncreLoRA resized to {tuple(p.shape)}, a layout pefttorch does not know how to resize: train "
                    f"with pefttorch.optim.RankAwareAdamW, or set IncreLoraConfig(max_rank_per_module=...) so that "
                    f"the storage is allocated up front")
            fitted = value.new_full((p.shape[0], *value.shape[1:]), _fresh_value(optimizer, p, key))
            n = min(value.shape[0], p.shape[0])
            fitted[:n] = value[:n]
            state[key] = fitted


class Components(nn.Module):
    """Bookkeeping of one adapter's components in one layer: how many are active and in reserve, their ids,
    and the importance tile collected in backward (IncreLoRA). Plain Python state, saved in the state dict
    as one int64 tensor (``_extra_state``) so checkpoints restore the ranks."""

    def __init__(self, capacity: int, rank: int, reserve: int, scaling_alpha: float, scale_by_rank: bool,
                 fixed_rank: int | None, warmup: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.rank = rank
        self.reserve = reserve
        self.alpha = scaling_alpha
        # IncreLoRA scales by alpha / rank in use; AdaLoRA (as HF PEFT) by alpha / initial rank throughout
        self.scale_by_rank = scale_by_rank
        self.fixed_rank = fixed_rank
        self.warmup = warmup  # steps over which a newly trained component's learning rate ramps up
        self.ids = torch.arange(capacity, dtype=torch.int64, device="cpu")  # host-side, also under a device context
        self.next_id = capacity
        # IncreLoRA's sampled gradient of the update on this step's grid, what scoring reads (see
        # _RankedLoraLinear); None when not collecting
        self.tile: torch.Tensor | None = None
        self.sample = (0, 1, 0, 1)  # row offset, row stride, column offset, column stride
        # What backward writes it through: the tile at its largest shape for these strides (tile is its top-left
        # corner) and the grid's row and column indices, padded to that shape with the last index. Shapes and
        # tensors stay the same from step to step, the new offsets are written into them: torch.compile compiles
        # the layer once instead of on every step's grid (it guarded on the offsets and on the tile's shape)
        self.grid: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def in_use(self) -> int:
        return self.rank + self.reserve

    @property
    def scaling(self) -> float:
        r = self.rank if self.scale_by_rank else self.fixed_rank
        return self.alpha / max(r, 1)

    def trainable(self, kind: str) -> int:
        """Components (a prefix) whose factor `kind` trains: e only once active; a and b in reserve too."""
        return self.rank if kind == "E" else self.in_use

    def renew_ids(self, index: torch.Tensor | slice) -> None:
        """Fresh ids for these slots: an optimizer starts their state from zero."""
        n = len(self.ids[index])
        self.ids[index] = torch.arange(self.next_id, self.next_id + n, dtype=torch.int64, device="cpu")
        self.next_id += n

    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor([self.capacity, self.rank, self.reserve, self.next_id, *self.ids.tolist()],
                            dtype=torch.int64)

    def set_extra_state(self, state: torch.Tensor) -> None:
        capacity, rank, reserve, next_id = (int(v) for v in state[:4])
        if capacity != self.capacity:
            raise ValueError(f"saved components have capacity {capacity}, this layer {self.capacity}: resize the "
                             f"layer first (load_state_dict restores the ranks of a model of the same capacity)")
        self.rank, self.reserve, self.next_id = rank, reserve, next_id
        self.ids = state[4:].clone()

    def extra_repr(self) -> str:
        return f"rank={self.rank}, reserve={self.reserve}, capacity={self.capacity}, scaling={self.scaling:g}"


def component_layout(p: torch.Tensor) -> tuple[Components, str] | None:
    """(components, kind) for a factor of a ranked layer, None for any other tensor."""
    return getattr(p, "_pefttorch_components", None)


class _RankedLoraLinear(torch.autograd.Function):
    """``x W^T + bias + scaling * dropout(x) (diag(e) A)^T B`` over the components in use, as ONE autograd node.

    Composed of ordinary ops (slice the storage, scale A by e, cast, transpose B, the fused LoRA op, hold reserve
    e fixed, tap the importance), a layer recorded about ten autograd nodes per step, each with its own host work
    in backward. IncreLoRA steps took 1.15-1.4x LoRA's on the H200 where the arithmetic adds about 1%, and on a
    CPU at a size where arithmetic is negligible (bench/host_overhead.py) they cost twice LoRA's host time:
    the GPU most likely waited on the host. Here the factors are formed by one op (ops.ranked_lora_factors) and
    the backward writes the three gradients of the full-capacity storage with one more (rows beyond the components
    in use, and reserve e, zero); it adds IncreLoRA's sampled gradient of the update,
    ``G[rows, cols] += dy[:, rows]^T x[:, cols]``, into the layer's tile when it collects one. Nothing
    activation-sized is kept beyond what the LoRA op keeps (x, and S when B trains).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a, e, b_t, components, p, seed):
        n, rank = components.in_use, components.rank
        a_n, b_n = ops.ranked_lora_factors(a, e, b_t, n, x.dtype)
        y, s = ops.lora_linear_forward(x, weight, a_n, b_n, bias, components.scaling, p, seed)
        need_x, need_w, need_bias, need_a, need_e, need_b = ctx.needs_input_grad[:6]
        grid = components.grid
        ctx.mask = [need_x, need_w, need_a or need_e, need_b, bias is not None and need_bias]
        ctx.save_for_backward(x if (need_w or need_a or need_e or grid is not None) else None, weight, a_n, b_n,
                              s if need_b else None, seed, a, e, b_t)
        ctx.scaling, ctx.p, ctx.rank, ctx.grid = components.scaling, p, rank, grid
        return y

    @staticmethod
    @ops.first_order_only("a ranked LoRA layer (IncreLoRA, AdaLoRA)")
    def backward(ctx, dy):
        x, weight, a_n, b_n, s, seed, a, e, b_t = ctx.saved_tensors
        need_a, need_e, need_b = ctx.needs_input_grad[3:6]
        gx, gw, g_an, g_bn, gbias = ops.lora_linear_backward(dy, x, weight, a_n, b_n, s, ctx.scaling, ctx.p, seed,
                                                             ctx.mask)
        # reserve components' e (rows rank..n) is held fixed: zero gradient
        ga, ge, gb = ops.ranked_lora_factors_backward(g_an, g_bn, a, e, b_t, ctx.rank, [need_a, need_e, need_b])
        if ctx.grid is not None:
            # padding rows and columns repeat the last index: they add into the part of the tile scoring never reads
            tile, rows, cols = ctx.grid
            dy2 = dy.reshape(-1, dy.shape[-1]).index_select(1, rows)
            x2 = x.reshape(-1, x.shape[-1]).index_select(1, cols)
            tile.addmm_(dy2.t().to(tile.dtype), x2.to(tile.dtype))
        return gx, gw, gbias, ga, ge, gb, None, None, None


def _ranked_lora_linear(x, weight, bias, a, e, b_t, c: Components, p: float, seed) -> torch.Tensor:
    """The layer's output; one autograd node when a gradient is recorded (see _RankedLoraLinear)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, a, e, b_t)):
        if torch._C._are_functorch_transforms_active():
            # its backward also fills the importance tile, a side effect torch.func's functional transforms cannot
            # carry (functorch would refuse the Function with an error that names neither it nor the reason)
            raise NotImplementedError("IncreLoRA/AdaLoRA layers cannot be differentiated by torch.func transforms "
                                      "(grad, vjp, jacrev, vmap over them); use autograd (loss.backward(), "
                                      "torch.autograd.grad), with torch.func.functional_call if needed")
        return _RankedLoraLinear.apply(x, weight, bias, a, e, b_t, c, p, seed)
    a_n, b_n = ops.ranked_lora_factors(a, e, b_t, c.in_use, x.dtype)
    return ops.lora_linear_forward(x, weight, a_n, b_n, bias, c.scaling, p, seed)[0]


class RankedLoraLayer(LoraLayer):
    """An nn.Linear or Conv1D (frozen) plus one adapter of variable rank. See the module docstring."""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer, fan_in_fan_out)
        self.lora_A = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.lora_B_t = nn.ParameterDict()
        self.lora_components = nn.ModuleDict()
        self.register_load_state_dict_post_hook(RankedLoraLayer._retag)

    # The tags (see _tag) live on the Parameter objects, and whatever makes new ones drops them: a deep copy or pickle,
    # load_state_dict(assign=True), to_empty(). The optimizer reads them at its load_state_dict, usually before the
    # next forward (which re-tags too): a state loaded untagged gave the moments to no component, or refused nothing.
    def _retag(self, *_) -> None:
        for name in self.lora_components:
            if name in self.lora_A:
                self._tag(name)

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._retag()

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._retag()
        return out

    def update_layer(self, name: str, *, capacity: int, rank: int, reserve: int, lora_alpha: float,
                     lora_dropout: float, scale_by_rank: bool, warmup: int = 0, reserve_e: float = 1e-5,
                     dtype: torch.dtype | None = None) -> None:
        """Adds adapter `name`: `rank` active components and `reserve` components in advance learning
        (e = `reserve_e`), all with no effect at first (see init_components)."""
        if rank + reserve > capacity:
            raise ValueError(f"rank {rank} + reserve {reserve} exceeds the capacity {capacity}")
        w = self.base_layer.weight
        factory = {"device": w.device, "dtype": dtype or w.dtype}
        self.lora_A[name] = nn.Parameter(torch.zeros(capacity, self.in_features, **factory))
        self.lora_E[name] = nn.Parameter(torch.zeros(capacity, 1, **factory))
        self.lora_B_t[name] = nn.Parameter(torch.zeros(capacity, self.out_features, **factory))
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_components[name] = Components(capacity, rank, reserve, lora_alpha, scale_by_rank,
                                                None if scale_by_rank else rank, warmup)
        self.lora_alpha[name] = lora_alpha
        self._tag(name)
        if w.device.type != "meta":
            self.init_components(name, slice(0, rank), e=0.0)
            self.init_components(name, slice(rank, rank + reserve), e=reserve_e)

    def _tag(self, name: str) -> None:
        # The optimizer finds a factor's layout on the parameter itself (see component_layout). Re-tagged
        # in forward too: copies (deepcopy) of a Parameter drop Python attributes.
        c = self.lora_components[name]
        for kind, params in zip(KINDS, (self.lora_A, self.lora_E, self.lora_B_t), strict=True):
            params[name]._pefttorch_components = (c, kind)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.factors(name))

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.lora_A[name], self.lora_E[name], self.lora_B_t[name]

    @torch.no_grad()
    def init_components(self, name: str, index: slice | torch.Tensor, e: float,
                        generator: torch.Generator | None = None) -> None:
        """New components in these slots, adding nothing to the output until trained; fresh ids.

        a ~ N(0, 0.02) as in IncreLoRA and AdaLoRA. With e = 0 (an active component) b ~ N(0, 0.02) too, as
        there, so that e gets a gradient; with e != 0 (a reserve component, whose e does not train) b = 0,
        where IncreLoRA draws it at random: so a reserve component has no effect at all until it trains. The
        values come from `generator` (the allocator's, the same in every process of a data-parallel run).
        """
        a, e_, b_t = self.factors(name)
        a[index] = _normal_like(a[index], generator) * 0.02
        e_[index] = e
        b_t[index] = _normal_like(b_t[index], generator) * 0.02 if e == 0 else 0.0
        self.lora_components[name].renew_ids(index)

    @torch.no_grad()
    def reorder(self, name: str, order: torch.Tensor) -> None:
        """Moves the component in slot order[k] to slot k (a permutation of all slots), ids included, so an
        optimizer's state follows its component."""
        c = self.lora_components[name]
        for p in self.factors(name):
            p.copy_(p[order.to(p.device)])
        c.ids = c.ids[order.cpu()]

    @torch.no_grad()
    def grow(self, name: str, capacity: int) -> None:
        """Enlarges the storage to `capacity` slots. The Parameter objects stay the same (their data is
        replaced), so an optimizer holding them keeps working: RankAwareAdamW matches its state by component id, a
        stock optimizer has its state resized before its next step (see _fit_optimizer_state)."""
        c = self.lora_components[name]
        if capacity <= c.capacity:
            return
        for p in self.factors(name):
            data = p.new_zeros((capacity, p.shape[1]))
            data[:c.capacity] = p
            # A graph still alive from the last step (the user's `loss`) keeps the parameter's gradient
            # accumulator, which remembers the old shape; torch drops it on a change of dtype, not of shape:
            # pass through another dtype so the next backward gets a fresh one.
            p.data = data.to(torch.float64 if data.dtype != torch.float64 else torch.float32)
            p.data = data
            p.grad = None  # of the old shape; allocation runs between optimizer.step() and zero_grad()
            _note_resized(p)
        c.ids = torch.cat([c.ids, torch.arange(c.next_id, c.next_id + capacity - c.capacity, dtype=torch.int64,
                                               device="cpu")])
        c.next_id += capacity - c.capacity
        c.capacity = capacity

    def _shrink_for_load(self, name: str, capacity: int) -> None:
        """Storage of `capacity` slots for a checkpoint taken before the module grew (the HF Trainer's
        load_best_model_at_end, an earlier checkpoint): the factors, ids and ranks are loaded next."""
        c = self.lora_components[name]
        for p in self.factors(name):
            data = p.new_zeros((capacity, p.shape[1]))
            p.data = data.to(torch.float64 if data.dtype != torch.float64 else torch.float32)  # see grow()
            p.data = data
            p.grad = None
            _note_resized(p)
        c.ids = c.ids[:capacity].clone()
        c.capacity = capacity
        c.rank, c.reserve = min(c.rank, capacity), min(c.reserve, capacity - min(c.rank, capacity))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint of another capacity (taken after, or before, the module outgrew its first one): storage of
        # the saved capacity before the factors load.
        for name in self.lora_components:
            saved = state_dict.get(f"{prefix}lora_A.{name}")
            if saved is not None and saved.shape[0] > self.lora_components[name].capacity:
                self.grow(name, saved.shape[0])
            elif saved is not None and saved.shape[0] < self.lora_components[name].capacity:
                self._shrink_for_load(name, saved.shape[0])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs:
            raise TypeError(f"{type(self).__name__}.forward takes only the input tensor")
        active = [n for n in self.active_adapters if n in self.lora_A]
        base = self.base_layer
        if self.disable_adapters and self.merged:
            self.unmerge(inputs_real=not x.is_meta)  # disabled means the base model's output (see lora_forward)
        if self.disable_adapters or self.merged or not active:
            return base(x)
        name = active[0]  # one ranked adapter per model (RankedLoraModel enforces it)
        c = self.lora_components[name]
        n = c.in_use
        if getattr(self.lora_A[name], "_pefttorch_components", None) is None:
            self._tag(name)  # (before the rank-0 return: the optimizer must know a pruned module's factors too)
        if self.lora_A[name].is_meta and not x.is_meta:
            # 🤗 Accelerate's offloading keeps weights on the meta device and loads a module's own for its calls;
            # the factors' containers are never called, so they stay placeholders (the op failed on "weight is on
            # meta", naming neither the cause nor a way out; a rank-0 module failed adding them)
            raise RuntimeError(f"{type(self).__name__}: the adapter's factors are on the meta device: the model is "
                               "offloaded by 🤗 Accelerate (cpu_offload, a device_map with 'cpu' or 'disk'), which "
                               "does not load AdaLoRA/IncreLoRA factors; keep the model on devices (a device_map of "
                               "devices only)")
        if n == 0:  # pruned away entirely: the base layer alone
            y = base(x)
            if torch.is_grad_enabled() and self.lora_A[name].requires_grad:
                # ... still joined to the factors by an empty sum (exactly 0, zero gradients): DDP expects every
                # parameter that requires grad to get one, and failed on the next step without it
                y = y + sum(p[:0].sum() for p in self.factors(name)).to(y.dtype)
            return y
        a, e, b_t = self.factors(name)
        p, seed = functional.dropout_seed(type(self).__name__, *dropout_p(self.lora_dropout[name]))
        if calls_only_linear(base):
            weight, bias, y = base.weight.t() if self.fan_in_fan_out else base.weight, base.bias, None
        else:
            # a base layer that must be called (hooks, its own forward, a quantized weight; see calls_only_linear):
            # its output plus the adapter's term alone, from a zero weight. Rare, so the product with zeros is
            # accepted; the adapter's term still goes through the op whose backward scores the components.
            # (its own shape: hooks that gather a partitioned weight, ZeRO-3's, leave a placeholder outside the call;
            # a plain tensor: a weight's subclass would take the op to its own dispatch)
            zero = torch.zeros((), dtype=base.weight.dtype, device=base.weight.device)
            weight, bias, y = zero.expand(self.out_features, self.in_features), None, base(x)
        # the factors follow x's dtype inside (ops.ranked_lora_factors): only x, the weight and the bias need the cast
        out = functional.in_compute_dtype(lambda x, weight, bias: _ranked_lora_linear(
            x, weight, bias, a, e, b_t, c, p, seed), x, weight, bias)
        return out if y is None else y + out.to(y.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        """The update ``scaling * B diag(e) A`` (out, in) of the components in use, in float32."""
        c = self.lora_components[name]
        a, e, b_t = (t[:c.in_use].float() for t in self.factors(name))
        return (b_t.t() @ (e * a)) * c.scaling

    def _merge(self, name: str, sign: float) -> None:
        c = self.lora_components[name]
        if c.in_use == 0:
            return
        # e * a formed in the precision merge_lora_ computes in: in 16-bit factors' dtype it was rounded once more
        acc = opmath_dtype(self.base_layer.weight.dtype)
        a, e, b_t = (t[:c.in_use].to(acc) for t in self.factors(name))
        functional.merge_lora_(self.base_layer.weight, e * a, b_t.t(), c.scaling, sign=sign,
                               fan_in_fan_out=self.fan_in_fan_out)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        for d in (self.lora_E, self.lora_B_t, self.lora_components):
            if name in d:
                del d[name]

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: {c.extra_repr()}" for n, c in self.lora_components.items())
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters=[{ranks}], " \
               f"active={self.active_adapters}, merged={self.merged_adapters}"
