"""Reversible two-stream layer stacks (MEFT): backward reconstructs each layer's input from its output.

A reversible layer maps two streams (x1, x2) to

    y1 = lam * x1 + F(x2)
    y2 = beta * x2 + G(y1)

(and optionally swaps them), so its input can be recomputed from its output:
x2 = (y2 - G(y1)) / beta, x1 = (y1 - F(x2)) / lam. :func:`reversible_stack` runs a stack of such layers
keeping for backward only the stack's final two streams (plus the random-number state of each F and G
call when they run in training mode, so dropout masks repeat), whatever the depth. Backward walks the
layers top-down, recomputing F and G under autograd one at a time, and meets the two halves with the
fused coupling kernels (:func:`pefttorch.functional.reversible_coupling` and its backward step).

The streams stay in their own dtype (float32 by default) while F and G run in the model's dtype: the
reconstruction then only has to undo the streams' own rounding.

Why bit-identical inputs matter, and the cast guard. A reconstructed stream is off by a tiny amount, but F and G see
it cast to the model's dtype, and an element that lies within that amount of a rounding boundary casts to the
neighbouring value. Any changed input bit changes F's output by about one ulp of the model's dtype, which the
division by lam (0.1) multiplies: one such element ruins the layers below. Stream values are not spread evenly
either: sums of model-dtype values and of lam times them fall exactly on rounding ties far more often than chance
(0.2% of a float32 layer's elements, measured). So when the streams are much finer than the model's dtype (float64
streams), forward records, for every F and G input, the elements whose cast would change within a bound of their
value (:func:`cast_guard`; the bound follows the error expected at that depth, :func:`guard_bounds`, times the
largest magnitude of the layer's streams in that token: backward reconstructs a layer's inputs from its outputs,
which can be far larger, as the first layer's are than the embeddings), with the cast they had; backward puts those
values back after its own cast. F and G then see exactly their forward inputs as long as the reconstruction is off
by less than the bound, and what is left is the streams' own rounding amplified by 1/lam and 1/beta per coupling.
Forward's values are unchanged. The recorded elements are kept for backward (a 4-byte index and a value each):
measured on a 16-layer bf16 Llama-style stack of hidden 2048 (meft1), as many elements as 0.034 of one layer's
input in all (0.026 when each guard was scaled by its own input, which left the first layer wrong: error 1.6).
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import functional, ops

Context = dict  # what every F and G call receives besides its stream (attention mask, rotary tables, ...)

_forward = threading.local()  # depth of the reversible forwards running in this thread


def in_reversible_forward() -> bool:
    """Whether this thread is inside a reversible stack's forward, where the layers run without an autograd graph
    (backward recomputes them): for hooks that need the graph, to say why they did not get one."""
    return getattr(_forward, "depth", 0) > 0


@dataclass
class Block:
    """F or G of a reversible layer: ``fn(x, context)`` in the model's dtype, and the modules whose
    parameters it uses (to hand their gradients back)."""

    fn: Callable[[torch.Tensor, Context], torch.Tensor]
    modules: Sequence[nn.Module]

    def trainable_parameters(self) -> list[nn.Parameter]:
        seen, out = set(), []
        for m in self.modules:
            for p in m.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out


@dataclass
class ReversibleLayer:
    f: Block
    g: Block
    lam: float
    beta: float
    swap: bool


# Relative error of the reconstructed stack input above which backward warns: the lower layers' gradients
# are then computed from visibly wrong activations.
WARN_ERROR = 1e-3

# The cast guard (see the module's docstring). A layer's reconstruction is off by about the streams' rounding times
# the amplification of the couplings above it: per layer 1/sqrt(|lam * beta|) (each stream is divided by lam or beta
# every other coupling; measured: 10x per two layers for meft1/2, 10x per layer for meft3). Each layer's guard
# covers GUARD_MARGIN times that; where that reaches GUARD_CAP of the model dtype's spacing, the share of elements to
# record (about 2 * bound / spacing of those as large as the largest, more of smaller ones) stops being small, and
# the layers below get no guard: their reconstruction is off by more than a cast can hide, which backward's
# warning reports.
GUARD_MARGIN = 2.0**5
GUARD_CAP = 2.0**-5


def guard_bounds(layers: Sequence[ReversibleLayer], stream_dtype: torch.dtype, dtype: torch.dtype) -> list:
    """Per layer (bottom first), the bound of its cast guards relative to the largest magnitude of each input row,
    or None for no guard: none at all when the streams are the model's dtype (nothing is cast) or not far finer
    than it."""
    cap = GUARD_CAP * torch.finfo(dtype).eps
    bound = GUARD_MARGIN * torch.finfo(stream_dtype).eps
    if stream_dtype == dtype or bound > cap * 2.0**-8:
        return [None] * len(layers)
    out = []
    for layer in reversed(layers):
        out.append(bound if bound <= cap else None)
        bound /= min(1.0, abs(layer.lam * layer.beta)) ** 0.5
    return out[::-1]


def cast_guard(x: torch.Tensor, dtype: torch.dtype, bound: float,
               scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat indices, their casts) of the elements of `x` whose cast to `dtype` changes within ``bound`` times the
    scale of their row: (x - d) and (x + d) cast to different values exactly there, the cast being monotone. The
    scale of a row (a token's features) is its largest magnitude, or `scale` (one value per row) where given:
    the reconstruction error of a row follows the magnitudes it is reconstructed from, which spares the many rows
    far below a model's outlier ones. Costs one host synchronisation on a GPU (the count of such elements sizes
    the result): two per layer and step."""
    if x.numel() == 0:
        return torch.empty(0, dtype=torch.int32, device=x.device), torch.empty(0, dtype=dtype, device=x.device)
    rows = x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)
    d = (rows.abs().amax(-1, keepdim=True) if scale is None else scale) * bound
    risky = ((rows - d).to(dtype) != (rows + d).to(dtype)).reshape(-1)
    index = risky.nonzero().squeeze(1)
    if risky.numel() <= torch.iinfo(torch.int32).max:  # kept until backward: 4 bytes an index, not 8
        index = index.to(torch.int32)
    # indices in row-major order of x's elements, whatever its strides (guarded_cast writes them back so)
    return index, rows.reshape(-1)[index].to(dtype)


