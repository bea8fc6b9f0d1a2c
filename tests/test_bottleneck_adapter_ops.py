"""The fused bottleneck adapter ops against the pure-PyTorch reference: forward and every gradient.

Each result is held to at most 3 times the error of the reference run in the same dtype (plus a small slack per
dtype: tests/helpers.py assert_close_to_oracle), both measured against the reference in float64 on the same
(rounded) inputs.
"""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICES, DTYPES, HAS_CUDA, assert_close_to_oracle, rand
from hypothesis import given, settings

import pefttorch
from pefttorch import functional, ops, reference

_ops = torch.ops.pefttorch

f32, f64, bf16, f16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
ACTIVATIONS = list(reference.ACTIVATIONS)
NAMES = ("x", "w_down", "b_down", "w_up", "b_up", "residual")

# (leading dims of x, d_in, m, d_out, b_down, b_up, residual, add_input, scale): 1, 3 and 17 tokens, 3-D and 4-D
# inputs, odd widths (13, 17), bottlenecks of 1, 3 and 5, each bias on and off, sequential (add_input), parallel
# (residual, d_out != d_in too) and both at once, scales of either sign, not powers of two.
CASES = [
    ((1,), 13, 1, 13, True, True, False, True, 0.7),
    ((3,), 17, 3, 13, False, True, True, False, -1.3),
    ((17,), 13, 5, 13, True, False, True, True, 0.37),
    ((2, 3), 17, 5, 17, False, False, False, False, 1.9),
    ((3, 1, 2), 13, 3, 17, True, True, False, False, -0.6),
    ((1, 17), 17, 1, 17, True, True, True, False, 1.0),
]
LAYOUTS = ["contiguous", "padded_rows", "strided", "transposed"]


def ids(value):
    return str(value).replace("torch.", "")


def view(kind, lead, features, dtype, device):
    """Fresh random data of shape (*lead, features) in the memory layout `kind`: "contiguous", "padded_rows" (unit
    inner stride, rows further apart), "strided" (every other element of a wider last dimension) or "transposed"
    (the reversed shape permuted into place)."""
    if kind == "contiguous":
        t = rand(*lead, features, dtype=dtype, device=device)
    elif kind == "padded_rows":
        t = rand(*lead, features + 5, dtype=dtype, device=device)[..., :features]
    elif kind == "strided":
        t = rand(*lead, 2 * features, dtype=dtype, device=device)[..., ::2]
    elif kind == "transposed":
        t = rand(features, *reversed(lead), dtype=dtype, device=device).permute(*range(len(lead), 0, -1), 0)
    else:
        raise ValueError(kind)
    assert t.shape == (*lead, features)
    return t


def make_inputs(lead, d_in, m, d_out, dtype, device, *, b_down=True, b_up=True, residual=False,
                x_layout="contiguous", res_layout="contiguous"):
    """(x, w_down, b_down, w_up, b_up, residual), every tensor a leaf that requires grad (absent ones None). The
    weights are scaled so that h and y stay of order 1."""
    x = view(x_layout, lead, d_in, dtype, device).requires_grad_()
    w_down = rand(m, d_in, dtype=dtype, device=device, requires_grad=True, scale=max(d_in, 1) ** -0.5)
    w_up = rand(d_out, m, dtype=dtype, device=device, requires_grad=True, scale=m**-0.5)
    bd = rand(m, dtype=dtype, device=device, requires_grad=True, scale=0.5) if b_down else None
    bu = rand(d_out, dtype=dtype, device=device, requires_grad=True, scale=0.5) if b_up else None
    res = view(res_layout, lead, d_out, dtype, device).requires_grad_() if residual else None
    return x, w_down, bd, w_up, bu, res


