"""When and where rank moves: IncreLoRA's growth schedule and AdaLoRA's pruning schedule.

Both are driven by one call per optimizer step, after ``optimizer.step()`` and before ``zero_grad()``
(the HF PEFT habit: ``model.update_and_allocate(step)``), and both change the layers' ranks in place
(see :mod:`.layer`): nothing is reallocated unless a module outgrows its capacity, and the model's output
does not change at an IncreLoRA event.
"""

from __future__ import annotations

import math
import warnings

import torch

from ... import ops
from .config import AdaLoraConfig, IncreLoraConfig
from .layer import RankedLoraLayer


def data_parallel() -> bool:
    """Whether this process is one of several of a torch.distributed run (DDP, FSDP): each sees its own batch."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def _on_any_process(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on any process of the data-parallel run (one collective, from `device`)."""
    t = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(t)
    return bool(t.item())


def _moved(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`; from the meta device (a model built there, then materialized by to_empty or a load with
    assign=True), zeros: there were no values to move, and a loaded checkpoint brings its own."""
    return torch.zeros_like(t, device=device) if t.is_meta else t.to(device)


def adapters_device(layers: list[tuple[str, RankedLoraLayer]], adapter: str, method: str) -> torch.device:
    """The one device every adapted layer's factors are on. The allocators keep their statistics and tiles in
    one buffer and rank all modules together, so a model split over devices (device_map="auto" on several GPUs)
    is refused here rather than failing inside a kernel or a concatenation at the first allocation."""
    devices = {}
    for name, layer in layers:
        devices.setdefault(layer.lora_A[adapter].device, name)
    if len(devices) > 1:
        where = ", ".join(f"{name} on {device}" for device, name in devices.items())
        raise NotImplementedError(f"{method} needs all its adapted modules on one device; they are on "
                                  f"{len(devices)} ({where}): load the model on one device")
    return next(iter(devices))


def refuse_sharded(layers: list[tuple[str, RankedLoraLayer]], adapter: str, method: str) -> None:
    """FSDP2 (fully_shard) makes the factors DTensors, each process holding a shard: the allocators score, rank and
    grow whole factors, and failed on them inside an op mixing Tensor and DTensor. Refused with the remedy instead."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.tensor import DTensor

    if isinstance(layers[0][1].lora_A[adapter], DTensor):
        raise NotImplementedError(f"{method} is not supported under FSDP2 (fully_shard) yet: its factors are sharded "
                                  f"DTensors, which rank allocation cannot score or grow; use DDP "
                                  f"(torch.nn.parallel.DistributedDataParallel) instead")


def saved_order(state: dict, method: str, layers: list[tuple[str, RankedLoraLayer]]) -> list[int] | None:
    """Where each of `layers`' statistics is in a saved allocator state: positions in the saved ones, matched by
    module path (None: saved before the paths were kept, in this model's order). Raises, before anything is
    changed, where the state is another method's or of other modules (a checkpoint of another configuration)."""
    # states saved before the method was kept: IncreLoRA's statistics are one vector, AdaLoRA's lists per module
    saved_method = state.get("method") or ("IncreLoRA" if isinstance(state["ipt"], torch.Tensor) else "AdaLoRA")
    if saved_method != method:
        raise ValueError(f"{method}: the state dict's allocator state is {saved_method}'s: the checkpoint is of "
                         f"another method's model (this one is {method}'s)")
    names = [name for name, _ in layers]
    hint = ("the checkpoint is of another configuration (target_modules); to load the weights alone, leave the "
            "allocator's '_extra_state' entry out of the state dict")
    saved = state.get("modules")
    if saved is None:
        count = len(state["ipt"])  # none where AdaLoRA's schedule had finished (its statistics freed)
        if count and count != len(names):
            raise ValueError(f"{method}: the allocator state holds statistics of {count} modules, this model adapts "
                             f"{len(names)}: {hint}")
        return None
    if sorted(saved) != sorted(names):
        only_saved, only_here = [n for n in saved if n not in names], [n for n in names if n not in saved]
        raise ValueError(f"{method}: the allocator state is of other modules than this model's (only in the state "
                         f"dict: {', '.join(only_saved) or 'none'}; only in this model: "
                         f"{', '.join(only_here) or 'none'}): {hint}")
    return [saved.index(n) for n in names]


def loaded_events(events: list[dict], layers: list[tuple[str, RankedLoraLayer]]) -> list[dict]:
    """Saved events, their module names made this model's own name objects again, as in events made here: a state
    saved after a load then pickles as the original did (the names shared with "modules"), byte for byte."""
    own = {name: name for name, _ in layers}
    return [{**e, "ranks": {own.get(k, k): v for k, v in e["ranks"].items()}} for e in events]


class IncreLoraAllocator:
    """IncreLoRA: importance per module from the sampled gradient of its update; every `incre_interval`
    steps after `init_warmup`, the `top_h` best modules receive `incre_rank_num` components until the total
    rank is ``target_rank * modules`` exactly.

    The score is ``sum|dW * dL/d(dW)| / sqrt(numel)`` of the update dW = scaling * B diag(e) A (reserve
    components included, as in the paper's code). dL/d(dW) = dy^T x is a full weight gradient: forming it is
    what LoRA saves. So each layer accumulates it in backward only on a grid of rows ``r0::rs`` and columns
    ``c0::cs`` (strides chosen for about ``score_sample`` of each, offsets drawn afresh each step), and one
    fused op forms dW on that grid from the factors and reduces all modules at once. Every entry is sampled
    with probability 1/(rs*cs) and weighted by rs*cs, so the estimate is unbiased; its noise averages out in
    the smoothed sensitivity. With ``score_sample=None`` (strides 1) the score is exact. The input to LoRA
    dropout stands for its output in G (dropout's mask is not kept).
    """

    method = "IncreLoRA"  # as saved in the state dict

    def __init__(self, layers: list[tuple[str, RankedLoraLayer]], adapter: str, config: IncreLoraConfig) -> None:
        self.layers = layers
        self.adapter = adapter
        self.config = config
        self.target_total = config.target_rank * len(layers)
        device = adapters_device(layers, adapter, "IncreLoRA")
        # float32 whatever torch's default dtype (rank_importance scores in float32)
        self.ipt = torch.zeros(len(layers), device=device, dtype=torch.float32)  # smoothed sensitivity
        self.unc = torch.zeros(len(layers), device=device, dtype=torch.float32)  # smoothed uncertainty
        self.generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (), device="cpu")))
        self.events: list[dict] = []  # (step, {module: rank after}) of every allocation
        self.finished = False
        self.last_step: int | None = None  # of the latest update_and_allocate (see RankedLoraModel's)
        self.tiles: torch.Tensor | None = None  # every layer's tile, in one buffer (see _new_sample)
        # Data parallelism: every process must sample the same grid, sum the same tiles and draw the same new
        # components; the generator is made one (rank 0's) at the first update, which every process of the run
        # calls. Not here: building a model runs no collective (as LoRA's and AdaLoRA's), so one process alone may
        # build one (to evaluate or export on rank 0) where a broadcast here waited for the others until the timeout.
        self._shared_generator = False
        if self.total_rank() >= self.target_total:
            self._finish()
        else:
            self._new_sample()

    def components(self, layer: RankedLoraLayer):
        return layer.lora_components[self.adapter]

    def total_rank(self) -> int:
        return sum(self.components(layer).rank for _, layer in self.layers)

    def follow_device(self) -> None:
        """After the model moved: statistics and tiles go where the adapters are."""
        device = adapters_device(self.layers, self.adapter, "IncreLoRA")
        if self.ipt.device != device:
            self.ipt, self.unc = _moved(self.ipt, device), _moved(self.unc, device)
            if self.tiles is not None:
                self.tiles = None
                self._new_sample()

    # ------------------------------------------------------------------ importance

    def _share_generator(self) -> bool:
        """Gives every process of a data-parallel run rank 0's generator; True if some process's generator differed
        from rank 0's until now (its grid, drawn from it, then differed too)."""
        if self._shared_generator or not data_parallel():
            return False
        # NCCL moves only CUDA tensors: the adapters' device (a DDP script may place each rank's model without
        # torch.cuda.set_device, and every rank would send from cuda:0), or the current one while the model is still
        # on the CPU (get_peft_model before .cuda())
        device = torch.device("cpu")
        if torch.distributed.get_backend() == "nccl":
            device = self.ipt.device
            if device.type != "cuda":
                device = torch.device("cuda", torch.cuda.current_device())
        own = self.generator.get_state()
        state = own.to(device)
        torch.distributed.broadcast(state, src=0)
        state = state.cpu()
        # Processes seeded alike (the usual case, and every resumed run: each loads the same saved state) drew the
        # same grids already; only where one differed is this step's tile not comparable across processes
        differed = _on_any_process(not torch.equal(state, own.cpu()), device)
        self.generator.set_state(state)
        self._shared_generator = True
        if self.config.max_rank_per_module is None:
            warnings.warn("IncreLoRA under data parallelism: a module that outgrows its storage (target_rank plus "
                          "reserve) gets new parameter storage, which DDP cannot follow; set "
                          "IncreLoraConfig(max_rank_per_module=...) so that it is allocated up front", UserWarning,
                          stacklevel=2)
        return differed

    def _new_sample(self) -> None:
        """Fresh grid offsets and zeroed tiles for the next step's backward. The tiles are views into one
        buffer (each at its largest shape, offset 0), so zeroing them all is one kernel."""
        side = self.config.score_sample
        if self.tiles is None:
            self.strides = [tuple(1 if side is None else max(1, math.ceil(d / side))
                                  for d in (layer.out_features, layer.in_features)) for _, layer in self.layers]
            shapes = [(math.ceil(layer.out_features / rs), math.ceil(layer.in_features / cs))
                      for (_, layer), (rs, cs) in zip(self.layers, self.strides, strict=True)]
            self.tiles = torch.zeros(sum(p * q for p, q in shapes), device=self.ipt.device, dtype=torch.float32)
            self.tile_views = list(torch.split(self.tiles, [p * q for p, q in shapes]))
            self.tile_views = [t.view(shape) for t, shape in zip(self.tile_views, shapes, strict=True)]
            # Every layer's grid indices (rows, then columns) in one buffer, which one copy a step rewrites: index
            # k of a grid is offset + k * stride, clamped to the last row or column (the tile's padding)
            sizes = [n for shape in shapes for n in shape]
            self._grid_sizes = torch.tensor(sizes, device="cpu")
            self._grid_steps = torch.cat([torch.arange(n, device="cpu") * stride for n, stride in
                                          zip(sizes, [s for pair in self.strides for s in pair], strict=True)])
            self._grid_last = torch.tensor([d - 1 for _, layer in self.layers
                                            for d in (layer.out_features, layer.in_features)], device="cpu")
            self._grid_last = self._grid_last.repeat_interleave(self._grid_sizes)
            self.grid_index = torch.zeros(sum(sizes), dtype=torch.int64, device=self.ipt.device)
            self._grid_offsets = None  # the offsets grid_index holds
            index_views = torch.split(self.grid_index, sizes)
            for i, ((_, layer), view) in enumerate(zip(self.layers, self.tile_views, strict=True)):
                self.components(layer).grid = view, index_views[2 * i], index_views[2 * i + 1]
        else:
            self.tiles.zero_()
        # every layer's two offsets from one draw (a draw per offset cost more host time than the tiles' kernels)
        uniform = torch.rand(len(self.layers), 2, generator=self.generator, dtype=torch.float64, device="cpu").tolist()
        self._use_sample([(min(int(u * rs), rs - 1), rs, min(int(v * cs), cs - 1), cs)
                          for (rs, cs), (u, v) in zip(self.strides, uniform, strict=True)])

    def restore_views(self) -> None:
        """The tiles, their grids and the layers' references to them as views of the two buffers again (see
        RankedLoraModel.__setstate__)."""
        if self.tiles is None:
            return
        shapes = [tuple(v.shape) for v in self.tile_views]
        self.tile_views = [t.view(shape) for t, shape in zip(
            torch.split(self.tiles, [math.prod(shape) for shape in shapes]), shapes, strict=True)]
        index_views = torch.split(self.grid_index, self._grid_sizes.tolist())
        for i, ((_, layer), view) in enumerate(zip(self.layers, self.tile_views, strict=True)):
            self.components(layer).grid = view, index_views[2 * i], index_views[2 * i + 1]
        self._use_sample([self.components(layer).sample for _, layer in self.layers])  # the same grid: tiles only

    def _use_sample(self, samples: list[tuple[int, int, int, int]]) -> None:
        """Points every layer's tile at its grid (row offset, row stride, column offset, column stride)."""
        for (_, layer), view, sample in zip(self.layers, self.tile_views, samples, strict=True):
            c = self.components(layer)
            r0, rs, c0, cs = c.sample = tuple(sample)
            c.tile = view[:len(range(r0, layer.out_features, rs)), :len(range(c0, layer.in_features, cs))]
        offsets = torch.tensor([o for s in samples for o in (s[0], s[2])], dtype=torch.int64, device="cpu")
        if self._grid_offsets is not None and torch.equal(offsets, self._grid_offsets):
            return  # the same grid (always, with score_sample=None): the indices stand
        self._grid_offsets = offsets
        index = torch.minimum(self._grid_steps + offsets.repeat_interleave(self._grid_sizes), self._grid_last)
        if self.grid_index.is_cuda:  # asynchronous from pinned memory: no host sync per step
            index = index.pin_memory()
        self.grid_index.copy_(index, non_blocking=True)

    def scores(self) -> torch.Tensor:
        """This step's score of every module (a float32 vector on the adapters' device), from the tiles."""
        a, b, e, tiles, r0, rs, c0, cs, ranks, weights = ([] for _ in range(10))
        for _, layer in self.layers:
            c = self.components(layer)
            fa, fe, fb_t = layer.factors(self.adapter)
            a.append(fa)
            e.append(fe)
            b.append(fb_t.t())
            tiles.append(c.tile)
            for lst, v in zip((r0, rs, c0, cs), c.sample, strict=True):
                lst.append(v)
            ranks.append(c.in_use)
            weights.append(c.scaling * c.sample[1] * c.sample[3] / math.sqrt(layer.out_features * layer.in_features))
        with torch.no_grad():
            return ops.rank_importance(a, b, e, tiles, r0, rs, c0, cs, ranks, weights)

    def update_ipt(self, loss_scale: float | torch.Tensor | None = None) -> None:
        if data_parallel():
            if self._share_generator():
                return  # the processes sampled different grids this step: its tiles are not comparable
            # (processes seeded alike sampled the same ones: the step counts, as in one process)
            # the gradient of the update over the whole batch is the mean of the processes' (their losses are
            # means over their own batches): one collective over the tiles' single buffer
            torch.distributed.all_reduce(self.tiles)
            self.tiles.div_(torch.distributed.get_world_size())
        b1, b2 = self.config.beta1, self.config.beta2
        s = self.scores()
        if loss_scale is not None:  # the tiles hold the scaled backward's gradient (see update_and_allocate)
            s = s / loss_scale
        # A step whose gradients overflowed (GradScaler skips the optimizer step then, as it should) leaves the
        # statistics as they were, where its inf or NaN would stay in them for good. Selected on the device: no
        # host sync per step.
        ok = torch.isfinite(s).all()
        s = torch.where(ok, s, self.ipt)
        ipt = torch.where(ok, self.ipt * b1 + s * (1 - b1), self.ipt)
        self.unc.copy_(torch.where(ok, self.unc * b2 + (s - ipt).abs() * (1 - b2), self.unc))
        self.ipt.copy_(ipt)

    def score_vector(self) -> torch.Tensor:
        """Sensitivity times uncertainty per module: what allocation ranks modules by."""
        return self.ipt * self.unc

    # ------------------------------------------------------------------ allocation

    def update_and_allocate(self, step: int, loss_scale: float | torch.Tensor | None = None) -> dict[str, int] | None:
        """Updates the scores from this step's backward (unscaled by `loss_scale`) and, on an allocation step, grows
        the best modules. Returns {module: new rank} of the modules that grew, or None."""
        if self.finished:
            return None
        refuse_sharded(self.layers, self.adapter, self.method)
        self.update_ipt(loss_scale)
        grown = None
        if step > self.config.init_warmup and step % self.config.incre_interval == 0:
            grown = self.allocate(step)
        if not self.finished:
            self._new_sample()
        return grown

    @torch.no_grad()
    def allocate(self, step: int) -> dict[str, int]:
        config = self.config
        scores = self.score_vector().tolist()  # the one host sync, on allocation steps only
        if any(not math.isfinite(s) for s in scores):
            bad = [name for (name, _), s in zip(self.layers, scores, strict=True) if not math.isfinite(s)]
            raise FloatingPointError(f"IncreLoRA: importance scores are not finite for {bad[:3]}: the gradients "
                                     f"of the last steps held NaN or inf")
        limit = config.max_rank_per_module
        eligible = [i for i, (_, layer) in enumerate(self.layers)
                    if limit is None or self.components(layer).rank < limit]
        eligible.sort(key=lambda i: -scores[i])
        remaining = self.target_total - self.total_rank()
        gives = []  # (module, components it gets)
        for i in eligible[:config.top_h]:
            if remaining == 0:
                break
            name, layer = self.layers[i]
            c = self.components(layer)
            give = min(config.incre_rank_num, remaining, (limit - c.rank) if limit is not None else remaining)
            gives.append((name, layer, give))
            remaining -= give
        # every module's storage checked before any is changed: a refusal leaves the model and history as they were
        for _, layer, give in gives:
            self._check_capacity(layer, self._in_use_after(layer, give))
        grown = {}
        for name, layer, give in gives:
            self._activate(layer, give)
            grown[name] = self.components(layer).rank
        self.events.append({"step": step, "ranks": dict(grown)})
        if remaining == 0:
            self._finish()
        return grown

    def _activate(self, layer: RankedLoraLayer, give: int) -> None:
        """Makes `give` more components of `layer` active without changing its output: the scaling falls
        from alpha/r to alpha/(r+give), so the e of every component in use is raised by (r+give)/r; the
        first reserve components become active (their b and a trained in advance), or, without reserve,
        new components (e = 0) are added. The reserve is then refilled."""
        c = self.components(layer)
        config = self.config
        a, e, _ = layer.factors(self.adapter)
        old_rank, old_in_use = c.rank, c.in_use
        e[:old_in_use] *= (old_rank + give) / old_rank
        from_reserve = min(give, c.reserve)
        c.rank += give
        c.reserve -= from_reserve
        if give > from_reserve:  # no (or too little) reserve: fresh components after the reserve's end
            self._ensure_capacity(layer, c.rank + c.reserve)
            layer.init_components(self.adapter, slice(old_in_use, c.rank + c.reserve), e=0.0,
                                  generator=self.generator)
        if config.advance_learning:
            refill = config.incre_rank_num - c.reserve
            self._ensure_capacity(layer, c.in_use + refill)
            layer.init_components(self.adapter, slice(c.in_use, c.in_use + refill), e=1e-5, generator=self.generator)
            c.reserve += refill

    def _in_use_after(self, layer: RankedLoraLayer, give: int) -> int:
        """The most components `_activate(layer, give)` has in use: active, what is left of the reserve, its refill."""
        c = self.components(layer)
        left = c.reserve - min(give, c.reserve)
        refill = max(0, self.config.incre_rank_num - left) if self.config.advance_learning else 0
        return c.rank + give + left + refill

    def _check_capacity(self, layer: RankedLoraLayer, needed: int) -> None:
        """Refuses, under data parallelism, to give `layer` more components than its storage holds."""
        c = self.components(layer)
        if needed > c.capacity and data_parallel():
            name = next(n for n, m in self.layers if m is layer)
            raise RuntimeError(f"IncreLoRA: {name} outgrew its storage ({c.capacity} components) in a data-parallel "
                               f"run; DDP cannot follow a parameter whose storage is replaced (its gradients would no "
                               f"longer be averaged). Set IncreLoraConfig(max_rank_per_module=...) so that the "
                               f"storage is allocated for it up front")

    def _ensure_capacity(self, layer: RankedLoraLayer, needed: int) -> None:
        self._check_capacity(layer, needed)
        c = self.components(layer)
        if needed > c.capacity:  # doubling: reallocations stay logarithmic in the final rank
            layer.grow(self.adapter, max(needed, 2 * c.capacity))

    def _finish(self) -> None:
        """The budget is reached: reserve components are dropped (their e was fixed at 1e-5 times the
        rescaling, so the output moves by that much of their trained b a) and scoring stops."""
        self.finished = True
        with torch.no_grad():
            for _, layer in self.layers:
                c = self.components(layer)
                if c.reserve:
                    _, e, _ = layer.factors(self.adapter)
                    e[c.rank:c.in_use] = 0.0
                    c.renew_ids(slice(c.rank, c.in_use))
                    c.reserve = 0
                c.tile = c.grid = None
        self.tiles = self.tile_views = self.grid_index = None

    def state_dict(self) -> dict:
        """What the schedule needs to go on exactly where it was (a checkpoint is taken between steps, with the
        tiles zeroed): the statistics, the history, the sampling generator and the grid drawn for the next step."""
        samples = None if self.finished else [self.components(layer).sample for _, layer in self.layers]
        return {"method": self.method, "modules": [name for name, _ in self.layers], "ipt": self.ipt,
                "unc": self.unc, "events": self.events, "finished": self.finished,
                "generator": self.generator.get_state(), "samples": samples, "last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        order = saved_order(state, self.method, self.layers)
        ipt, unc, samples = state["ipt"], state["unc"], state.get("samples")
        if order is not None:
            ipt, unc = ipt[order], unc[order]
            samples = None if samples is None else [samples[i] for i in order]
        self.last_step = state.get("last_step")  # None from a checkpoint written before it was kept
        self.ipt.copy_(ipt)
        self.unc.copy_(unc)
        self.events = loaded_events(state["events"], self.layers)
        if state["finished"]:
            self.generator.set_state(state["generator"])
            if not self.finished:
                self._finish()
            return
        if self.finished:  # a checkpoint from before the budget was reached, loaded after: scoring again
            self.finished = False
            self._new_sample()  # the tiles again (the grid is set below, the generator's draw undone next)
        self.generator.set_state(state["generator"])
        self.tiles.zero_()
        if samples is not None and [(s[1], s[3]) for s in samples] == self.strides:
            self._use_sample(samples)
        else:  # saved with another score_sample: a grid of this one's
            self._new_sample()


class AdaLoraAllocator:
    """AdaLoRA's schedule (HF PEFT's RankAllocator): per-entry sensitivity |p * grad| of a, e and b smoothed
    with its uncertainty; a component's score is that of e plus the means over its a and b entries. The
    budget falls along a cubic from `tinit` to ``total_step - tfinal``; every `deltaT` steps the lowest-scoring
    components are pruned down to it. Pruned components are moved out of the rank in use (the survivors
    keep their order and their optimizer state, matched by id), so compute shrinks with the budget."""

    method = "AdaLoRA"  # as saved in the state dict

    def __init__(self, layers: list[tuple[str, RankedLoraLayer]], adapter: str, config: AdaLoraConfig) -> None:
        self.layers = layers
        self.adapter = adapter
        self.config = config
        self.init_total = config.init_r * len(layers)
        self.target_total = config.target_r * len(layers)
        adapters_device(layers, adapter, "AdaLoRA")
        # smoothed sensitivity and uncertainty of every factor entry, in float32, shaped like the factors: views
        # into one flat buffer each, so that a step can be undone by one select (see update_ipt)
        self._ipt_flat, self.ipt = self._flat_statistics()
        self._unc_flat, self.unc = self._flat_statistics()
        self.events: list[dict] = []
        self.finished = False
        self.last_step: int | None = None

    def _flat_statistics(self, device=None) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
        factors = [layer.factors(self.adapter) for _, layer in self.layers]
        device = factors[0][0].device if device is None else device
        flat = torch.zeros(sum(p.numel() for fs in factors for p in fs), dtype=torch.float32, device=device)
        views, start = [], 0
        for fs in factors:
            views.append([])
            for p in fs:
                views[-1].append(flat[start:start + p.numel()].view(p.shape))
                start += p.numel()
        return flat, views

    def components(self, layer: RankedLoraLayer):
        return layer.lora_components[self.adapter]

    def total_rank(self) -> int:
        return sum(self.components(layer).rank for _, layer in self.layers)

    def restore_views(self) -> None:
        """The statistics as views of their flat buffers again (see RankedLoraModel.__setstate__)."""
        if self.finished:
            return
        for name in ("ipt", "unc"):
            flat, views, start = getattr(self, f"_{name}_flat"), [], 0
            for ts in getattr(self, name):
                views.append([])
                for t in ts:
                    views[-1].append(flat[start:start + t.numel()].view(t.shape))
                    start += t.numel()
            setattr(self, name, views)

    def follow_device(self) -> None:
        """After the model moved: the statistics go where the adapters are."""
        if self.finished:
            return  # no statistics left to move
        device = adapters_device(self.layers, self.adapter, "AdaLoRA")
        if self._ipt_flat.device != device:
            for name in ("ipt", "unc"):
                flat, views = self._flat_statistics(device)
                flat.copy_(_moved(getattr(self, f"_{name}_flat"), device))
                setattr(self, f"_{name}_flat", flat)
                setattr(self, name, views)

    def budget(self, step: int) -> tuple[int, bool]:
        """(total rank allowed at `step`, whether to prune now): HF PEFT's budget_schedule."""
        c = self.config
        end = c.total_step - c.tfinal
        if step <= c.tinit:
            return self.init_total, False
        if step >= end:
            return self.target_total, True
        progress = 1 - (step - c.tinit) / (end - c.tinit)
        return int((self.init_total - self.target_total) * progress**3 + self.target_total), step % c.deltaT == 0

    @torch.no_grad()
    def update_ipt(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        params, grads, ipt, unc = [], [], [], []
        for (name, layer), ipts, uncs in zip(self.layers, self.ipt, self.unc, strict=True):
            r = self.components(layer).rank
            if r == 0:
                continue
            for p, i, u in zip(layer.factors(self.adapter), ipts, uncs, strict=True):
                if p.grad is None and not p.requires_grad:
                    # frozen by the user: no score to rank it by (the call order was blamed)
                    raise RuntimeError(f"AdaLoRA: {name}'s factors do not require grad, so it has no importance "
                                       f"score to allocate its rank by; leave it out of target_modules (or "
                                       f"layers_to_transform) instead of freezing it")
                if p.grad is None:
                    raise RuntimeError(f"AdaLoRA: {name} has no gradient: call update_and_allocate(step) after "
                                       f"backward (and optimizer.step()) and before zero_grad()")
                params.append(p[:r])
                grads.append(p.grad[:r])
                ipt.append(i[:r])
                unc.append(u[:r])
        if not params:
            return
        # A step whose gradients overflowed (GradScaler skips the optimizer step then, as it should) must leave the
        # statistics as they were, where its inf or NaN would stay for good: update, then select the old values
        # back where the result is not finite. On the flat buffers, so a few kernels and no host sync.
        before = self._ipt_flat.clone(), self._unc_flat.clone()
        # one multi-tensor kernel per operation over every factor of every module
        s = torch._foreach_mul(params, grads)
        torch._foreach_abs_(s)
        if s[0].dtype != torch.float32:
            s = [t.float() for t in s]
        torch._foreach_lerp_(ipt, s, 1 - b1)
        torch._foreach_sub_(s, ipt)
        torch._foreach_abs_(s)
        torch._foreach_mul_(unc, b2)
        torch._foreach_add_(unc, s, alpha=1 - b2)
        ok = torch.isfinite(self._ipt_flat).all() & torch.isfinite(self._unc_flat).all()
        torch.where(ok, self._ipt_flat, before[0], out=self._ipt_flat)
        torch.where(ok, self._unc_flat, before[1], out=self._unc_flat)

    def component_scores(self) -> list[torch.Tensor]:
        """Score of every active component, one vector per module."""
        out = []
        for (_, layer), (ia, ie, ib), (ua, ue, ub) in zip(self.layers, self.ipt, self.unc, strict=True):
            r = self.components(layer).rank
            out.append((ie[:r] * ue[:r]).view(-1) + (ia[:r] * ua[:r]).mean(1) + (ib[:r] * ub[:r]).mean(1))
        return out

    def state_dict(self) -> dict:
        return {"method": self.method, "modules": [name for name, _ in self.layers], "ipt": self.ipt, "unc": self.unc,
                "events": self.events, "finished": self.finished, "last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        order = saved_order(state, self.method, self.layers)
        if not state["finished"]:  # (a finished schedule's statistics were freed) every shape checked before any copy
            saved = {name: state[name] if order is None else [state[name][i] for i in order] for name in ("ipt", "unc")}
            for name, theirs in saved.items():
                for (path, layer), ts in zip(self.layers, theirs, strict=True):
                    for p, u in zip(layer.factors(self.adapter), ts, strict=True):
                        if p.shape != u.shape:
                            raise ValueError(f"AdaLoRA: the saved {name} of {path} has shape {tuple(u.shape)}, this "
                                             f"model's {tuple(p.shape)}: the checkpoint is of another configuration")
        self.last_step = state.get("last_step")
        self.events = loaded_events(state["events"], self.layers)
        if state["finished"]:
            self._free_statistics()
            return
        if self.finished:  # a checkpoint from before the schedule's end, loaded after it: statistics again
            self.finished = False
            (self._ipt_flat, self.ipt), (self._unc_flat, self.unc) = self._flat_statistics(), self._flat_statistics()
        for mine, theirs in ((self.ipt, saved["ipt"]), (self.unc, saved["unc"])):
            for ts, us in zip(mine, theirs, strict=True):
                for t, u in zip(ts, us, strict=True):
                    t.copy_(u)

    def _free_statistics(self) -> None:
        self.finished = True
        self.ipt, self.unc = [], []
        self._ipt_flat = self._unc_flat = None

    def update_and_allocate(self, step: int, loss_scale: float | torch.Tensor | None = None) -> dict[str, int] | None:
        # loss_scale unused: AdaLoRA scores the gradients, which scaler.step has unscaled by now
        if self.finished:
            return None
        refuse_sharded(self.layers, self.adapter, self.method)
        end = self.config.total_step - self.config.tfinal
        if step < end:
            self.update_ipt()
        budget, prune = self.budget(step)
        pruned = self.prune_to(budget, step) if prune else None
        if step >= end:  # the final budget is in force: no more scoring (its state is freed)
            self._free_statistics()
        return pruned

    @torch.no_grad()
    def prune_to(self, budget: int, step: int) -> dict[str, int] | None:
        """Removes the (total - budget) lowest-scoring components; returns {module: new rank} of the modules
        that shrank."""
        excess = self.total_rank() - budget
        if excess <= 0:
            return None
        scores = self.component_scores()
        flat = torch.cat(scores)
        if not torch.isfinite(flat).all():
            raise FloatingPointError("AdaLoRA: importance scores are not finite: the gradients held NaN or inf")
        lowest = torch.topk(flat, excess, largest=False).indices.cpu()
        doomed = torch.zeros(flat.numel(), dtype=torch.bool, device="cpu")
        doomed[lowest] = True
        shrunk, start = {}, 0
        for (name, layer), ipts, uncs in zip(self.layers, self.ipt, self.unc, strict=True):
            c = self.components(layer)
            mine = doomed[start:start + c.rank]
            start += c.rank
            if not mine.any():
                continue
            slots = torch.arange(c.capacity, device="cpu")
            keep, drop = slots[:c.rank][~mine], slots[:c.rank][mine]
            order = torch.cat([keep, drop, slots[c.rank:]])
            layer.reorder(self.adapter, order)
            for t in (*ipts, *uncs):
                t.copy_(t[order.to(t.device)])
            c.rank = len(keep)
            _, e, _ = layer.factors(self.adapter)
            e[c.rank:c.rank + len(drop)] = 0.0
            c.renew_ids(slice(c.rank, c.rank + len(drop)))
            shrunk[name] = c.rank
        self.events.append({"step": step, "ranks": dict(shrunk)})
        return shrunk