def guarded_cast(x: torch.Tensor, dtype: torch.dtype, guard: tuple[torch.Tensor, torch.Tensor] | None):
    """x cast to `dtype`, with the recorded elements put back to forward's casts (no gradient flows through the
    put: the cast's gradient stays the identity)."""
    # row-major (x.to would keep a transposed x's strides, and a flat index would then name another element)
    out = x.to(dtype, memory_format=torch.contiguous_format)
    if guard is not None:
        with torch.no_grad():
            out.view(-1)[guard[0]] = guard[1]
    return out


@dataclass
class ReconstructionReport:
    """What a backward through :func:`reversible_stack` learnt about its reconstruction.

    ``input_error``: the largest absolute error of the stack's input as reconstructed by backward, relative
    to the input's largest magnitude (always measured: the input is kept, one tensor whatever the depth).
    ``errors``: with ``debug``, the same per layer (bottom first); costs a copy of every layer's input, so
    for debugging only.
    """

    debug: bool = False
    input_error: float | None = None
    warned: bool = False
    errors: list[float] = field(default_factory=list)


def _relative_error(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> float:
    """The largest error of `got` against `want`, relative to want's largest magnitude, over the rows (first
    dimension: the batch) whose input is finite. A NaN or inf in a row of the user's data reconstructs that row as
    NaN whatever the arithmetic (attention spreads it along the row); counted, it blamed rounding in the once-only
    warning, which then stayed silent for a real failure later. (0.0 where no row is finite: nothing to measure.)"""
    if want[0].numel() == 0 or want[0].is_meta:  # an empty batch, or shapes only: nothing to measure
        return 0.0
    if want[0].dim() > 0:
        rows = torch.stack([w.reshape(w.shape[0], -1).isfinite().all(1) for w in want]).all(0)
        if not rows.all():
            if not rows.any():
                return 0.0
            got, want = tuple(g[rows] for g in got), tuple(w[rows] for w in want)
    scale = max(max(w.abs().max().item() for w in want), 1e-30)
    return max((g - w).abs().max().item() for g, w in zip(got, want, strict=True)) / scale


def _step(layer: ReversibleLayer, x1, x2, context, dtype, rng: list | None = None,
          guards: list | None = None, bound: float | None = None):
    """One layer forward; with `rng` a list, the random states before F and before G are appended to it; with
    `guards` a list, the cast guards of F's and G's inputs (see :func:`cast_guard`, None without `bound`)."""
    # F and G see their input cast as backward's recomputation casts it (guarded_cast, row-major): a strided input
    # (a transposed stream) made another matmul path round F's output otherwise, and x1 was reconstructed with it
    if rng is not None:
        rng.append(_RngState(x1.device))
    y1 = functional.reversible_coupling(x1, layer.f.fn(guarded_cast(x2, dtype, None), context), layer.lam)
    if rng is not None:
        rng.append(_RngState(x1.device))
    y2 = functional.reversible_coupling(x2, layer.g.fn(guarded_cast(y1, dtype, None), context), layer.beta)
    if guards is not None:
        # Backward reconstructs F's input x2 from y2 and G(y1), and G's input y1 from the layer above, so their
        # errors follow the layer's largest magnitudes, not their own: on a 16-layer Llama the embedding output
        # (layer 0's input) is 47x smaller than layer 0's output, and a guard scaled by it missed (error 3.0).
        if bound is None:
            guards += [None, None]
        else:
            scale = _row_scale(x1, x2, y1, y2)
            guards += [cast_guard(x2, dtype, bound, scale), cast_guard(y1, dtype, bound, scale)]
    return (y2, y1) if layer.swap else (y1, y2)


def _row_scale(*streams: torch.Tensor) -> torch.Tensor:
    """Per row (token), the largest magnitude in any of the streams: (rows, 1)."""
    scale = None
    for t in streams:
        m = t.reshape(-1, t.shape[-1]).abs().amax(-1, keepdim=True) if t.dim() else t.abs().reshape(1, 1)
        scale = m if scale is None else torch.maximum(scale, m)
    return scale


class _RngState:
    """The CPU generator's state and that of the stream's CUDA device, to replay dropout in backward."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def replay(self):
        with torch.random.fork_rng(devices=[self.device] if self.cuda is not None else []):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


class _Run:
    """What the autograd function needs besides tensors: the layers, their context, and the settings of
    the forward pass that backward must repeat (autocast, random states)."""

    def __init__(self, layers, context, dtype, params, report):
        self.layers, self.context, self.dtype, self.report = layers, context, dtype, report
        self.params = params
        self.index = {id(p): i for i, p in enumerate(params)}
        self.rng: list[list[_RngState] | None] = []  # per layer: the states before F and G, if replayed
        # with report.debug, every layer's input as forward saw it: kept per call (with the graph, freed with it),
        # so forwards that never see a backward, or several before one (gradient accumulation), do not mix
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] = []


class _ReversibleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: _Run, x1, x2, *params):
        device = x1.device
        inputs = (x1,) if x1 is x2 else (x1, x2)
        # (the meta device has no autocast, and asking about it raises: off there)
        on = device.type != "meta" and torch.is_autocast_enabled(device.type)
        ctx.autocast = (device.type, on, torch.get_autocast_dtype(device.type) if on else None)
        # Random state only matters when some module draws random numbers (dropout in training mode): any module
        # inside F and G, not only the blocks' own (model.eval() with the adapters' dropout kept on drew other masks
        # in backward). Each module once: meft3's F and G share their layer, meft1's F holds G's adapter.
        blocks = dict.fromkeys(m for layer in run.layers for m in (*layer.f.modules, *layer.g.modules))
        replay = any(m.training for block in blocks for m in block.modules())
        bounds = guard_bounds(run.layers, x1.dtype, run.dtype)
        guards: list = []
        _forward.depth = getattr(_forward, "depth", 0) + 1
        try:
            for layer, bound in zip(run.layers, bounds, strict=True):
                if run.report.debug:
                    run.inputs.append((x1.clone(), x2.clone()))
                states = [] if replay else None
                x1, x2 = _step(layer, x1, x2, run.context, run.dtype, states, guards, bound)
                run.rng.append(states)
        finally:
            _forward.depth -= 1
        ctx.run = run
        # The stack's outputs, all that backward needs whatever the depth, its input, to measure how well backward
        # reconstructs it, and the cast guards (a small share of an activation per layer), two entries per F and G
        # call, None for no guard.
        ctx.save_for_backward(x1, x2, *inputs, *(t for g in guards for t in (g or (None, None))))
        ctx.num_inputs = len(inputs)
        return x1, x2

    @staticmethod
    @ops.first_order_only("a reversible (MEFT) stack")  # backward recomputes F and G for first-order vjps only
    def backward(ctx, grad1, grad2):
        run: _Run = ctx.run
        o1, o2, *rest = ctx.saved_tensors
        inputs, kept = rest[: ctx.num_inputs], rest[ctx.num_inputs:]
        guards = [None if index is None else (index, values)
                  for index, values in zip(kept[::2], kept[1::2], strict=True)]
        grad1 = torch.zeros_like(o1) if grad1 is None else grad1
        grad2 = torch.zeros_like(o2) if grad2 is None else grad2
        grads: list[torch.Tensor | None] = [None] * len(run.params)
        device_type, enabled, dtype = ctx.autocast

        def vjp(block: Block, rng, guard, x, grad_out):
            """Recomputes block(x) under autograd (its input cast as forward cast it, see :func:`guarded_cast`);
            returns (output, d out/d x ^T grad_out) and accumulates the gradients of the block's parameters."""
            params = [p for p in block.trainable_parameters() if id(p) in run.index]
            with contextlib.ExitStack() as stack:
                if rng is not None:
                    stack.enter_context(rng.replay())
                stack.enter_context(torch.enable_grad())
                if device_type != "meta":  # no autocast there (see forward)
                    stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
                x = x.detach().requires_grad_()
                out = block.fn(guarded_cast(x, run.dtype, guard), run.context)
                results = torch.autograd.grad(out, [x, *params], grad_out.to(out.dtype), allow_unused=True)
            for p, g in zip(params, results[1:], strict=True):
                if g is not None:
                    i = run.index[id(p)]
                    grads[i] = g if grads[i] is None else grads[i] + g
            dx = results[0] if results[0] is not None else torch.zeros_like(x)
            return out.detach(), dx

        errors: list[float] = []
        for i in reversed(range(len(run.layers))):
            layer, rng = run.layers[i], run.rng[i]
            rng_f, rng_g = rng if rng is not None else (None, None)
            (y1, y2), (dy1, dy2) = ((o2, o1), (grad2, grad1)) if layer.swap else ((o1, o2), (grad1, grad2))
            # G's half: x2 = (y2 - G(y1)) / beta; y1's gradient gains G's vector-Jacobian product.
            g, v = vjp(layer.g, rng_g, guards[2 * i + 1], y1, dy2)
            x2, dx2, dy1 = ops.reversible_coupling_backward(y2, g, dy2, dy1, v, layer.beta)
            # F's half: x1 = (y1 - F(x2)) / lam; x2's gradient gains F's.
            f, v = vjp(layer.f, rng_f, guards[2 * i], x2, dy1)
            x1, dx1, dx2 = ops.reversible_coupling_backward(y1, f, dy1, dx2, v, layer.lam)
            if run.report.debug:
                errors.insert(0, _relative_error((x1, x2), run.inputs[i]))
            o1, o2, grad1, grad2 = x1, x2, dx1, dx2
        if run.report.debug:
            run.report.errors = errors  # this backward's
        error = _relative_error((o1, o2), (inputs[0], inputs[-1]))
        run.report.input_error = error
        if not error <= WARN_ERROR and not run.report.warned:
            run.report.warned = True  # once per report (per model): training would repeat it every step
            warnings.warn(
                f"reversible backward: the reconstructed input of the {len(run.layers)} reversible layers is off by "
                f"{error:.1e} (relative), so the lower layers' gradients are inaccurate. Each layer amplifies "
                "rounding errors by 1/lam and 1/beta: make fewer layers reversible or use float64 streams "
                "(see MeftConfig's num_rev_layers and stream_dtype). Said once; the reconstruction error of each "
                "backward stays readable (model.reconstruction_error()).", stacklevel=2)
        return None, grad1, grad2, *grads


def reversible_stack(layers: Sequence[ReversibleLayer], x1: torch.Tensor, x2: torch.Tensor, context: Context,
                     dtype: torch.dtype, *, reversible: bool = True,
                     report: ReconstructionReport | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs `layers` on the streams (x1, x2) (of one dtype, the stream dtype); F and G get their input cast to
    `dtype`. With ``reversible`` (and a gradient to compute) backward reconstructs activations instead
    of keeping them; otherwise autograd caches them as usual (same values, for comparison and for
    inference). Tensors in `context` must not need gradients: nothing would carry them back. `report`, if
    given, receives what backward measures of its reconstruction (see :class:`ReconstructionReport`)."""
    for name, t in (("x1", x1), ("x2", x2)):
        if not t.is_floating_point():
            raise TypeError(f"reversible_stack: the streams must be floating point, got {name} of {t.dtype}")
    # One stream dtype: backward's coupling step forms both streams' gradients in the dtype of the stream it
    # reconstructs, and the cast guard is sized for one stream dtype (guard_bounds). Mixed streams ran forward and
    # crashed in backward (MEFT passes one tensor as both). Refused without a gradient too: a stack that runs in
    # inference and fails in training would only defer the error.
    if x1.dtype != x2.dtype:
        raise TypeError(f"reversible_stack: the two streams must have one dtype, got x1 of {x1.dtype} and x2 of "
                        f"{x2.dtype} (the reversible backward reconstructs both in one stream dtype); cast one to the "
                        "other's, e.g. x2.to(x1.dtype)")
    # the kernels' rule (ops.coupling_scale_ok: each coupling divides by it in backward), said with the layer's name
    # for it before anything runs; float32 is the compute dtype unless the streams are float64
    compute = ops.opmath_dtype(x1.dtype)
    for i, layer in enumerate(layers):
        for name in ("lam", "beta"):
            value = getattr(layer, name)
            if not ops.coupling_scale_ok(value, compute):
                raise ValueError(f"reversible_stack: layer {i}'s {name} must be finite and nonzero, a normal number "
                                 f"of {str(compute).removeprefix('torch.')} (the kernels' compute dtype for these "
                                 f"streams), got {value}")
    params: list[nn.Parameter] = []
    seen: set[int] = set()
    for layer in layers:
        for p in (*layer.f.trainable_parameters(), *layer.g.trainable_parameters()):
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    needs_grad = torch.is_grad_enabled() and (x1.requires_grad or x2.requires_grad or len(params) > 0)
    if not (reversible and needs_grad):
        for layer in layers:
            x1, x2 = _step(layer, x1, x2, context, dtype)
        return x1, x2
    for name, value in context.items():
        for t in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                raise ValueError(f"reversible layers: {name} requires grad, but the reversible backward "
                                 "carries gradients only to the streams and the layers' parameters")
    report = ReconstructionReport() if report is None else report
    report.errors.clear()
    return _eager_apply(_Run(list(layers), context, dtype, params, report), x1, x2, *params)


def _reversible_apply(run: _Run, x1, x2, *params):
    return _ReversibleFunction.apply(run, x1, x2, *params)


# The stack runs eagerly even inside torch.compile: backward recomputes F and G eagerly (autograd calls it outside any
# compiled frame), and a forward compiled into other kernels would round differently, an error the reconstruction
# then multiplies by 1/lam per layer (measured: 1e-5 instead of 1e-13 on two layers).
_EAGER = ("MEFT's reversible stack runs eagerly by design (its backward recomputes the layers eagerly, and compiled "
          "kernels would round differently); compile the model without fullgraph=True")
# torch._disable_dynamo imports dynamo at the first call, not here (seconds that `import pefttorch` should not cost),
# but takes no reason; eager_under_compile() puts dynamo's own disable, which does, in its place
_eager_apply = torch._disable_dynamo(_reversible_apply)


def eager_under_compile() -> None:
    """Called where a reversible model is built: under torch.compile(fullgraph=True) the stack's refusal then says
    why (dynamo's message named a skipped function of torch's)."""
    global _eager_apply
    import torch._dynamo

    if getattr(_eager_apply, "_torchdynamo_disable_msg", None) != _EAGER:
        _eager_apply = torch._dynamo.disable(_reversible_apply, reason=_EAGER)
