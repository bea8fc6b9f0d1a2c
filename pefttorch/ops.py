"""Python side of the custom ops: fake (meta) kernels for torch.compile, and autograd formulas.

The schemas and the CPU/CUDA kernels are registered by the compiled extension (csrc/bindings.cpp);
this module adds what PyTorch needs to trace and differentiate them, and typed wrappers.
"""

from __future__ import annotations

import functools
import math

import torch

from . import _extension
from .reference import ACTIVATIONS, opmath_dtype

_C = _extension.load()

_ops = torch.ops.pefttorch


def _register_autograd(name: str, backward, setup_context):
    """Registers `backward` / `setup_context` as the op's autograd formula (torch.library.register_autograd: what
    torch.compile, opcheck and direct ``torch.ops.pefttorch`` calls use), and returns the function the typed
    wrappers below call: in eager mode, with a gradient to record, it runs the same formula as an
    autograd.Function that calls the op below autograd.

    Why not the registration alone: torch.library's autograd wrapper rebuilds the op's argument list from its
    schema on every call (``torch._library.utils.fill_defaults``, a Python loop over the schema's arguments), about
    a third of a small call's 45-50 us on a CPU. The wrappers pass every argument, so there is nothing to fill in.
    """
    torch.library.register_autograd(f"pefttorch::{name}", backward, setup_context=setup_context)
    op = getattr(_ops, name).default

    def below_autograd(*args):
        with torch._C._AutoDispatchBelowAutograd():  # straight to the CPU / CUDA kernel
            return op(*args)

    # forward takes ctx and calls setup_context itself: an autograd.Function with a separate setup_context binds
    # its arguments with inspect.signature on every apply (another ~20 us)
    def forward(ctx, *args):
        output = below_autograd(*args)
        setup_context(ctx, args, output)
        return output

    def jvp(ctx, *tangents):
        raise NotImplementedError(
            f"pefttorch::{name} has no forward-mode derivative (torch.func.jvp, jacfwd, hessian, "
            "torch.autograd.forward_ad); use reverse mode: backward(), torch.func.grad, vjp or jacrev")

    function = type(f"{name}_autograd", (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(backward), "jvp": staticmethod(jvp)})

    # torch.func (grad, jacrev, vmap over grad: per-sample gradients) accepts only an autograd.Function with a
    # separate setup_context, and so does not torch.library's own wrapper; this variant serves that case alone,
    # so eager calls keep the cheaper one. vmap runs forward and backward per sample (the ops have no batching
    # rule: functorch's fallback loops over the batch)
    func_function = type(f"{name}_func_autograd", (torch.autograd.Function,), {
        "forward": staticmethod(below_autograd), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward), "jvp": staticmethod(jvp), "generate_vmap_rule": True})

    def call(*args):
        if torch.compiler.is_compiling():
            if torch._C._are_functorch_transforms_active():
                return func_function.apply(*args)  # torch.compile over torch.func: as eager torch.func
            return op(*args)  # traced: the registered op and formula
        if torch.jit.is_tracing():
            # torch.jit.trace records the registered op (a TorchScript-callable schema op, with its formula) alike
            # with and without grad; an autograd.Function here made the two traces its check compares differ
            return op(*args)
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            # (under torch.func.grad the inputs it differentiates require grad, so only this branch asks)
            return (func_function if torch._C._are_functorch_transforms_active() else function).apply(*args)
        if torch.autograd.forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active():
            # Dual tensors (forward AD, torch.func.jvp) need not require grad, and below autograd their tangents
            # would be dropped without a word: the Function's jvp refuses them instead. (Under vmap alone the
            # Function's generated rule runs the op per entry, as the fallback below would.)
            return func_function.apply(*args)
        # Nothing to record (no_grad, inference, or inside another autograd.Function's forward): below autograd
        # directly. Through the registration, torch.library's Python redispatch would cost ~50 us a call.
        return below_autograd(*args)

    return call