def run_case(inputs, add_input, activation, scale, *, grad_layout="contiguous", need=None):
    """Forward through the op, gradients of the tensors in `need` (default: all given), and both checked against the
    reference in the inputs' dtype (the baseline) and in float64 (the oracle)."""
    x = inputs[0]
    dtype, device = x.dtype, x.device
    names = [n for n, t in zip(NAMES, inputs, strict=True) if t is not None and (need is None or n in need)]
    for n, t in zip(NAMES, inputs, strict=True):
        if t is not None:
            t.requires_grad_(n in names)
    wanted = [t for n, t in zip(NAMES, inputs, strict=True) if n in names]

    y, h = ops.bottleneck_adapter_forward(*inputs, add_input, activation, scale)
    d_out = inputs[3].shape[0]
    grad_y = view(grad_layout, tuple(x.shape[:-1]), d_out, dtype, device)
    grads = torch.autograd.grad(y, wanted, grad_y) if wanted else ()

    def ref(cast):
        leaves = [t.detach().to(cast).requires_grad_(n in names) if t is not None else None
                  for n, t in zip(NAMES, inputs, strict=True)]
        out = reference.bottleneck_adapter(*leaves, add_input, activation, scale)
        want = [t for n, t in zip(NAMES, leaves, strict=True) if n in names]
        return out, (torch.autograd.grad(out, want, grad_y.to(cast)) if want else ()), leaves

    y_base, g_base, leaves = ref(dtype)
    y_oracle, g_oracle, leaves64 = ref(f64)
    assert y.device == device and y.dtype == dtype
    assert_close_to_oracle("y", y, y_base, y_oracle)
    # h is the pre-activation, as F.linear computes it
    tokens = math.prod(x.shape[:-1])
    assert h.shape == (tokens, inputs[1].shape[0]) and h.dtype == dtype and not h.requires_grad
    h_base = F.linear(leaves[0].detach(), leaves[1].detach(), None if leaves[2] is None else leaves[2].detach())
    h_oracle = F.linear(leaves64[0].detach(), leaves64[1].detach(),
                        None if leaves64[2] is None else leaves64[2].detach())
    assert_close_to_oracle("h", h.view(h_base.shape), h_base, h_oracle)
    for name, g, gb, go in zip(names, grads, g_base, g_oracle, strict=True):
        assert_close_to_oracle(f"d{name}", g, gb, go)
    return y, grads


# ==================================================================================================
# values and gradients


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case, activation, dtype, device):
    lead, d_in, m, d_out, b_down, b_up, residual, add_input, scale = case
    inputs = make_inputs(lead, d_in, m, d_out, dtype, device, b_down=b_down, b_up=b_up, residual=residual)
    run_case(inputs, add_input, activation, scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_strided_inputs(layout, dtype, device):
    """x, residual and grad_y in layouts other than contiguous (each a different one), for both the sequential and
    the parallel form."""
    other = LAYOUTS[1:][(LAYOUTS[1:].index(layout) + 1) % 3]
    third = LAYOUTS[1:][(LAYOUTS[1:].index(layout) + 2) % 3]
    for add_input, d_out in ((True, 17), (False, 13)):
        inputs = make_inputs((4, 3), 17, 5, d_out, dtype, device, residual=True, x_layout=layout, res_layout=other)
        run_case(inputs, add_input, "gelu", 0.8, grad_layout=third)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("need", [("x",), ("w_down",), ("b_down", "b_up"), ("w_up",), ("residual",),
                                  ("x", "w_up"), ("w_down", "residual")], ids=str)
@pytest.mark.parametrize("add_input", [False, True])
def test_some_gradients_only(need, add_input, device):
    """Frozen parts get no gradient, and the others are still right (each path of the backward op alone)."""
    inputs = make_inputs((5,), 13, 3, 13, f32, device, residual=True)
    run_case(inputs, add_input, "silu", 1.4, need=need)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [f32, bf16], ids=ids)
def test_large(dtype, device):
    """Many parallel chunks (CPU) and a grid-stride loop over more than one grid (CUDA)."""
    inputs = make_inputs((3, 700), 96, 16, 96, dtype, device, residual=True, x_layout="padded_rows")
    run_case(inputs, True, "gelu_tanh", 0.5)


