"""User-level functions over pefttorch's fused ops."""

from __future__ import annotations

import math

import torch

from . import ops


def draw_seed(generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh 63-bit dropout seed as a CPU int64 tensor, drawn from `generator` (default: torch's).

    Drawing it from torch's generator makes dropout reproducible under torch.manual_seed, and keeping
    it a tensor lets torch.compile trace the draw instead of breaking the graph on a Python int.
    """
    if generator is not None and not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1:
        # a forward run inside backward is activation checkpointing's recomputation (reentrant or not): it restores
        # torch's global RNG state only, so this generator would give another seed, another mask than the forward's
        # output was computed with, and gradients silently wrong
        raise RuntimeError("dropout with generator= cannot be recomputed by activation checkpointing, which replays "
                           "torch's global RNG only (the mask would differ from the forward's); leave generator "
                           "unset (torch.manual_seed makes dropout reproducible) or do not checkpoint this call")
    return torch.randint(0, 2**63 - 1, (), dtype=torch.int64, device="cpu", generator=generator)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scaling: float = 1.0,
    dropout: float = 0.0,
    training: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fused LoRA linear layer: ``x W^T + b + scaling * dropout(x) A^T B^T``.

    Args:
        x: input of shape ``(..., in_features)``; any strides.
        weight: base weight ``(out_features, in_features)``; differentiated only if it requires grad.
        lora_a: down projection ``A`` of shape ``(r, in_features)``.
        lora_b: up projection ``B`` of shape ``(out_features, r)``.
        bias: optional ``(out_features,)``.
        scaling: factor of the low-rank update (``lora_alpha / r`` in LoRA).
        dropout: probability of zeroing an element of x on the low-rank path only, in [0, 1).
        training: dropout is applied only when True.
        generator: CPU generator the dropout seed is drawn from (default: torch's global one).

    All tensors must share one dtype (float32, float16, bfloat16 or float64) and one device; under
    torch.autocast they are cast to the autocast dtype, as F.linear's inputs would be (float64 is left alone, as
    autocast leaves it). The mask
    is regenerated in backward from a seed, never stored; only x and the ``(tokens, r)`` product
    ``dropout(x) A^T`` are kept for backward, and only when a gradient needs them.
    """
    p, seed = dropout_seed("lora_linear", dropout, training, generator)
    scaling = _finite_scale("lora_linear", "scaling", scaling, x.dtype)
    return in_compute_dtype(lambda x, weight, lora_a, lora_b, bias: ops.lora_linear_forward(
        x, weight, lora_a, lora_b, bias, scaling, p, seed)[0], x, weight, lora_a, lora_b, bias)


def _number(op: str, name: str, value) -> float:
    """`value` as a float; a string is refused in words naming `op` and `name` (float() would parse it), and so is a
    tensor that would get a gradient (grad mode on and it requires grad: the ops take the number as a constant, and
    its gradient was lost in silence) or any tensor under torch.compile (float() of a traced tensor failed deep
    inside dynamo)."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{op}: {name} must be a number, got {value!r}")
    if isinstance(value, torch.Tensor):
        if torch.compiler.is_compiling():
            raise TypeError(f"{op}: {name} must be a Python number under torch.compile, got a tensor (a graph break, "
                            "an error under fullgraph=True): pass a number into the compiled function")
        if value.requires_grad and torch.is_grad_enabled():
            raise TypeError(f"{op}: {name} must be a Python number; got a tensor that requires grad (the op takes "
                            f"{name} as a constant: no gradient would reach it); pass float(t)")
    return float(value)


def _finite_scale(op: str, name: str, value, dtype: torch.dtype | None = None) -> float:
    """`value` as a float; a string, NaN or inf, or (for tensors of `dtype` other than float64, which the kernels
    compute in float32) a value beyond float32's range is refused in words naming `op` and `name` (a NaN scale made
    every output NaN; 1e39 failed in an ATen call naming neither). Checked in eager calls: under torch.compile with
    dynamic shapes the value is symbolic, which math.isfinite cannot trace (a graph break per call, an error under
    fullgraph); there the op's fake kernel checks what it is given (a compiled call need not follow an eager one)."""
    value = _number(op, name, value)
    if not torch.compiler.is_compiling():
        if not math.isfinite(value):
            raise ValueError(f"{op}: {name} must be finite, got {value}")
        if dtype not in (None, torch.float64) and abs(value) > torch.finfo(torch.float32).max:
            raise ValueError(f"{op}: {name}={value} is beyond float32's range, in which {dtype} tensors compute")
    return value


def dropout_seed(name: str, dropout: float, training: bool,
                 generator: torch.Generator | None = None) -> tuple[float, torch.Tensor | None]:
    """(probability in effect, seed) of a LoRA dropout: p = 0 and no seed outside training or without dropout;
    a dropout outside [0, 1) is an error naming `name`."""
    dropout = _number(name, "dropout", dropout)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{name}: dropout must be in [0, 1), got {dropout}")
    p = dropout if training else 0.0
    return p, (draw_seed(generator) if p > 0.0 else None)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype torch.autocast computes in on this device type now; None when it is off, or on meta tensors (which
    have no autocast: asking torch.is_autocast_enabled about them raises). The device type is compared by name, not
    asked of torch.amp.is_autocast_available, which torch.compile cannot trace (a graph break, an error under
    fullgraph)."""
    if device_type == "meta" or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def in_compute_dtype(fn, x: torch.Tensor, *tensors: torch.Tensor | None):
    """``fn(x, *tensors)``, computed as F.linear computes under torch.autocast: with autocast on, x and the tensors
    (None passes through) are cast to its dtype and autocast is off inside, since pefttorch's ops are not
    autocast-aware and their GEMMs must not be cast a second time; with it off, as given. As autocast, it leaves
    float64 tensors alone (a float64 model under autocast computes in float64)."""
    device_type = x.device.type
    dtype = _autocast_dtype(device_type)
    if dtype is None:
        return fn(x, *tensors)
    cast = [t.to(dtype) if t is not None and t.dtype != torch.float64 else t for t in (x, *tensors)]
    with torch.autocast(device_type, enabled=False):
        return fn(*cast)


def plain_tensor(t: torch.Tensor | None) -> bool:
    """Whether pefttorch's ops may read `t`: a plain tensor (or one being traced by torch.compile/export). A tensor
    subclass with a dispatch of its own (torchao's quantized weights, DTensor under tensor parallelism) implements
    the aten ops a linear layer calls, not pefttorch's: the op failed on it with the subclass's NotImplementedError."""
    cls = type(t)
    if t is None or cls is torch.nn.Parameter or cls is torch.Tensor or cls.__torch_dispatch__ is _PLAIN_DISPATCH:
        return True
    from torch._subclasses.fake_tensor import FakeTensor  # (imported here: rare, and it is not a light import)
    from torch._subclasses.functional_tensor import FunctionalTensor

    return isinstance(t, (FakeTensor, FunctionalTensor))


_PLAIN_DISPATCH = torch.Tensor.__torch_dispatch__  # what a subclass with only __torch_function__ (or none) inherits


@torch.no_grad()
def merge_lora_(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, *,
                sign: float = 1.0, fan_in_fan_out: bool = False) -> None:
    """``weight += sign * scaling * B A`` in place (transposed if the weight is stored (in, out)).

    The update is formed in float32 (float64 for float64 weights) and rounded once into the weight's
    dtype, so merging and then unmerging (sign -1) restores the weight up to that rounding.
    """
    op = "merge_lora_"
    if not plain_tensor(weight):
        raise TypeError(f"{op}: the weight is of type {type(weight).__name__}, a tensor subclass (a quantized weight?) "
                        "that pefttorch cannot merge into; dequantize it first, or keep the adapter unmerged")
    for name, t in (("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        if not t.is_floating_point() or t.dim() != 2:
            raise ValueError(f"{op}: {name} must be a 2-D floating-point tensor, got {t.dtype} of shape "
                             f"{list(t.shape)}")
        if t.device != weight.device:
            raise ValueError(f"{op}: {name} is on {t.device} but weight is on {weight.device}")
    # without these checks a (2, 1) lora_a broadcast: every column got one update
    out_features, in_features = weight.shape[::-1] if fan_in_fan_out else weight.shape
    if lora_a.shape[1] != in_features or lora_b.shape != (out_features, lora_a.shape[0]):
        raise ValueError(f"{op}: lora_a (r, in_features) and lora_b (out_features, r) must fit a weight of "
                         f"{out_features} x {in_features} (out x in), got {list(lora_a.shape)} and "
                         f"{list(lora_b.shape)}")
    # a NaN would fill the weight with NaN for good, a scale beyond the float32 it is formed in with inf
    scaling = _finite_scale(op, "scaling", scaling, weight.dtype)
    sign = _finite_scale(op, "sign", sign)
    scaling = _finite_scale(op, "sign * scaling", sign * scaling, weight.dtype)
    acc = ops.opmath_dtype(weight.dtype)
    delta = (lora_b.to(acc) @ lora_a.to(acc)) * scaling
    if fan_in_fan_out:
        delta = delta.t()
    weight.copy_(weight.to(acc) + delta)


def density_loss(
    a: torch.Tensor, eps: float = 1e-7, threshold: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """DEFT's density loss of activations `a` and their measured density, in one pass over `a`.

    Returns ``(loss, density)``: ``loss = mean(a^2 / (a^2 + eps))``, a smooth count of the non-zero
    activations (differentiable in `a`), and ``density``, the share of ``|a| > threshold`` (default
    ``sqrt(eps)``, where each term of the loss is 1/2). Both are 0-dim float32 tensors (float64 for
    float64 `a`). Backward makes one more pass over `a` and keeps nothing but `a` itself.
    """
    eps = _number("density_loss", "eps", eps)
    threshold = default_density_threshold(eps) if threshold is None else _number("density_loss", "threshold", threshold)
    return ops.density_loss(a, eps, threshold)


def default_density_threshold(eps: float) -> float:
    """|a| above which an activation counts as active: sqrt(eps), where a^2 / (a^2 + eps) = 1/2."""
    eps = _number("density_loss", "eps", eps)
    if torch.compiler.is_compiling():  # maybe symbolic: the op's fake kernel checks it (see _finite_scale)
        return abs(eps) ** 0.5  # (abs: a negative eps reaches that check, not a complex threshold)
    # sqrt of a negative eps is complex, which the op's schema then refuses in words about that; an infinite one
    # makes every gradient NaN
    if not (eps > 0.0 and math.isfinite(eps)):
        raise ValueError(f"density_loss: eps must be positive and finite, got {eps}")
    return eps ** 0.5


def sparse_mlp(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_down_t: torch.Tensor,
    *,
    b_in: torch.Tensor | None = None,
    w_up: torch.Tensor | None = None,
    b_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    activation: str = "relu",
    threshold: float = 0.0,
) -> torch.Tensor:
    """An MLP that treats activations of magnitude <= `threshold` as zero and skips those neurons.

    ``g = activation(x W_in^T + b_in)``; for a gated MLP (`w_up` given) ``h = g * (x W_up^T + b_up)``,
    otherwise ``h = g``; ``y = mask(h) W_down_t + b_down`` where the mask zeroes ``|g| <= threshold`` (a NaN
    gate stays, so it propagates as in the dense MLP).

    Args:
        x: ``(..., hidden)``.
        w_in, w_up: ``(intermediate, hidden)``, as an nn.Linear's weight.
        w_down_t: the down projection *transposed*, ``(intermediate, out)``, so an active neuron's row is
            contiguous (store it that way once; :class:`pefttorch.nn.SparseMLP` does).
        activation: ``"relu"``, ``"gelu"``, ``"gelu_tanh"`` or ``"silu"``.
        threshold: >= 0. At 0 the result equals the dense MLP up to rounding.

    For up to 16 tokens (decode) the kernels compute the gate for every neuron and the up and down
    projections only for active ones; above that, or (on the CPU) when most neurons are active, a dense
    path with the same mask. Inference only: when a gradient is needed the pure-PyTorch reference computes it.
    """
    threshold = _number("sparse_mlp", "threshold", threshold)
    tensors = (x, w_in, b_in, w_up, b_up, w_down_t, b_down)

    def op(*tensors):
        return ops.sparse_mlp(*tensors, activation, threshold)

    # The op has no derivative: the reference computes when a gradient is needed, in reverse mode or in forward mode
    # (dual tensors need not require grad: the op dropped their tangents without a word)
    if ((torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))
            or torch.autograd.forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active()):
        from . import reference

        # The op's checks of every argument (shapes, dtypes, devices, activation, threshold, b_up without w_up), run
        # on no tokens: the reference checks none of them (a down projection not transposed got a bare shape error).
        with torch.no_grad():
            in_compute_dtype(op, x.detach().new_empty((0, x.shape[-1])) if x.dim() else x.detach(), *tensors[1:])
        # under autocast in its dtype, as the op computes (the reference added a float32 bias to a bf16 product)
        return in_compute_dtype(lambda *t: reference.sparse_mlp(*t, activation, threshold), *tensors)
    # under autocast: all in its dtype, as the dense MLP's linears compute (the op's sparse and dense paths alike)
    return in_compute_dtype(op, *tensors)


def reversible_coupling(x: torch.Tensor, f: torch.Tensor, scale: float) -> torch.Tensor:
    """One half of a reversible layer (MEFT): ``y = scale * x + f``.

    Args:
        x: the stream this half updates, in the stream's dtype (usually float32); any shape and strides.
        f: ``F`` or ``G`` applied to the other stream, of x's shape and device, in any float dtype (usually
            the model's, bfloat16 or float16).
        scale: the coupling factor (MEFT's lambda or beta); finite and nonzero, since the input is reconstructed
            in backward as ``x = (y - f) / scale``.

    Returns ``y`` in x's dtype, formed in float32 (float64 for a float64 stream) and rounded once. The
    gradients are ``scale * grad_y`` for x (in x's dtype) and ``grad_y`` for f (in f's dtype); nothing is
    saved for backward. A reversible block's own backward uses :func:`pefttorch.ops.reversible_coupling_backward`
    to reconstruct x and update both streams' gradients in one pass.
    """
    return ops.reversible_coupling(x, f, _number("reversible_coupling", "scale", scale))


def bottleneck_adapter(
    x: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    b_down: torch.Tensor | None = None,
    b_up: torch.Tensor | None = None,
    *,
    residual: torch.Tensor | None = None,
    activation: str = "relu",
    scale: float = 1.0,
) -> torch.Tensor:
    """A bottleneck adapter with its residual, fused: ``y = scale * (act(x W_down^T + b_down) W_up^T + b_up)
    [+ residual]``.

    Args:
        x: the adapter's input ``(..., d_in)``; any strides.
        w_down: down projection ``(m, d_in)``; ``b_down`` optional ``(m,)``.
        w_up: up projection ``(d_out, m)``; ``b_up`` optional ``(d_out,)``.
        residual: added to the output, of y's shape ``(..., d_out)``, any strides: the block's output for a parallel
            adapter, or ``x`` itself for a sequential (Houlsby, Pfeiffer) one, ``out = x + f(x)``. Passing x itself
            (``residual is x``) tells the op to add its own input, so that x's two gradients (through the adapter
            and through the residual) are formed in one buffer; it needs ``d_out == d_in``.
        activation: ``"relu"``, ``"gelu"``, ``"gelu_tanh"`` or ``"silu"``.
        scale: factor of the adapter's output (finite; 0 switches the adapter off).

    All tensors must share one dtype (float32, float16, bfloat16 or float64) and one device; under torch.autocast
    they are all cast to the autocast dtype (the residual and x included; float64 is left alone), as F.linear's
    inputs would be, and y comes in it. The activation ``act(h)`` is never stored: backward recomputes it from
    ``h = x W_down^T + b_down`` (tokens x m), which is kept; x is kept only when w_down needs a gradient. The
    residual's gradient is the incoming gradient itself, passed on without a copy. See
    :func:`pefttorch.reference.bottleneck_adapter` for the definition.
    """
    from . import reference

    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"bottleneck_adapter: unsupported activation {activation!r}; supported: "
                         f"{', '.join(reference.ACTIVATIONS)}")
    scale = _finite_scale("bottleneck_adapter", "scale", scale, x.dtype)
    add_input = residual is x
    if add_input:
        residual = None

    def run(x, w_down, b_down, w_up, b_up, residual):
        return ops.bottleneck_adapter_forward(x, w_down, b_down, w_up, b_up, residual, add_input, activation, scale)[0]

    return in_compute_dtype(run, x, w_down, b_down, w_up, b_up, residual)  # as F.linear under autocast


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb`` (Llama and the models built like it), one kernel per tensor.

    Args:
        q, k: (batch, heads, tokens, head_dim), any strides, head_dim even (k may have fewer heads).
        cos, sin: (batch, tokens, head_dim), of q's dtype as transformers' rotary embedding module returns them
            (a wider dtype promotes q and k to it, as transformers' formula does).
        unsqueeze_dim: where cos and sin get the heads dimension, as in transformers.

    Returns ``(q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin)``, contiguous, each element formed
    in float32 and rounded once (transformers' separate operations round three times: in bf16 outputs can differ
    by one unit in the last place). The gradient w.r.t. q and k is the transposed rotation, the same kernel; x
    itself is not kept for backward.
    """
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    # the kernel returns x's dtype, transformers' `q * cos + ...` the promoted one (.to is free when they agree)
    q, k = q.to(torch.promote_types(q.dtype, cos.dtype)), k.to(torch.promote_types(k.dtype, cos.dtype))
    return ops.rotary_embedding(q, cos, sin, False), ops.rotary_embedding(k, cos, sin, False)