class _Refused(torch.autograd.Function):
    """Hands `values` on as outputs whose derivative raises `message`. The outputs' graph edges lead to `inputs`
    (what the values depend on), so a gradient taken with respect to any of those reaches the error;
    torch.autograd.function.once_differentiable's error node hangs off fresh leaves instead, which
    torch.autograd.grad(..., inputs) never visits: its second derivative came out zero, or "unused". A separate
    setup_context and a generated vmap rule make it usable under torch.func too, where functorch records it at
    every level whose tensors need a gradient (an ordinary autograd graph around torch.func.grad included)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(message, values, *inputs):
        return tuple(None if v is None else v.detach() for v in values)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.message = inputs[0]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


def _needs_grad_at_any_level(t: torch.Tensor) -> bool:
    """Whether `t` requires grad at its own level or at one beneath (under torch.func a wrapper answers for its level
    alone: the incoming gradient of torch.func.grad run inside an ordinary autograd graph requires grad only there)."""
    while not t.requires_grad:
        if not torch._C._functorch.is_functorch_wrapped_tensor(t):
            return False
        t = torch._C._functorch.get_unwrapped(t)
    return True


def first_order_only(name: str):
    """Decorates the backward of an autograd.Function whose formula calls our backward kernels, which have no
    derivative of their own: a second derivative through it (create_graph=True: gradient penalties, hessians)
    raises a clear error naming `name`, where it would otherwise come out silently zero, or fail inside an ATen
    call that names neither the op nor the reason.

    torch.autograd.function.once_differentiable does this only when an incoming gradient requires grad; here the
    saved tensors count too (density_loss's gradient depends on `a` alone: its incoming gradient is a constant).
    A formula whose gradient depends on an input it does not keep sets ``ctx.unkept_dependence`` (the bottleneck
    adapter's gradients, through act'(h), on x, which it keeps only for w_down's gradient): no error node could
    reach that input, so a backward with create_graph=True is refused as it runs. Not under torch.func, which
    always differentiates with create_graph=True (a first derivative there is no reason to refuse): its reverse
    over reverse is caught by the levels below, all but an ordinary graph around torch.func.grad that reaches
    the op only through such an x (a known gap)."""

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            if not torch.is_grad_enabled():  # a plain backward (no create_graph): nothing to guard
                return backward(ctx, *grads)
            message = (f"{name} has no second derivative: its gradient cannot be differentiated again "
                       "(create_graph=True, gradient penalties, hessians, nested torch.func.grad / jacrev)")
            tensors = [t for t in (*grads, *ctx.saved_tensors) if isinstance(t, torch.Tensor)]
            if torch._C._are_functorch_transforms_active():
                # torch.func.grad always differentiates with create_graph=True, and its tensors cannot be marked as
                # below. Reverse over reverse is refused here and now: a second grad-type level around the one this
                # backward serves (jacrev or grad of grad), or one around a level that has already exited, as in
                # jacrev(jacrev(f)) or vjp of vjp, whose inner backward runs after its level is gone: its tensors
                # are then dead wrappers (level -2). Anything else that differentiates the result (an ordinary
                # autograd graph around torch.func.grad, autograd.grad(create_graph=True) inside it) reaches the
                # error node below, which functorch records at every level.
                levels = torch._functorch.pyfunctorch.retrieve_all_functorch_interpreters()
                grad_levels = sum(level.key() == torch._C._functorch.TransformType.Grad for level in levels)
                dead = any(torch._C._functorch.maybe_get_level(t) == -2 for t in tensors)
                if grad_levels > 1 or (grad_levels == 1 and dead):
                    raise RuntimeError(message)
                outputs = backward(ctx, *grads)
            else:
                if getattr(ctx, "unkept_dependence", False):
                    raise RuntimeError(message)
                with torch.no_grad():
                    outputs = backward(ctx, *grads)
            inputs = [t for t in tensors if _needs_grad_at_any_level(t)]
            return _Refused.apply(message, outputs, *inputs) if inputs else outputs

        return wrapper

    return decorate


def _register_loop_vmap(name: str) -> None:
    """torch.vmap rule for a backward op with optional (None) outputs, which functorch's generic fallback refuses:
    the op once per batch entry, outputs stacked. This is what the fallback does for the other ops, and what
    per-sample gradients (vmap over torch.func.grad) need."""
    op = getattr(_ops, name).default

    def rule(info, in_dims, *args):
        per_entry = [op(*(a.select(d, i) if isinstance(d, int) else a for a, d in zip(args, in_dims, strict=True)))
                     for i in range(info.batch_size)]
        stacked = tuple(None if outs[0] is None else torch.stack(outs) for outs in zip(*per_entry, strict=True))
        return stacked, tuple(None if t is None else 0 for t in stacked)

    torch.library.register_vmap(f"pefttorch::{name}", rule)


for _name in ("lora_linear_backward", "ranked_lora_factors_backward", "bottleneck_adapter_backward"):
    _register_loop_vmap(_name)


def no_legacy_batching(name: str):
    """Decorates the backward of an op whose backward kernel has optional outputs (those above): under torch's
    legacy vmap, which torch.autograd.grad(is_grads_batched=True) and torch.autograd.functional.jacobian(
    vectorize=True) batch a backward with, it raises an error saying what to use instead. That vmap takes no
    registered rule (the one above is torch.func's) and its generic fallback cannot run an op with optional
    outputs: the error named our internal backward op and no way out."""

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            if any(isinstance(g, torch.Tensor) and torch._C._functorch.is_legacy_batchedtensor(g) for g in grads):
                raise RuntimeError(
                    f"{name}'s gradient cannot be batched by torch.autograd.grad(is_grads_batched=True) or "
                    "torch.autograd.functional.jacobian(vectorize=True) (torch's legacy vmap); use torch.func.jacrev, "
                    "torch.func.vmap over torch.func.vjp, or vectorize=False")
            return backward(ctx, *grads)

        return wrapper

    return decorate


# --------------------------------------------------------------------------------------------------
# What the fake kernels check. The compiled kernels check their arguments (csrc/common/checks.h); a fake kernel
# stands in for them where none runs (tensors on the meta device, torch.compile's tracing), and it gave outputs of
# some shape and dtype for arguments the kernel refuses (a down projection the wrong way round: a wrong shape). The
# user-facing ops' fakes make the kernels' checks on what their outputs depend on, in the kernels' words, through
# torch._check (symbolic sizes under dynamic shapes). The backward ops are called by pefttorch's formulas only.

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check(op: str, ok, message) -> None:
    torch._check(ok, lambda: f"{op}: {message()}")


def _check_float(op: str, t: torch.Tensor, name: str) -> None:
    _check(op, t.dtype in _FLOAT_DTYPES,
           lambda: f"{name} has unsupported dtype {t.dtype}; supported are float32, float16, bfloat16, float64")


def _check_dim(op: str, t: torch.Tensor, name: str, dim: int) -> None:
    _check(op, t.dim() == dim, lambda: f"{name} must be {dim}-D, got shape {list(t.shape)}")


def _check_size(op: str, t: torch.Tensor, name: str, dim: int, expected, what: str) -> None:
    _check(op, t.shape[dim] == expected,
           lambda: f"{name}.size({dim}) must equal {what} ({expected}), got shape {list(t.shape)}")


def _check_like(op: str, t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    _check(op, t.dtype == ref.dtype, lambda: f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")
    _check(op, t.device == ref.device, lambda: f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def _check_dropout(op: str, p: float, seed: torch.Tensor | None) -> None:
    _check(op, 0.0 <= p < 1.0, lambda: f"dropout_p must be in [0, 1), got {p}")
    if p > 0.0:
        _check(op, seed is not None, lambda: f"dropout_p = {p} needs a seed tensor (int64, one element, on the CPU)")
        _check(op, seed.dtype == torch.int64 and seed.numel() == 1 and seed.device.type in ("cpu", "meta"),
               lambda: f"seed must be an int64 tensor with one element on the CPU, got {seed.dtype} of shape "
                       f"{list(seed.shape)} on {seed.device}")


def _check_eps(op: str, a: torch.Tensor, eps: float) -> None:
    """density_loss's eps: positive, finite, and within float32's normal range below float64 (see the kernel)."""
    _check(op, eps > 0.0 and math.isfinite(eps), lambda: f"eps must be positive and finite, got {eps}")
    if a.dtype != torch.float64:
        info = torch.finfo(torch.float32)
        _check(op, info.tiny <= eps <= info.max, lambda: f"eps = {eps} is outside float32's normal range ({info.tiny} "
                                                         f"to {info.max}), the precision the loss is computed in "
                                                         f"for {a.dtype} a: use another eps or float64 a")


def _check_activation(op: str, activation: str) -> None:
    _check(op, activation in ACTIVATIONS,  # the reference's are the kernels' activation switch's
           lambda: f"unsupported activation '{activation}'; supported: {', '.join(ACTIVATIONS)}")


def _check_vector(op: str, t: torch.Tensor | None, name: str, size, what: str, ref: torch.Tensor,
                  ref_name: str) -> None:
    """An optional bias: 1-D of `size`, like `ref`."""
    if t is not None:
        _check_dim(op, t, name, 1)
        _check_size(op, t, name, 0, size, what)
        _check_like(op, t, name, ref, ref_name)


# --------------------------------------------------------------------------------------------------
# lora_linear


@torch.library.register_fake("pefttorch::lora_linear_forward")
def _lora_linear_forward_fake(x, weight, lora_a, lora_b, bias, scaling, dropout_p, seed):
    op = "lora_linear_forward"
    _check(op, x.dim() >= 1, lambda: "x must have at least one dimension (..., in_features), got a scalar")
    _check_float(op, x, "x")
    for t, name in ((weight, "weight"), (lora_a, "lora_a"), (lora_b, "lora_b")):
        _check_dim(op, t, name, 2)
        _check_like(op, t, name, x, "x")
    _check(op, lora_a.shape[0] > 0, lambda: "the LoRA rank r = lora_a.size(0) must be at least 1")
    _check_size(op, lora_a, "lora_a", 1, weight.shape[1], "in_features = weight.size(1)")
    _check_size(op, lora_b, "lora_b", 0, weight.shape[0], "out_features = weight.size(0)")
    _check_size(op, lora_b, "lora_b", 1, lora_a.shape[0], "the rank r = lora_a.size(0)")
    _check_size(op, x, "x", -1, weight.shape[1], "in_features = weight.size(1)")
    _check_vector(op, bias, "bias", weight.shape[0], "out_features = weight.size(0)", x, "x")
    _check_dropout(op, dropout_p, seed)
    # the Python wrapper checks it in eager calls only (see functional._finite_scale): a compiled call is checked here
    _check(op, math.isfinite(scaling), lambda: f"scaling must be finite, got {scaling}")
    tokens = math.prod(x.shape[:-1])
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    s = x.new_empty((tokens, lora_a.shape[0]))
    return y, s


@torch.library.register_fake("pefttorch::lora_linear_backward")
def _lora_linear_backward_fake(grad_y, x, weight, lora_a, lora_b, s, scaling, dropout_p, seed, output_mask):
    need_x, need_w, need_a, need_b, need_bias = output_mask
    return (
        grad_y.new_empty((*grad_y.shape[:-1], weight.shape[1])) if need_x else None,
        # contiguous whatever the parameters' strides (e.g. a transposed fan_in_fan_out weight): the kernel's mm
        # results are, and Inductor asserts the strides the fake kernel promises
        torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else None,
        torch.empty_like(lora_a, memory_format=torch.contiguous_format) if need_a else None,
        torch.empty_like(lora_b, memory_format=torch.contiguous_format) if need_b else None,
        grad_y.new_empty((weight.shape[0],)) if need_bias else None,
    )


def _lora_linear_setup_context(ctx, inputs, output):
    x, weight, lora_a, lora_b, bias, scaling, dropout_p, seed = inputs
    _, s = output
    need_x, need_w, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
    # Save only what the requested gradients use: x for dW and dA, s for dB (weight and the adapter
    # factors are parameters, so keeping a reference to them costs no memory).
    ctx.save_for_backward(
        x if (need_w or need_a) else None,
        weight,
        lora_a,
        lora_b,
        s if need_b else None,
        seed,
    )
    ctx.scaling = scaling
    ctx.dropout_p = dropout_p
    ctx.mask = [need_x, need_w, need_a, need_b, bias is not None and need_bias]


@no_legacy_batching("pefttorch::lora_linear")
@first_order_only("pefttorch::lora_linear")
def _lora_linear_backward(ctx, grad_y, grad_s):
    # s is an internal result handed to backward, not part of the function's value: its gradient is
    # ignored by design (functional.lora_linear never exposes it).
    x, weight, lora_a, lora_b, s, seed = ctx.saved_tensors
    grads = lora_linear_backward(grad_y, x, weight, lora_a, lora_b, s, ctx.scaling, ctx.dropout_p, seed, ctx.mask)
    return (*grads, None, None, None)


_lora_linear_forward = _register_autograd("lora_linear_forward", _lora_linear_backward, _lora_linear_setup_context)


def lora_linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    bias: torch.Tensor | None,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw op: returns (y, s) where s = dropout(x) A^T is what backward reuses."""
    return _lora_linear_forward(x, weight, lora_a, lora_b, bias, scaling, dropout_p, seed)


def lora_linear_backward(grad_y, x, weight, lora_a, lora_b, s, scaling: float, dropout_p: float, seed,
                         output_mask: list[bool]) -> tuple[torch.Tensor | None, ...]:
    """The raw backward op: (grad_x, grad_weight, grad_a, grad_b, grad_bias), each None where output_mask says
    it is not needed; x may be None when neither grad_weight nor grad_a is, s when grad_b is not."""
    return _ops.lora_linear_backward(grad_y, x, weight, lora_a, lora_b, s, scaling, dropout_p, seed, output_mask)


# --------------------------------------------------------------------------------------------------
# density_loss (DEFT): loss and activation density in one pass; backward in one pass over a


@torch.library.register_fake("pefttorch::density_loss")
def _density_loss_fake(a, eps, threshold):
    _check_float("density_loss", a, "a")
    _check_eps("density_loss", a, eps)
    _check("density_loss", threshold >= 0.0, lambda: f"threshold must be >= 0, got {threshold}")
    _check("density_loss", a.numel() > 0, lambda: "a is empty: the mean over no activations is undefined")
    return a.new_empty((), dtype=opmath_dtype(a.dtype)), a.new_empty((), dtype=opmath_dtype(a.dtype))


@torch.library.register_fake("pefttorch::density_loss_backward")
def _density_loss_backward_fake(grad, a, eps):
    return torch.empty_like(a, memory_format=torch.contiguous_format)


def _density_loss_setup_context(ctx, inputs, output):
    a, eps, _ = inputs
    # a itself, no copy: autograd keeps it anyway when the next layer's weight (or LoRA A) needs a gradient;
    # otherwise it is the one activation-sized tensor per layer that any loss on a must keep (the reference
    # formula keeps a^2 and a^2 + eps besides).
    ctx.save_for_backward(a)
    ctx.eps = eps
    ctx.mark_non_differentiable(output[1])


@first_order_only("pefttorch::density_loss")
def _density_loss_backward(ctx, grad_loss, grad_density):
    (a,) = ctx.saved_tensors
    return _ops.density_loss_backward(grad_loss, a, ctx.eps), None, None


_density_loss = _register_autograd("density_loss", _density_loss_backward, _density_loss_setup_context)


def density_loss(a: torch.Tensor, eps: float, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean(a^2 / (a^2 + eps)), share of |a| > threshold): 0-dim float32 (float64 for float64 a)."""
    return _density_loss(a, eps, threshold)


# --------------------------------------------------------------------------------------------------
# sparse_mlp (DEFT inference): computes only the neurons whose activation exceeds the threshold


@torch.library.register_fake("pefttorch::sparse_mlp")
def _sparse_mlp_fake(x, w_in, b_in, w_up, b_up, w_down_t, b_down, activation, threshold):
    op = "sparse_mlp"
    _check(op, x.dim() >= 1, lambda: "x must have at least one dimension (..., hidden)")
    _check_float(op, x, "x")
    _check_dim(op, w_in, "w_in", 2)
    _check_dim(op, w_down_t, "w_down_t", 2)
    inter = w_in.shape[0]
    _check(op, inter > 0, lambda: f"the MLP has no intermediate neurons (w_in has shape {list(w_in.shape)})")
    _check(op, threshold >= 0.0, lambda: f"threshold must be >= 0, got {threshold}")
    _check_activation(op, activation)
    _check_size(op, x, "x", -1, w_in.shape[1], "hidden = w_in.size(1)")
    _check_size(op, w_down_t, "w_down_t", 0, inter, "intermediate = w_in.size(0)")
    _check_like(op, w_in, "w_in", x, "x")
    _check_like(op, w_down_t, "w_down_t", x, "x")
    if w_up is not None:
        _check_dim(op, w_up, "w_up", 2)
        _check(op, w_up.shape == w_in.shape, lambda: f"w_up must have the shape of w_in {list(w_in.shape)}, got "
                                                     f"{list(w_up.shape)}")
        _check_like(op, w_up, "w_up", x, "x")
    _check(op, b_up is None or w_up is not None, lambda: "b_up given without w_up")
    for t, name in ((b_in, "b_in"), (b_up, "b_up")):
        _check_vector(op, t, name, inter, "intermediate = w_in.size(0)", x, "x")
    _check_vector(op, b_down, "b_down", w_down_t.shape[1], "out = w_down_t.size(1)", x, "x")
    return x.new_empty((*x.shape[:-1], w_down_t.shape[1]))


def sparse_mlp(
    x: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor | None,
    w_up: torch.Tensor | None,
    b_up: torch.Tensor | None,
    w_down_t: torch.Tensor,
    b_down: torch.Tensor | None,
    activation: str,
    threshold: float,
) -> torch.Tensor:
    """The raw op (no autograd: an inference kernel). w_down_t is the down projection transposed, (inter, out)."""
    return _ops.sparse_mlp(x, w_in, b_in, w_up, b_up, w_down_t, b_down, activation, threshold)


# --------------------------------------------------------------------------------------------------
# reversible_coupling (MEFT): y = scale * x + f in the stream's dtype; its backward step reconstructs x


@torch.library.register_fake("pefttorch::reversible_coupling")
def _reversible_coupling_fake(x, f, scale):
    op = "reversible_coupling"
    _check_float(op, x, "x")
    _check_float(op, f, "f")
    _check(op, f.shape == x.shape, lambda: f"f must have the shape of x {list(x.shape)}, got {list(f.shape)}")
    _check(op, f.device == x.device, lambda: f"f is on {f.device} but x is on {x.device}")
    _check_coupling_scale(op, scale, x)
    return x.new_empty(x.shape)


def coupling_compute_dtype(stream_dtype: torch.dtype) -> torch.dtype:
    """The dtype reversible_coupling computes in (this name and argument came before reference.opmath_dtype)."""
    return opmath_dtype(stream_dtype)


def coupling_scale_ok(scale: float, stream_dtype: torch.dtype) -> bool:
    """csrc/reversible.cpp's rule for a coupling's scale (MEFT's lam and beta): a normal number of the compute dtype
    (finite, nonzero and not subnormal: backward divides by it). Shared by the checks of the op, of
    nn.reversible.reversible_stack and of MeftConfig."""
    info = torch.finfo(opmath_dtype(stream_dtype))
    return math.isfinite(scale) and info.tiny <= abs(scale) <= info.max


def _check_coupling_scale(op: str, scale: float, stream: torch.Tensor) -> None:
    where = "" if stream.dtype == torch.float64 else " in float32, the kernels' compute dtype"
    _check(op, coupling_scale_ok(scale, stream.dtype),
           lambda: f"scale must be finite and nonzero{where} (a normal number), got {scale}")


@torch.library.register_fake("pefttorch::reversible_coupling_backward")
def _reversible_coupling_backward_fake(y, f, grad_y, grad_other, vjp, scale):
    _check_coupling_scale("reversible_coupling_backward", scale, y)
    return y.new_empty(y.shape), y.new_empty(y.shape), y.new_empty(y.shape)


def _reversible_coupling_setup_context(ctx, inputs, output):
    _, f, scale = inputs
    # Nothing saved: the gradients are linear in grad_y (saving no activation is what a reversible layer is for).
    ctx.scale = scale
    ctx.f_dtype = f.dtype


def _reversible_coupling_backward(ctx, grad_y):
    need_x, need_f = ctx.needs_input_grad[:2]
    grad_x = grad_y * ctx.scale if need_x else None  # grad_y has x's dtype: y's
    grad_f = grad_y.to(ctx.f_dtype) if need_f else None
    return grad_x, grad_f, None


_reversible_coupling = _register_autograd("reversible_coupling", _reversible_coupling_backward,
                                          _reversible_coupling_setup_context)


def reversible_coupling(x: torch.Tensor, f: torch.Tensor, scale: float) -> torch.Tensor:
    """y = scale * x + f in x's dtype (the stream's); f has x's shape and any float dtype. Differentiable."""
    return _reversible_coupling(x, f, scale)


def reversible_coupling_backward(
    y: torch.Tensor, f: torch.Tensor, grad_y: torch.Tensor, grad_other: torch.Tensor, vjp: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward step of y = scale * x + f, in one pass and in y's dtype: (x reconstructed as (y - f) / scale,
    grad_x = scale * grad_y, grad_other + vjp). No autograd: it is meant for use inside a custom backward."""
    return _ops.reversible_coupling_backward(y, f, grad_y, grad_other, vjp, scale)


# --------------------------------------------------------------------------------------------------
# rank_importance (IncreLoRA): each adapted module's importance score, every module in one call


@torch.library.register_fake("pefttorch::rank_importance")
def _rank_importance_fake(lora_a, lora_b, lora_e, grad_tiles, row_offset, row_stride, col_offset, col_stride, rank,
                          weight):
    op = "rank_importance"
    for name, values in (("lora_b", lora_b), ("lora_e", lora_e), ("grad_tiles", grad_tiles),
                         ("row_offset", row_offset), ("row_stride", row_stride), ("col_offset", col_offset),
                         ("col_stride", col_stride), ("rank", rank), ("weight", weight)):
        _check(op, len(values) == len(lora_a), lambda name=name, values=values: f"every list must have one entry per "
               f"module: lora_a has {len(lora_a)} but {name} has {len(values)}")
    for m, (a, b, e, tile) in enumerate(zip(lora_a, lora_b, lora_e, grad_tiles, strict=True)):
        cap = a.shape[0]
        for which, offset, stride in (("row", row_offset[m], row_stride[m]), ("col", col_offset[m], col_stride[m])):
            _check(op, stride >= 1, lambda m=m, which=which, stride=stride: f"{which}_stride[{m}] must be >= 1, got "
                   f"{stride}")
            _check(op, 0 <= offset < stride, lambda m=m, which=which, offset=offset, stride=stride: f"{which}_offset"
                   f"[{m}] must be in [0, {which}_stride[{m}]) = [0, {stride}), got {offset}")
        _check(op, (e.dim() == 1 or (e.dim() == 2 and e.shape[1] == 1)) and e.shape[0] == cap,
               lambda m=m, e=e, cap=cap: f"lora_e[{m}] must have shape (cap,) or (cap, 1) with cap = "
               f"lora_a[{m}].size(0) = {cap}, got {list(e.shape)}")
        _check(op, math.isfinite(weight[m]), lambda m=m: f"weight[{m}] must be finite, got {weight[m]}")
        _check(op, 0 <= rank[m] <= cap, lambda m=m, cap=cap: f"rank[{m}] must be in [0, cap] with cap = "
               f"lora_a[{m}].size(0) = {cap}, got {rank[m]}")
        _check(op, tile.dtype == torch.float32, lambda m=m, tile=tile: f"grad_tiles[{m}] must be float32, got "
               f"{tile.dtype}")
        # len(range(offset, size, stride)): the rows and columns the grid samples
        shape = [len(range(row_offset[m], b.shape[0], row_stride[m])), len(range(col_offset[m], a.shape[1],
                                                                                 col_stride[m]))]
        _check(op, list(tile.shape) == shape, lambda m=m, tile=tile, shape=shape: f"grad_tiles[{m}] must have the "
               f"sampled shape {shape}, got {list(tile.shape)}")
    return lora_a[0].new_empty((len(lora_a),), dtype=torch.float32)


def rank_importance(
    lora_a: list[torch.Tensor] | tuple[torch.Tensor, ...],
    lora_b: list[torch.Tensor] | tuple[torch.Tensor, ...],
    lora_e: list[torch.Tensor] | tuple[torch.Tensor, ...],
    grad_tiles: list[torch.Tensor] | tuple[torch.Tensor, ...],
    row_offset: list[int],
    row_stride: list[int],
    col_offset: list[int],
    col_stride: list[int],
    rank: list[int],
    weight: list[float],
) -> torch.Tensor:
    """IncreLoRA's importance of each adapted module m: ``weight[m] * sum |dW[i, j] * G[ii, jj]|``, float32, shape
    (modules,), on the inputs' device; see :func:`pefttorch.reference.rank_importance` for the definition.

    dW = B[:, :n] diag(E[:n]) A[:n] with n = rank[m], lora_a (cap, in), lora_b (out, cap), lora_e (cap, 1) or
    (cap,), is formed element by element from the factors, never materialised. The sample is rows
    ``i = row_offset + ii * row_stride < out`` and columns ``j = col_offset + jj * col_stride < in``, with
    stride >= 1 and 0 <= offset < stride (an offset at or past the dimension gives an empty sample: score 0), and
    grad_tiles[m] is the float32 gradient at those points, of shape (len(rows), len(cols)). The factors of all
    modules share one float dtype; any strides. Computed in float32 on CUDA (in one launch for all modules) and
    in float64 on the CPU; rank 0 scores 0.

    No autograd: the score is a statistic of the training state, not a function to differentiate, so it is
    computed under torch.no_grad() (the factors are trainable parameters; without it the result would carry the
    dispatcher's not-implemented autograd node). Empty lists give an empty float32 tensor on the CPU without
    calling the op.
    """
    lists = (lora_a, lora_b, lora_e, grad_tiles, row_offset, row_stride, col_offset, col_stride, rank, weight)
    if all(len(v) == 0 for v in lists):  # no module, so no device: the op would have nowhere to put the result
        return torch.zeros(0)
    with torch.no_grad():
        return _ops.rank_importance(
            list(lora_a), list(lora_b), list(lora_e), list(grad_tiles), [int(v) for v in row_offset],
            [int(v) for v in row_stride], [int(v) for v in col_offset], [int(v) for v in col_stride],
            [int(v) for v in rank], [float(v) for v in weight],
        )


# --------------------------------------------------------------------------------------------------
# ranked_lora_factors (IncreLoRA, AdaLoRA): the fused LoRA op's factors from a ranked layer's storage, one call each way


@torch.library.register_fake("pefttorch::ranked_lora_factors")
def _ranked_lora_factors_fake(lora_a, lora_e, lora_b_t, n, dtype):
    op = "ranked_lora_factors"
    _check_float(op, lora_a, "lora_a")
    for t, name in ((lora_a, "lora_a"), (lora_e, "lora_e"), (lora_b_t, "lora_b_t")):
        _check_dim(op, t, name, 2)
    _check_size(op, lora_e, "lora_e", 0, lora_a.shape[0], "the capacity = lora_a.size(0)")
    _check_size(op, lora_e, "lora_e", 1, 1, "1")
    _check_size(op, lora_b_t, "lora_b_t", 0, lora_a.shape[0], "the capacity = lora_a.size(0)")
    _check_like(op, lora_e, "lora_e", lora_a, "lora_a")
    _check_like(op, lora_b_t, "lora_b_t", lora_a, "lora_a")
    _check(op, 0 <= n <= lora_a.shape[0], lambda: f"n must be in [0, capacity = {lora_a.shape[0]}], got {n}")
    _check(op, dtype in _FLOAT_DTYPES, lambda: f"dtype must be a float dtype, got {dtype}")
    return lora_a.new_empty((n, lora_a.shape[1]), dtype=dtype), lora_a.new_empty((lora_b_t.shape[1], n), dtype=dtype)


@torch.library.register_fake("pefttorch::ranked_lora_factors_backward")
def _ranked_lora_factors_backward_fake(grad_a_n, grad_b_n, lora_a, lora_e, lora_b_t, e_rows, output_mask):
    need_a, need_e, need_b = output_mask
    return (torch.empty_like(lora_a, memory_format=torch.contiguous_format) if need_a else None,
            torch.empty_like(lora_e, memory_format=torch.contiguous_format) if need_e else None,
            torch.empty_like(lora_b_t, memory_format=torch.contiguous_format) if need_b else None)


def _ranked_lora_factors_setup_context(ctx, inputs, output):
    lora_a, lora_e, lora_b_t, n, _ = inputs
    need_a, need_e, need_b = ctx.needs_input_grad[:3]
    ctx.save_for_backward(lora_a, lora_e, lora_b_t)  # the storage: parameters, so no memory kept
    ctx.n, ctx.mask = n, [need_a, need_e, need_b]
    ctx.set_materialize_grads(False)  # an unused output's gradient comes as None, not zeros (see the backward)


@no_legacy_batching("pefttorch::ranked_lora_factors")
@first_order_only("pefttorch::ranked_lora_factors")
def _ranked_lora_factors_backward(ctx, grad_a_n, grad_b_n):
    lora_a, lora_e, lora_b_t = ctx.saved_tensors
    need_a, need_e, need_b = ctx.mask
    # An output nobody used has no gradient: the factors it came from get none either (None is a zero gradient).
    mask = [need_a and grad_a_n is not None, need_e and grad_a_n is not None, need_b and grad_b_n is not None]
    grads = ranked_lora_factors_backward(grad_a_n, grad_b_n, lora_a, lora_e, lora_b_t, ctx.n, mask)
    return (*grads, None, None)


_ranked_lora_factors = _register_autograd("ranked_lora_factors", _ranked_lora_factors_backward,
                                          _ranked_lora_factors_setup_context)


def ranked_lora_factors(lora_a: torch.Tensor, lora_e: torch.Tensor, lora_b_t: torch.Tensor, n: int,
                        dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused LoRA op's factors from a ranked layer's component-major storage (lora_a (cap, in), lora_e (cap, 1),
    lora_b_t (cap, out), one float dtype): ``a_n = (lora_a[:n] * lora_e[:n]).to(dtype)`` (n, in) and
    ``b_n = lora_b_t[:n].t().to(dtype)`` (out, n), both contiguous, in one call (one launch on CUDA). Differentiable;
    see :func:`pefttorch.reference.ranked_lora_factors`."""
    return _ranked_lora_factors(lora_a, lora_e, lora_b_t, n, dtype)


def ranked_lora_factors_backward(grad_a_n, grad_b_n, lora_a, lora_e, lora_b_t, e_rows: int,
                                 output_mask: list[bool]) -> tuple[torch.Tensor | None, ...]:
    """The gradients of ranked_lora_factors' storage (lora_a, lora_e, lora_b_t), full capacity, in the storage dtype,
    from those of a_n and b_n: rows past n are zero, and so are e's past `e_rows` (IncreLoRA's reserve components,
    whose e is held fixed; e_rows = n for the plain gradient). Each is None where output_mask says it is not
    needed; grad_a_n may be None when neither lora_a's nor lora_e's is, grad_b_n when lora_b_t's is not. No
    autograd: it is meant for use inside a custom backward."""
    return _ops.ranked_lora_factors_backward(grad_a_n, grad_b_n, lora_a, lora_e, lora_b_t, e_rows, output_mask)


# --------------------------------------------------------------------------------------------------
# component_adamw_ (IncreLoRA/AdaLoRA's RankAwareAdamW): AdamW with per-row step counts, every tensor in one call


@torch.library.register_fake("pefttorch::component_adamw_")
def _component_adamw_fake(params, grads, exp_avgs, exp_avg_sqs, steps, rows, lr, beta1, beta2, eps, weight_decay,
                          warmup):
    return None  # updates params, exp_avgs and exp_avg_sqs in place; returns nothing


def component_adamw_(
    params: list[torch.Tensor] | tuple[torch.Tensor, ...],
    grads: list[torch.Tensor] | tuple[torch.Tensor, ...],
    exp_avgs: list[torch.Tensor] | tuple[torch.Tensor, ...],
    exp_avg_sqs: list[torch.Tensor] | tuple[torch.Tensor, ...],
    steps: list[torch.Tensor] | tuple[torch.Tensor, ...],
    rows: list[int],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    warmup: list[float],
) -> None:
    """AdamW in place on the first rows[m] rows (components) of each 2-D params[m] and its states exp_avgs[m],
    exp_avg_sqs[m], row k with its own step count steps[m][k] (float32, already incremented for this step) and
    learning rate ``lr * min(1, s / warmup[m])`` (plain lr for warmup[m] == 0); rows beyond rows[m] are not touched.
    See :func:`pefttorch.reference.component_adamw_` for the definition.

    params, exp_avgs and exp_avg_sqs are contiguous (as the optimizer allocates them), grads of the same shape with
    any strides; all of them, over all tensors, in one float dtype (call once per dtype). steps[m] is float32 1-D
    with at least rows[m] entries, on the same device. Computed in float32 (float64 for float64 tensors), each result
    rounded once; one kernel launch for all tensors on CUDA.

    No autograd: this is an optimizer step, run under torch.no_grad() (the parameters are leaves that require grad,
    which autograd would not let be changed in place). Empty lists do nothing.
    """
    lists = (params, grads, exp_avgs, exp_avg_sqs, steps, rows, warmup)
    if all(len(v) == 0 for v in lists):  # no tensor: nothing to update, and no device to dispatch on
        return
    with torch.no_grad():
        _ops.component_adamw_(
            list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(steps), [int(v) for v in rows],
            float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), [float(v) for v in warmup],
        )
    # As any in-place op does (torch.optim's updates included): a graph that saved a parameter before the step then
    # refuses to backward, where it would otherwise compute with the updated values without a word. The custom
    # op's kernel, reached directly, does not bump version counters itself. (The states are the optimizer's own,
    # in no graph: ~0.2 us a tensor saved.)
    torch.autograd.graph.increment_version(params)


# --------------------------------------------------------------------------------------------------
# bottleneck_adapter (Houlsby, Pfeiffer, parallel): y = scale * (act(x W_down^T + b_down) W_up^T + b_up)
# [+ x if add_input] [+ residual]; h = x W_down^T + b_down (tokens, m) is what backward needs


@torch.library.register_fake("pefttorch::bottleneck_adapter_forward")
def _bottleneck_adapter_forward_fake(x, w_down, b_down, w_up, b_up, residual, add_input, activation, scale):
    op = "bottleneck_adapter_forward"
    _check(op, x.dim() >= 1, lambda: "x must have at least one dimension (..., features), got a scalar")
    _check_float(op, x, "x")
    _check_dim(op, w_down, "w_down", 2)
    _check_dim(op, w_up, "w_up", 2)
    _check_activation(op, activation)
    m = w_down.shape[0]
    _check(op, m > 0, lambda: f"the bottleneck width m = w_down.size(0) must be at least 1, got shape "
                              f"{list(w_down.shape)}")
    _check_size(op, w_up, "w_up", 1, m, "the bottleneck width m = w_down.size(0)")
    _check_like(op, w_down, "w_down", x, "x")
    _check_like(op, w_up, "w_up", x, "x")
    _check_vector(op, b_down, "b_down", m, "the bottleneck width m = w_down.size(0)", x, "x")
    _check_size(op, x, "x", -1, w_down.shape[1], "d_in = w_down.size(1)")
    _check_vector(op, b_up, "b_up", w_up.shape[0], "d_out = w_up.size(0)", x, "x")
    y_shape = (*x.shape[:-1], w_up.shape[0])
    if residual is not None:
        _check(op, tuple(residual.shape) == y_shape, lambda: f"residual must have the output's shape {list(y_shape)}, "
                                                             f"got {list(residual.shape)}")
        _check_like(op, residual, "residual", x, "x")
    _check(op, not add_input or w_up.shape[0] == w_down.shape[1],
           lambda: "add_input needs d_out = w_up.size(0) equal to d_in = w_down.size(1)")
    _check(op, math.isfinite(scale), lambda: f"scale must be finite, got {scale}")
    tokens = math.prod(x.shape[:-1])
    return x.new_empty((*x.shape[:-1], w_up.shape[0])), x.new_empty((tokens, w_down.shape[0]))


@torch.library.register_fake("pefttorch::bottleneck_adapter_backward")
def _bottleneck_adapter_backward_fake(grad_y, x, w_down, b_down, w_up, h, add_input, activation, scale, output_mask):
    need_x, need_wd, need_bd, need_wu, need_bu, need_res = output_mask
    m, d_in = w_down.shape
    return (
        grad_y.new_empty((*grad_y.shape[:-1], d_in)) if need_x else None,
        grad_y.new_empty((m, d_in)) if need_wd else None,
        grad_y.new_empty((m,)) if need_bd and b_down is not None else None,  # an absent bias has no gradient
        grad_y.new_empty(tuple(w_up.shape)) if need_wu else None,
        grad_y.new_empty((w_up.shape[0],)) if need_bu else None,
        grad_y.new_empty(tuple(grad_y.shape)) if need_res else None,
    )


def _bottleneck_adapter_setup_context(ctx, inputs, output):
    x, w_down, b_down, w_up, b_up, residual, add_input, activation, scale = inputs
    _, h = output
    need = ctx.needs_input_grad[:6]
    # x only for w_down's gradient; h always (tokens x m, small next to x), since a = act(h) is recomputed from it
    # rather than stored. The weights are parameters: keeping references to them costs no memory. b_down is kept
    # only to say whether it exists.
    ctx.save_for_backward(x if need[1] else None, w_down, b_down, w_up, h)
    ctx.add_input = add_input
    ctx.activation = activation
    ctx.scale = scale
    ctx.need_residual = need[5]
    # the op never asks for the residual's gradient: it is grad_y itself (see _bottleneck_adapter_backward)
    ctx.mask = [*need[:5], False]
    # h is an internal result handed to backward, not part of the function's value: no gradient flows into it
    ctx.mark_non_differentiable(h)
    # the gradients depend on x through act'(h) (not for relu, whose act' is piecewise constant), but x is kept
    # only for w_down's gradient: without it, a second derivative in x has no saved tensor to hang its refusal on
    ctx.unkept_dependence = need[0] and not need[1] and activation != "relu"


@no_legacy_batching("pefttorch::bottleneck_adapter")
@first_order_only("pefttorch::bottleneck_adapter")
def _bottleneck_adapter_backward(ctx, grad_y, grad_h):
    x, w_down, b_down, w_up, h = ctx.saved_tensors
    if any(ctx.mask):
        grads = _ops.bottleneck_adapter_backward(
            grad_y, x, w_down, b_down, w_up, h, ctx.add_input, ctx.activation, ctx.scale, ctx.mask
        )
    else:  # only the residual needs a gradient
        grads = (None,) * 6
    # d y / d residual is the identity: the residual's gradient is grad_y itself, handed to autograd without a copy
    # (autograd accepts an incoming gradient as an outgoing one, and copies it only if it must, e.g. to give a
    # leaf's .grad its own memory).
    return (*grads[:5], grad_y if ctx.need_residual else None, None, None, None)


_bottleneck_adapter_forward = _register_autograd("bottleneck_adapter_forward", _bottleneck_adapter_backward,
                                                 _bottleneck_adapter_setup_context)


def bottleneck_adapter_forward(
    x: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    residual: torch.Tensor | None,
    add_input: bool,
    activation: str,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw op: returns (y, h) where h = x W_down^T + b_down, (tokens, m), is what backward reuses."""
    return _bottleneck_adapter_forward(x, w_down, b_down, w_up, b_up, residual, add_input, activation, scale)


def bottleneck_adapter_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor | None,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    w_up: torch.Tensor,
    h: torch.Tensor,
    add_input: bool,
    activation: str,
    scale: float,
    output_mask: list[bool],
) -> tuple[torch.Tensor | None, ...]:
    """The raw backward op: the gradients of (x, w_down, b_down, w_up, b_up, residual) whose mask bits are set (b_down's
    only when b_down is given; x is needed for w_down's). No autograd. The residual's gradient is a copy of grad_y."""
    return _ops.bottleneck_adapter_backward(grad_y, x, w_down, b_down, w_up, h, add_input, activation, scale,
                                            output_mask)


# --------------------------------------------------------------------------------------------------
# rotary_embedding: x * cos + rotate_half(x) * sin (transformers' half-split layout), cos and sin broadcast to x


def _check_broadcast(op: str, t: torch.Tensor, name: str, x: torch.Tensor) -> None:
    """cos or sin: x's last dimension, the others x's or 1."""
    _check_float(op, t, name)
    _check(op, t.device == x.device, lambda: f"{name} is on {t.device} but x is on {x.device}")
    fits = 1 <= t.dim() <= x.dim() and t.shape[-1] == x.shape[-1] and all(
        a == b or a == 1 for a, b in zip(t.shape[:-1], x.shape[x.dim() - t.dim():-1], strict=True))
    _check(op, fits, lambda: f"{name} of shape {list(t.shape)} does not broadcast to x's shape {list(x.shape)} (its "
                             "last dimension must equal x's, the others x's or 1)")


@torch.library.register_fake("pefttorch::rotary_embedding")
def _rotary_embedding_fake(x, cos, sin, transpose=False):
    op = "rotary_embedding"
    _check_float(op, x, "x")
    _check(op, 1 <= x.dim() <= 5, lambda: f"x must have 1 to 5 dimensions, got shape {list(x.shape)}")
    _check(op, x.shape[-1] % 2 == 0, lambda: f"x's last dimension (the head size) must be even, got shape "
                                             f"{list(x.shape)}")
    _check_broadcast(op, cos, "cos", x)
    _check_broadcast(op, sin, "sin", x)
    _check(op, sin.dtype == cos.dtype, lambda: f"sin has dtype {sin.dtype} but cos has {cos.dtype}")
    return x.new_empty(x.shape)  # contiguous, as the kernels return it


def _rotate_half(t: torch.Tensor) -> torch.Tensor:
    h = t.shape[-1] // 2
    return torch.cat([-t[..., h:], t[..., :h]], dim=-1)


def _rotary_embedding_setup_context(ctx, inputs, output):
    x, cos, sin, transpose = inputs
    need_cos, need_sin = ctx.needs_input_grad[1:3]
    # The gradient w.r.t. x is the transposed rotation of the output's gradient: only cos and sin are needed. x
    # only for the gradients of cos and sin (transformers computes those under no_grad: usually nothing)
    ctx.save_for_backward(cos, sin, x if (need_cos or need_sin) else None)
    ctx.transpose = transpose


def _rotary_embedding_backward(ctx, grad):
    cos, sin, x = ctx.saved_tensors
    need_x, need_cos, need_sin = ctx.needs_input_grad[:3]
    grad_x = _rotary_embedding(grad, cos, sin, not ctx.transpose) if need_x else None
    grad_cos = grad_sin = None
    if need_cos or need_sin:  # a rare path (trained frequencies): plain tensor ops in x's opmath dtype
        acc = opmath_dtype(x.dtype)
        g, xa = grad.to(acc), x.to(acc)
        if need_cos:
            grad_cos = (g * xa).sum_to_size(cos.shape).to(cos.dtype)
        if need_sin:
            # forward: d out / d sin = rotate_half(x); transposed: out = x cos + rotate_half^T(x sin), whose
            # gradient w.r.t. sin is x * rotate_half(grad)
            grad_sin = (xa * _rotate_half(g) if ctx.transpose else g * _rotate_half(xa)).sum_to_size(sin.shape)
            grad_sin = grad_sin.to(sin.dtype)
    return grad_x, grad_cos, grad_sin, None


_rotary_embedding = _register_autograd("rotary_embedding", _rotary_embedding_backward,
                                       _rotary_embedding_setup_context)


def rotary_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` in one pass (see :func:`pefttorch.reference.rotary_embedding`): x of 1 to 5
    dims with an even last dimension, any strides; cos and sin of one float dtype, broadcast to x. Contiguous, in
    x's dtype. Differentiable in x (its gradient is the transposed rotation: the same kernel), cos and sin."""
    return _rotary_embedding(x, cos, sin, transpose)