@settings(max_examples=25, deadline=None)
@given(
    lead=st.lists(st.integers(0, 5), min_size=1, max_size=3),
    d_in=st.integers(1, 20),
    m=st.integers(1, 8),
    d_out=st.integers(1, 20),
    flags=st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()),
    activation=st.sampled_from(ACTIVATIONS),
    scale=st.floats(-3, 3),
)
def test_property_any_shape_float64(lead, d_in, m, d_out, flags, activation, scale):
    b_down, b_up, residual, add_input = flags
    if add_input:
        d_out = d_in
    inputs = make_inputs(tuple(lead), d_in, m, d_out, f64, "cpu", b_down=b_down, b_up=b_up, residual=residual)
    run_case(inputs, add_input, activation, scale)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("add_input, residual", [(False, False), (True, False), (False, True), (True, True)])
def test_gradcheck(add_input, residual, activation):
    x, w_down, b_down, w_up, b_up, res = make_inputs((2, 3), 5, 3, 5, f64, "cpu", residual=residual)

    def f(*args):
        return ops.bottleneck_adapter_forward(*args, add_input, activation, -0.7)[0]

    assert torch.autograd.gradcheck(f, (x, w_down, b_down, w_up, b_up, res))
    # no biases, a transposed x
    xt = torch.randn(5, 3, dtype=f64).t().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, wd, wu: f(a, wd, None, wu, None, None), (xt, w_down, w_up))


# ==================================================================================================
# functional.bottleneck_adapter


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_functional_residual_is_x(dtype, device):
    """residual=x is a sequential adapter: the op adds its own input (add_input), and x's two gradients (through the
    adapter, through the residual) come out summed."""
    x, w_down, b_down, w_up, b_up, _ = make_inputs((3, 4), 17, 5, 17, dtype, device)
    y = functional.bottleneck_adapter(x, w_down, w_up, b_down, b_up, residual=x, activation="gelu", scale=0.6)
    grad_y = rand(*y.shape, dtype=dtype, device=device)
    grads = torch.autograd.grad(y, (x, w_down, b_down, w_up, b_up), grad_y)

    def ref(cast):
        leaves = [t.detach().to(cast).requires_grad_() for t in (x, w_down, b_down, w_up, b_up)]
        # written as the residual, not as add_input: the reference sums x's two gradients itself
        out = reference.bottleneck_adapter(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], leaves[0], False,
                                           "gelu", 0.6)
        return out, torch.autograd.grad(out, leaves, grad_y.to(cast))

    (y_base, g_base), (y_oracle, g_oracle) = ref(dtype), ref(f64)
    assert_close_to_oracle("y", y, y_base, y_oracle)
    for name, g, gb, go in zip(("x", "w_down", "b_down", "w_up", "b_up"), grads, g_base, g_oracle, strict=True):
        assert_close_to_oracle(f"d{name}", g, gb, go)
    # the same as the op with add_input
    y_op, _ = ops.bottleneck_adapter_forward(x, w_down, b_down, w_up, b_up, None, True, "gelu", 0.6)
    assert torch.equal(y, y_op)


@pytest.mark.parametrize("device", DEVICES)
def test_functional_matches_formula(device):
    x, w_down, b_down, w_up, b_up, res = make_inputs((2, 5), 13, 3, 7, f32, device, residual=True)
    y = functional.bottleneck_adapter(x, w_down, w_up, b_down, b_up, residual=res, activation="silu", scale=1.5)
    want = 1.5 * (F.silu(x @ w_down.t() + b_down) @ w_up.t() + b_up) + res  # written out, not reference.py
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    # defaults: relu, scale 1, no biases, no residual
    y = functional.bottleneck_adapter(x, w_down, w_up)
    torch.testing.assert_close(y, torch.relu(x @ w_down.t()) @ w_up.t(), rtol=1e-5, atol=1e-5)
    # scale 0 leaves the residual alone
    y = functional.bottleneck_adapter(x, w_down, w_up, b_down, b_up, residual=res, scale=0.0)
    torch.testing.assert_close(y, res)


