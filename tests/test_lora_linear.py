"""The fused LoRA linear op against the pure-PyTorch reference: forward and every gradient."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICES, DTYPES, assert_close_to_oracle, rand
from hypothesis import given, settings

from pefttorch import functional, ops, reference

# (leading dims of x, in_features, out_features, r): odd sizes, 1-token inputs, 3-D inputs, ranks that
# are not multiples of 16 and ranks above the 64-wide CUDA tile; in_features and tokens above 256, which the
# CUDA dropout kernels split over blocks (down over in_features, 5 splits here, the last one short; grad_a over
# tokens, 3 splits).
SHAPES = [
    ((1,), 3, 5, 1),
    ((3,), 17, 33, 3),
    ((17,), 64, 48, 16),
    ((2, 5), 20, 12, 4),
    ((3, 7), 33, 65, 17),
    ((130,), 72, 40, 70),
    ((130,), 71, 40, 17),  # in_features odd: no row of x is aligned for vector loads
    ((40,), 1100, 24, 16),
    ((600,), 300, 20, 5),
]


def _x_view(kind: str, lead, in_features, dtype, device):
    """x of shape (*lead, in_features) with the memory layout `kind`."""
    if kind == "contiguous":
        return rand(*lead, in_features, dtype=dtype, device=device)
    if kind == "padded_rows":  # unit inner stride, row stride > in_features: no copy needed
        return rand(*lead, in_features + 5, dtype=dtype, device=device)[..., :in_features]
    if kind == "strided":  # every other column: inner stride 2
        return rand(*lead, 2 * in_features, dtype=dtype, device=device)[..., ::2]
    if kind == "offset":  # contiguous, but one element into its storage: vector loads must see the misalignment
        numel = math.prod(lead) * in_features
        return rand(numel + 1, dtype=dtype, device=device)[1:].view(*lead, in_features)
    if kind == "transposed":  # (in, *lead) transposed into place
        return rand(in_features, *reversed(lead), dtype=dtype, device=device).permute(
            *range(len(lead), 0, -1), 0
        )
    raise ValueError(kind)


def run_case(lead, in_features, out_features, r, dtype, device, *, bias=True, dropout_p=0.0,
             x_kind="contiguous", weight_grad=False, x_grad=True, scaling=0.7, seed=1234, grad_kind="contiguous",
             params_transposed=False):
    x = _x_view(x_kind, lead, in_features, dtype, device).requires_grad_(x_grad)
    assert x.shape == (*lead, in_features)

    def param(rows, cols, requires_grad):
        # transposed: a (cols, rows) tensor seen as (rows, cols), as GPT-2's Conv1D weight is used
        t = rand(cols, rows, dtype=dtype, device=device, scale=0.2).t() if params_transposed else \
            rand(rows, cols, dtype=dtype, device=device, scale=0.2)
        return t.requires_grad_(requires_grad)

    weight = param(out_features, in_features, weight_grad)
    lora_a = param(r, in_features, True)
    lora_b = param(out_features, r, True)
    b = rand(out_features, dtype=dtype, device=device, requires_grad=True) if bias else None
    inputs = [t for t in (x, weight, lora_a, lora_b, b) if t is not None and t.requires_grad]
    grad_y = _x_view(grad_kind, lead, out_features, dtype, device)

    seed_t = torch.tensor(seed) if dropout_p > 0 else None
    y, s = ops.lora_linear_forward(x, weight, lora_a, lora_b, b, scaling, dropout_p, seed_t)
    grads = torch.autograd.grad(y, inputs, grad_y)

    def ref(cast):
        leaves = [t.detach().to(cast).requires_grad_(t.requires_grad) if t is not None else None
                  for t in (x, weight, lora_a, lora_b, b)]
        out = reference.lora_linear(*leaves, scaling=scaling, dropout_p=dropout_p, seed=seed)
        want = [t for t in leaves if t is not None and t.requires_grad]
        return out, torch.autograd.grad(out, want, grad_y.to(cast))

    y_base, g_base = ref(dtype)
    y_oracle, g_oracle = ref(torch.float64)
    assert y.device.type == device and s.shape == (x.numel() // in_features, r)
    assert_close_to_oracle("y", y, y_base, y_oracle)
    names = [n for n, t in zip(("x", "weight", "lora_a", "lora_b", "bias"), (x, weight, lora_a, lora_b, b), strict=True)
             if t is not None and t.requires_grad]
    for name, g, gb, go in zip(names, grads, g_base, g_oracle, strict=True):
        assert_close_to_oracle(f"d{name}", g, gb, go)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_matches_reference(shape, dtype, device, dropout_p):
    run_case(*shape, dtype, device, dropout_p=dropout_p)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("x_kind", ["padded_rows", "strided", "transposed", "offset"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_strided_inputs(x_kind, dtype, device, dropout_p):
    """Strided x and a strided incoming gradient, with the frozen weight's gradient asked for too (dW reads x and
    grad_y through their strides)."""
    run_case((4, 6), 24, 10, 5, dtype, device, x_kind=x_kind, dropout_p=dropout_p, weight_grad=True,
             grad_kind={"padded_rows": "strided", "strided": "transposed", "transposed": "padded_rows",
                        "offset": "offset"}[x_kind])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_transposed_parameters(dtype, device):
    """Weight, A and B as transposed views (a Conv1D-style layout), gradients of all three, against the
    reference (they were compared only compiled against eager)."""
    run_case((3, 5), 17, 9, 3, dtype, device, weight_grad=True, params_transposed=True, dropout_p=0.1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.5])
def test_no_bias_and_weight_grad(device, dropout_p):
    run_case((9,), 13, 11, 2, torch.float32, device, bias=False, weight_grad=True, dropout_p=dropout_p)


@pytest.mark.parametrize("device", DEVICES)
def test_only_adapter_grads(device):
    # x needs no grad: the common case of a first layer fed by a frozen embedding.
    run_case((5,), 16, 8, 4, torch.float32, device, x_grad=False, dropout_p=0.1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=str)
def test_empty_input(device, lead):
    x = rand(*lead, 8, device=device, requires_grad=True)
    w = rand(6, 8, device=device)
    a = rand(2, 8, device=device, requires_grad=True)
    b = rand(6, 2, device=device, requires_grad=True)
    y = functional.lora_linear(x, w, a, b, rand(6, device=device), dropout=0.1)
    assert y.shape == (*lead, 6)
    gx, ga, gb = torch.autograd.grad(y.sum(), (x, a, b))
    assert gx.shape == x.shape and (ga == 0).all() and (gb == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_zero_in_features(device):
    x = rand(3, 0, device=device, requires_grad=True)
    w, a, b = rand(4, 0, device=device), rand(2, 0, device=device, requires_grad=True), rand(4, 2, device=device,
                                                                                             requires_grad=True)
    bias = rand(4, device=device)
    y = functional.lora_linear(x, w, a, b, bias, dropout=0.5)
    torch.testing.assert_close(y, bias.expand(3, 4))
    gx, ga, gb = torch.autograd.grad(y.sum(), (x, a, b))
    assert gx.shape == (3, 0) and ga.shape == (2, 0) and (gb == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_nan_propagates_through_dropout(device):
    # A NaN in x must reach s = dropout(x) A^T even where dropout drops it (as torch.dropout does:
    # NaN * 0 = NaN), rather than being silently zeroed.
    x = rand(4, 8, device=device)
    x[1, 3] = float("nan")
    w, a, b = rand(5, 8, device=device), rand(2, 8, device=device), rand(5, 2, device=device)
    _, s = ops.lora_linear_forward(x, w, a, b, None, 1.0, 0.999, torch.tensor(7))
    assert torch.isnan(s[1]).all() and not torch.isnan(s[[0, 2, 3]]).any()


@pytest.mark.parametrize("device", DEVICES)
def test_functional_matches_module_formula(device):
    x, w, a, b = rand(3, 4, 8, device=device), rand(5, 8, device=device), rand(2, 8, device=device), rand(
        5, 2, device=device)
    bias = rand(5, device=device)
    y = functional.lora_linear(x, w, a, b, bias, scaling=2.0)
    want = x @ w.t() + bias + 2.0 * (x @ a.t() @ b.t())  # written out, independent of reference.py
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    # training=False disables dropout whatever its probability
    torch.testing.assert_close(functional.lora_linear(x, w, a, b, bias, scaling=2.0, dropout=0.9,
                                                      training=False), y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_inputs_are_not_modified(device, dtype, dropout_p):
    tensors = [rand(2, 9, 12, dtype=dtype, device=device), rand(7, 12, dtype=dtype, device=device),
               rand(3, 12, dtype=dtype, device=device), rand(7, 3, dtype=dtype, device=device),
               rand(7, dtype=dtype, device=device)]
    before = [t.clone() for t in tensors]
    leaves = [t.requires_grad_() for t in tensors]
    y, s = ops.lora_linear_forward(*leaves, 0.5, dropout_p, torch.tensor(5) if dropout_p else None)
    grad_y = rand(*y.shape, dtype=dtype, device=device)
    g_before = grad_y.clone()
    torch.autograd.grad(y, leaves, grad_y)
    for name, t, b in zip(("x", "weight", "lora_a", "lora_b", "bias"), tensors, before, strict=True):
        assert torch.equal(t.detach(), b), f"{name} was modified"
    assert torch.equal(grad_y, g_before), "grad_y was modified"


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_leaves_float64_alone(device):
    """Autocast does not cast float64 (F.linear computes it in float64); the ops cast it to bfloat16 (error 0.26)."""
    def make(*shape):
        return rand(*shape, device=device, dtype=torch.float64)

    x, w, bias, a, b, up = make(3, 17), make(5, 17), make(5), make(4, 17), make(5, 4), make(17, 4)
    with torch.autocast(device, dtype=torch.bfloat16):
        got = {"lora_linear": functional.lora_linear(x, w, a, b, bias, scaling=0.5),
               "bottleneck_adapter": functional.bottleneck_adapter(x, a, up, residual=x, activation="gelu"),
               "sparse_mlp": functional.sparse_mlp(x, w, w, b_in=bias)}
    want = {"lora_linear": reference.lora_linear(x, w, a, b, bias, scaling=0.5),
            "bottleneck_adapter": reference.bottleneck_adapter(x, a, None, up, None, None, True, "gelu", 1.0),
            "sparse_mlp": reference.sparse_mlp(x, w, bias, None, None, w, None, "relu", 0.0)}
    for name, y in got.items():
        assert y.dtype == torch.float64, name
        torch.testing.assert_close(y, want[name], msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_computes_in_the_autocast_dtype(device):
    x = rand(5, 16, device=device, requires_grad=True)
    w, bias = rand(8, 16, device=device), rand(8, device=device)
    a, b = rand(4, 16, device=device, requires_grad=True), rand(8, 4, device=device, requires_grad=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = functional.lora_linear(x, w, a, b, bias, scaling=0.5)
        want = F.linear(x, w, bias) + 0.5 * F.linear(F.linear(x, a), b)  # what autocast makes of it
    assert y.dtype == want.dtype == torch.bfloat16
    oracle = reference.lora_linear(x.double(), w.double(), a.double(), b.double(), bias.double(), scaling=0.5)
    assert_close_to_oracle("y under autocast", y, want, oracle)
    grads = torch.autograd.grad(y.float().sum(), (x, a, b))
    assert all(g.dtype == torch.float32 for g in grads)  # back to the leaves' dtype, as autocast does


@settings(max_examples=25, deadline=None)
@given(
    lead=st.lists(st.integers(0, 6), min_size=1, max_size=3),
    in_features=st.integers(1, 40),
    out_features=st.integers(1, 40),
    r=st.integers(1, 20),
    dropout_p=st.sampled_from([0.0, 0.25, 0.9]),
    bias=st.booleans(),
    seed=st.integers(0, 2**63 - 1),
)
def test_property_any_shape_float64(lead, in_features, out_features, r, dropout_p, bias, seed):
    run_case(tuple(lead), in_features, out_features, r, torch.float64, "cpu", bias=bias, dropout_p=dropout_p,
             seed=seed, weight_grad=True)


def test_meta_tensors_give_shapes():
    """Meta tensors (shape inference, deferred initialisation) get the output's shape, as F.linear gives, where
    asking autocast about the meta device raised."""
    def meta(*shape):
        return torch.empty(*shape, device="meta")

    y = functional.lora_linear(meta(2, 5, 10), meta(6, 10), meta(3, 10), meta(6, 3), meta(6))
    assert y.device.type == "meta" and y.shape == (2, 5, 6)
    w_down, w_up = meta(4, 10), meta(10, 4)
    assert functional.bottleneck_adapter(meta(3, 10), w_down, w_up).shape == (3, 10)


@pytest.mark.parametrize("device", DEVICES)
def test_output_can_be_changed_in_place(device):
    """Models change a linear layer's output in place (Falcon: mlp_output += attention_output); the op's output
    was a view, which autograd forbids changing in place for a Function with two outputs."""
    g = torch.Generator().manual_seed(3)
    x, w, a, b, other = (torch.randn(*s, generator=g, dtype=torch.float64).to(device).requires_grad_()
                         for s in ((2, 3, 5), (4, 5), (2, 5), (4, 2), (2, 3, 4)))
    y = functional.lora_linear(x, w, a, b, scaling=0.5)
    y += other
    y.mul_(3.0)
    got = torch.autograd.grad((y * y).sum(), (x, w, a, b, other))
    want_y = (reference.lora_linear(x, w, a, b, scaling=0.5) + other) * 3.0
    want = torch.autograd.grad((want_y * want_y).sum(), (x, w, a, b, other))
    torch.testing.assert_close(y, want_y)
    for got_g, want_g in zip(got, want, strict=True):
        torch.testing.assert_close(got_g, want_g)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_backward_keeps_x_and_the_rank_sized_product_only(dropout):
    """The README: backward keeps only x and the (tokens, r) product (the dropout mask is regenerated from a seed,
    never stored). Every tensor autograd saves is counted: beyond the parameters and the seed, x itself and one
    (tokens, r) tensor."""
    x = torch.randn(4, 16, 32)
    weight = torch.randn(24, 32)
    lora_a, lora_b = torch.randn(3, 32, requires_grad=True), torch.randn(24, 3, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        functional.lora_linear(x, weight, lora_a, lora_b, scaling=0.5, dropout=dropout, training=True)
    params = {t.untyped_storage().data_ptr() for t in (weight, lora_a, lora_b)}
    kept = [t for t in saved if t.untyped_storage().data_ptr() not in params and t.numel() > 1]
    assert sorted(tuple(t.shape) for t in kept) == sorted([tuple(x.shape), (64, 3)])
    assert any(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in kept)  # x, not a copy