@pytest.mark.parametrize("device", DEVICES)
def test_residual_gradient_is_grad_y_itself(device):
    """d y / d residual is the identity: autograd gets grad_y itself back, no copy."""
    x, w_down, b_down, w_up, b_up, res = make_inputs((3,), 13, 3, 7, f32, device, residual=True)
    y = functional.bottleneck_adapter(x, w_down, w_up, b_down, b_up, residual=res)
    grad_y = rand(*y.shape, device=device)
    (g,) = torch.autograd.grad(y, res, grad_y)
    assert g.data_ptr() == grad_y.data_ptr() and torch.equal(g, grad_y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("frozen_w_down", [False, True])
def test_saves_x_only_for_w_down_gradient(frozen_w_down, device):
    """x is kept for backward only when w_down needs a gradient; h (tokens x m) always; a = act(h) never."""
    x, w_down, b_down, w_up, b_up, _ = make_inputs((6,), 13, 3, 13, f32, device)
    w_down.requires_grad_(not frozen_w_down)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = functional.bottleneck_adapter(x, w_down, w_up, b_down, b_up, residual=x, activation="gelu")
    assert any(t is x for t in saved) != frozen_w_down
    assert sum(tuple(t.shape) == (6, 3) for t in saved) == 1  # h, and no a of the same shape
    assert all(t.numel() <= x.numel() for t in saved)  # nothing else activation-sized
    y.sum().backward()
    assert (w_down.grad is None) == frozen_w_down and x.grad is not None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_inputs_are_not_modified(dtype, device):
    inputs = make_inputs((2, 9), 12, 4, 12, dtype, device, residual=True)
    before = [t.detach().clone() for t in inputs]
    y, _ = ops.bottleneck_adapter_forward(*inputs, True, "gelu", 0.5)
    grad_y = rand(*y.shape, dtype=dtype, device=device)
    g_before = grad_y.clone()
    torch.autograd.grad(y, inputs, grad_y)
    for name, t, b in zip(NAMES, inputs, before, strict=True):
        assert torch.equal(t.detach(), b), f"{name} was modified"
    assert torch.equal(grad_y, g_before), "grad_y was modified"


@pytest.mark.parametrize("device", DEVICES)
def test_expanded_grad_y(device):
    """y.sum().backward() hands backward an expanded grad_y (stride 0)."""
    inputs = make_inputs((4, 3), 13, 3, 13, f32, device, residual=True)
    y, _ = ops.bottleneck_adapter_forward(*inputs, True, "relu", 0.9)
    got = torch.autograd.grad(y.sum(), inputs, retain_graph=True)
    want = torch.autograd.grad(y, inputs, torch.ones_like(y))
    for name, g, w in zip(NAMES, got, want, strict=True):
        torch.testing.assert_close(g, w, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_computes_in_the_autocast_dtype(device):
    x, w_down, b_down, w_up, b_up, res = make_inputs((5,), 16, 4, 16, f32, device, residual=True)
    with torch.autocast(device, dtype=bf16):
        y = functional.bottleneck_adapter(x, w_down, w_up, b_down, b_up, residual=res, activation="gelu", scale=0.5)
        y_seq = functional.bottleneck_adapter(x, w_down, w_up, b_down, b_up, residual=x, activation="gelu")
    assert y.dtype == y_seq.dtype == bf16
    cast = [t.detach().to(bf16) for t in (x, w_down, b_down, w_up, b_up, res)]
    want = reference.bottleneck_adapter(*cast, False, "gelu", 0.5)  # everything in the autocast dtype
    oracle = reference.bottleneck_adapter(*(t.double() for t in cast), False, "gelu", 0.5)
    assert_close_to_oracle("y under autocast", y, want, oracle)
    grads = torch.autograd.grad(y.float().sum() + y_seq.float().sum(), (x, w_down, b_down, w_up, b_up, res))
    assert all(g.dtype == f32 for g in grads)  # back to the leaves' dtype, as autocast does


# ==================================================================================================
# empty inputs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=str)
@pytest.mark.parametrize("add_input", [False, True])
def test_empty(lead, add_input, device):
    inputs = make_inputs(lead, 8, 3, 8, f32, device, residual=True)
    y, h = ops.bottleneck_adapter_forward(*inputs, add_input, "gelu", 0.5)
    assert y.shape == (*lead, 8) and h.shape == (0, 3)
    grads = torch.autograd.grad(y.sum(), inputs)
    for name, g, t in zip(NAMES, grads, inputs, strict=True):
        assert g.shape == t.shape, name
    for g in grads[1:5]:  # the parameters' gradients: sums over no tokens
        assert (g == 0).all()
    x, w_down, b_down, w_up = (t.detach() for t in inputs[:4])
    out = ops.bottleneck_adapter_backward(torch.empty(*lead, 8, device=device), x, w_down, b_down, w_up, h, add_input,
                                          "relu", 0.5, [True] * 6)
    assert [tuple(g.shape) for g in out] == [tuple(t.shape) for t in inputs]


@pytest.mark.parametrize("device", DEVICES)
def test_zero_width_input(device):
    """d_in = 0: h is b_down alone (a GEMM over nothing)."""
    x, w_down, b_down, w_up, b_up, _ = make_inputs((3,), 0, 2, 4, f32, device)
    y = functional.bottleneck_adapter(x, w_down, w_up, b_down, b_up, activation="silu")
    torch.testing.assert_close(y, (F.silu(b_down) @ w_up.t() + b_up).expand(3, 4))
    gx, gb = torch.autograd.grad(y.sum(), (x, b_down))
    assert gx.shape == (3, 0) and gb.shape == (2,)


# ==================================================================================================
# the backward op itself


@pytest.mark.parametrize("device", DEVICES)
def test_backward_op_mask(device):
    """Each gradient only where its mask bit is set; b_down's only when b_down is given; the residual's a copy of
    grad_y (an op's output may not alias its input)."""
    x, w_down, b_down, w_up, _, _ = (t.detach() if t is not None else None
                                     for t in make_inputs((2, 3), 13, 3, 13, f32, device))
    _, h = ops.bottleneck_adapter_forward(x, w_down, b_down, w_up, None, None, True, "gelu", 0.5)
    grad_y = rand(2, 3, 13, device=device)
    full = ops.bottleneck_adapter_backward(grad_y, x, w_down, b_down, w_up, h, True, "gelu", 0.5, [True] * 6)
    assert all(g is not None for g in full)
    assert full[5].data_ptr() != grad_y.data_ptr() and torch.equal(full[5], grad_y)
    for i in range(6):
        mask = [j == i for j in range(6)]
        out = ops.bottleneck_adapter_backward(grad_y, x if i == 1 else None, w_down, b_down, w_up, h, True, "gelu",
                                              0.5, mask)
        assert [g is not None for g in out] == mask
        torch.testing.assert_close(out[i], full[i], rtol=0, atol=0)
    out = ops.bottleneck_adapter_backward(grad_y, x, w_down, None, w_up, h, True, "gelu", 0.5, [True] * 6)
    assert out[2] is None and all(g is not None for i, g in enumerate(out) if i != 2)


# ==================================================================================================
# registration, opcheck, torch.compile


def test_kernels_registered():
    info = pefttorch.build_info()
    for op in ("bottleneck_adapter_forward", "bottleneck_adapter_backward"):
        assert op in info["ops"]
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pefttorch::{op}", "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pefttorch::{op}", "CUDA") == info["cuda"]


def forward_samples(device):
    for dtype in (f32, bf16, f64):
        yield (*make_inputs((5,), 12, 3, 12, dtype, device, residual=True), True, "gelu", 0.5)
        yield (*make_inputs((2, 3), 12, 4, 7, dtype, device, b_down=False, residual=True, x_layout="strided"),
               False, "relu", -1.5)
        yield (*make_inputs((3,), 6, 1, 6, dtype, device, b_up=False), True, "silu", 2.0)
        yield (*make_inputs((0,), 6, 2, 5, dtype, device), False, "gelu_tanh", 1.0)
    x, w_down, b_down, w_up, b_up, _ = make_inputs((4,), 6, 2, 5, f32, device)
    yield x.detach(), w_down, b_down.detach(), w_up.detach(), b_up, None, False, "relu", 1.0  # some frozen


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_forward(device):
    for args in forward_samples(device):
        torch.library.opcheck(_ops.bottleneck_adapter_forward.default, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask", [[True] * 6, [True, False, True, False, True, False],
                                  [False, True, False, True, False, True]], ids=str)
def test_opcheck_backward(mask, device):
    for dtype in (f32, bf16):
        x, w_down, b_down, w_up = (rand(2, 3, 12, dtype=dtype, device=device), rand(4, 12, dtype=dtype, device=device),
                                   rand(4, dtype=dtype, device=device), rand(12, 4, dtype=dtype, device=device))
        h, gy = rand(6, 4, dtype=dtype, device=device), rand(2, 3, 12, dtype=dtype, device=device)
        torch.library.opcheck(_ops.bottleneck_adapter_backward.default,
                              (gy, x, w_down, b_down, w_up, h, True, "gelu", 0.5, mask))
        torch.library.opcheck(_ops.bottleneck_adapter_backward.default,
                              (gy[..., ::2], x[..., ::2], w_down[:, ::2], None, w_up[::2], h, False, "relu", -1.0,
                               mask))
    e = torch.empty(0, 12, device=device)
    torch.library.opcheck(_ops.bottleneck_adapter_backward.default,
                          (e, e, rand(4, 12, device=device), None, rand(12, 4, device=device),
                           torch.empty(0, 4, device=device), True, "silu", 0.5, mask))


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    torch._dynamo.reset()

    def f(x, w_down, b_down, w_up, b_up, res):
        t = torch.tanh(x)
        # a sequential adapter (residual is its input: add_input), then a parallel one, then one with no residual
        seq = functional.bottleneck_adapter(t, w_down, w_up, b_down, b_up, residual=t, activation="gelu", scale=0.5)
        par = functional.bottleneck_adapter(seq, w_down, w_up, b_down, b_up, residual=res, activation="silu")
        return functional.bottleneck_adapter(par, w_down, w_up, activation="relu", scale=-2.0)

    compiled = torch.compile(f, fullgraph=True)
    inputs = make_inputs((3, 5), 13, 3, 13, f32, device, residual=True)
    got, want = compiled(*inputs), f(*inputs)
    torch.testing.assert_close(got, want)
    grads_c = torch.autograd.grad(got.sum(), inputs)
    grads = torch.autograd.grad(want.sum(), inputs)
    for name, g, w in zip(NAMES, grads_c, grads, strict=True):
        torch.testing.assert_close(g, w, msg=name)


# ==================================================================================================
# errors


def good(**over):
    """Valid forward arguments as a dict (x (3, 5), m = 4, d_out = 5), with the entries in `over` replaced."""
    args = dict(x=torch.randn(3, 5), w_down=torch.randn(4, 5), b_down=torch.randn(4), w_up=torch.randn(5, 4),
                b_up=torch.randn(5), residual=torch.randn(3, 5), add_input=True, activation="gelu", scale=0.5)
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(x=torch.tensor(1.0)), r"bottleneck_adapter_forward: x must have at least one dimension"),
        (dict(x=torch.ones(3, 5, dtype=torch.int32)), r"bottleneck_adapter_forward: x has unsupported dtype Int"),
        (dict(w_down=torch.randn(4, 5, 1)), r"w_down must be 2-D, got shape \[4, 5, 1\]"),
        (dict(w_up=torch.randn(20)), r"w_up must be 2-D, got shape \[20\]"),
        (dict(w_down=torch.randn(0, 5), w_up=torch.randn(5, 0), b_down=None),
         r"the bottleneck width m = w_down.size\(0\) must be at least 1, got shape \[0, 5\]"),
        (dict(w_up=torch.randn(5, 3)), r"w_up.size\(1\) must equal the bottleneck width m = w_down.size\(0\) \(4\), "
                                       r"got shape \[5, 3\]"),
        (dict(x=torch.randn(3, 6), residual=None, add_input=False),
         r"x.size\(-1\) must equal d_in = w_down.size\(1\) \(5\), got shape \[3, 6\]"),
        (dict(b_down=torch.randn(5)), r"b_down.size\(0\) must equal the bottleneck width m = w_down.size\(0\) \(4\)"),
        (dict(b_down=torch.randn(1, 4)), r"b_down must be 1-D, got shape \[1, 4\]"),
        (dict(b_up=torch.randn(4)), r"b_up.size\(0\) must equal d_out = w_up.size\(0\) \(5\), got shape \[4\]"),
        (dict(residual=torch.randn(3, 4)),
         r"residual must have the shape of y, x.shape\[:-1\] \+ \(d_out,\) = \[3, 5\], got \[3, 4\]"),
        (dict(residual=torch.randn(5)), r"residual must have the shape of y"),
        (dict(w_up=torch.randn(6, 4), b_up=None, residual=None),
         r"add_input \(the adapter's input added to its output, as with residual=x\) needs d_out = w_up.size\(0\) "
         r"\(6\) to equal d_in = w_down.size\(1\) \(5\)"),
        (dict(w_down=torch.randn(4, 5, dtype=f64)), r"w_down has dtype Double but x has Float; cast them to one dtype"),
        (dict(w_up=torch.randn(5, 4, dtype=bf16)), r"w_up has dtype BFloat16 but x has Float"),
        (dict(b_down=torch.randn(4, dtype=f16)), r"b_down has dtype Half but x has Float"),
        (dict(b_up=torch.randn(5, dtype=f64)), r"b_up has dtype Double but x has Float"),
        (dict(residual=torch.randn(3, 5, dtype=bf16)), r"residual has dtype BFloat16 but x has Float"),
        (dict(activation="tanh"), r"bottleneck_adapter_forward: unsupported activation 'tanh'; supported: relu, "
                                  r"gelu, gelu_tanh, silu"),
        (dict(scale=float("nan")), r"bottleneck_adapter_forward: scale must be finite, got nan"),
        (dict(scale=float("inf")), r"scale must be finite, got inf"),
    ],
    ids=lambda v: ",".join(v) if isinstance(v, dict) else None,
)
def test_forward_bad_input(over, match):
    with pytest.raises(RuntimeError, match=match):
        ops.bottleneck_adapter_forward(*good(**over).values())


def backward_args(**over):
    """Valid backward arguments as a dict (tokens 3, d_in = d_out = 5, m = 4), with `over` replaced."""
    args = dict(grad_y=torch.randn(3, 5), x=torch.randn(3, 5), w_down=torch.randn(4, 5), b_down=torch.randn(4),
                w_up=torch.randn(5, 4), h=torch.randn(3, 4), add_input=True, activation="gelu", scale=0.5,
                output_mask=[True] * 6)
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(grad_y=torch.tensor(1.0)), r"bottleneck_adapter_backward: grad_y must have at least one dimension"),
        (dict(grad_y=torch.ones(3, 5, dtype=torch.int64)), r"grad_y has unsupported dtype Long"),
        (dict(grad_y=torch.randn(3, 4)), r"grad_y.size\(-1\) must equal d_out = w_up.size\(0\) \(5\)"),
        (dict(h=torch.randn(3, 3)), r"h must have shape \(tokens, m\) = \(3, 4\) \(forward's second output\), "
                                    r"got \[3, 3\]"),
        (dict(h=torch.randn(12)), r"h must be 2-D, got shape \[12\]"),
        (dict(h=torch.randn(3, 4, dtype=f64)), r"h has dtype Double but grad_y has Float"),
        (dict(x=None), r"x is needed for the w_down gradient"),
        (dict(x=torch.randn(2, 5)), r"x has 2 tokens but grad_y has 3"),
        (dict(x=torch.randn(3, 4)), r"x.size\(-1\) must equal d_in = w_down.size\(1\) \(5\)"),
        (dict(x=torch.randn(3, 5, dtype=bf16)), r"x has dtype BFloat16 but grad_y has Float"),
        (dict(w_up=torch.randn(6, 4), grad_y=torch.randn(3, 6)), r"bottleneck_adapter_backward: add_input"),
        (dict(b_down=torch.randn(3)), r"b_down.size\(0\) must equal the bottleneck width"),
        (dict(w_down=torch.randn(4, 5, dtype=f64)), r"w_down has dtype Double but grad_y has Float"),
        (dict(activation="GELU"), r"bottleneck_adapter_backward: unsupported activation 'GELU'"),
        (dict(scale=float("-inf")), r"bottleneck_adapter_backward: scale must be finite, got -inf"),
    ],
    ids=lambda v: ",".join(v) if isinstance(v, dict) else None,
)
def test_backward_bad_input(over, match):
    with pytest.raises(RuntimeError, match=match):
        ops.bottleneck_adapter_backward(*backward_args(**over).values())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(activation="tanh"), ValueError, r"bottleneck_adapter: unsupported activation 'tanh'; supported: relu, "
                                              r"gelu, gelu_tanh, silu"),
        (dict(scale=float("nan")), ValueError, r"bottleneck_adapter: scale must be finite, got nan"),
        (dict(w_up=torch.randn(6, 4)), RuntimeError, r"add_input \(the adapter's input added to its output, as with "
                                                     r"residual=x\) needs d_out = w_up.size\(0\) \(6\)"),
        (dict(w_down=torch.randn(4, 6)), RuntimeError, r"x.size\(-1\) must equal d_in = w_down.size\(1\) \(6\)"),
        (dict(x=torch.randn(3, 5, dtype=bf16)), RuntimeError, r"w_down has dtype Float but x has BFloat16"),
    ],
    ids=lambda v: ",".join(v) if isinstance(v, dict) else None,
)
def test_functional_bad_input(kwargs, error, match):
    args = dict(x=torch.randn(3, 5), w_down=torch.randn(4, 5), w_up=torch.randn(5, 4))
    args.update(kwargs)
    x = args.pop("x")
    with pytest.raises(error, match=match):
        functional.bottleneck_adapter(x, args.pop("w_down"), args.pop("w_up"), residual=x, **args)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_device_mismatch():
    cuda = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in good().items()}
    with pytest.raises(RuntimeError, match=r"bottleneck_adapter_forward: w_down is on cpu but x is on cuda:0"):
        ops.bottleneck_adapter_forward(*dict(cuda, w_down=good()["w_down"]).values())
    with pytest.raises(RuntimeError, match=r"bottleneck_adapter_forward: residual is on cpu but x is on cuda:0"):
        ops.bottleneck_adapter_forward(*dict(cuda, residual=good()["residual"]).values())
    with pytest.raises(RuntimeError, match=r"bottleneck_adapter_forward: b_up is on cuda:0 but x is on cpu"):
        ops.bottleneck_adapter_forward(*dict(good(), b_up=cuda["b_up"]).values())
    args = backward_args()
    cuda_b = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(RuntimeError, match=r"bottleneck_adapter_backward: h is on cpu but grad_y is on cuda:0"):
        ops.bottleneck_adapter_backward(*dict(cuda_b, h=args["h"]).values())
    with pytest.raises(RuntimeError, match=r"bottleneck_adapter_backward: x is on cpu but grad_y is on cuda:0"):
        ops.bottleneck_adapter_backward(*dict(cuda_b, x=args["x"]).values())


@pytest.mark.parametrize("device", DEVICES)
def test_output_can_be_changed_in_place(device):
    """As a linear layer's output: a model may add to it in place (it once was a view, which autograd forbids)."""
    g = torch.Generator().manual_seed(3)
    x, w_down, w_up, other = (torch.randn(*s, generator=g, dtype=torch.float64).to(device).requires_grad_()
                              for s in ((2, 3, 6), (4, 6), (6, 4), (2, 3, 6)))
    y = functional.bottleneck_adapter(x, w_down, w_up, residual=x)
    y += other
    got = torch.autograd.grad((y * y).sum(), (x, w_down, w_up, other))
    want_y = reference.bottleneck_adapter(x, w_down, None, w_up, None, x, False, "relu", 1.0) + other
    want = torch.autograd.grad((want_y * want_y).sum(), (x, w_down, w_up, other))
    torch.testing.assert_close(y, want_y)
    for got_g, want_g in zip(got, want, strict=True):
        torch.testing.assert_close(got_g, want_g)
