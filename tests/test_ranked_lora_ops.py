"""The ranked LoRA factor ops (IncreLoRA, AdaLoRA): ranked_lora_factors and ranked_lora_factors_backward.

The forward is a product rounded once to the storage dtype and a cast, so it must equal the reference bit for bit.
The gradients are checked against a float64 oracle, within what the reference computed in the same dtypes gets
(pefttorch.testing.check_accuracy); the rows a ranked layer must not train (past n, and e's reserve rows) must
be exactly zero.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import DEVICES, HAS_CUDA, assert_close_to_oracle

from pefttorch import ops, reference

_ops = torch.ops.pefttorch

f32, f64, bf16, f16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
# (storage dtype, compute dtype): adapters kept in float32 for a bf16/fp16 model (the usual), the same dtype, and
# storage coarser than the compute dtype
PAIRS = [(f32, f32), (f32, bf16), (f32, f16), (f64, f64), (bf16, bf16), (bf16, f32), (f16, f64)]
# (capacity, in, out, n, e_rows): one of everything, odd sizes, n = capacity, n = 0, a reserve (e_rows < n)
SHAPES = [(1, 1, 1, 1, 1), (3, 17, 5, 2, 2), (17, 3, 33, 17, 9), (5, 17, 3, 0, 0), (40, 300, 129, 23, 20)]


def ids(value):
    return str(value).replace("torch.", "")


def storage(cap, fan_in, fan_out, dtype, device, strided=False):
    """Fresh random a (cap, in), e (cap, 1), b_t (cap, out); with `strided`, views that are not contiguous."""
    def t(rows, cols):
        if not strided:
            return torch.randn(rows, cols, dtype=f64).to(dtype=dtype, device=device)
        return torch.randn(cols, 2 * rows, dtype=f64).to(dtype=dtype, device=device).t()[::2]

    a, e, b_t = t(cap, fan_in), t(cap, 1), t(cap, fan_out)
    assert not strided or cap < 2 or not a.is_contiguous()
    return a, e, b_t


def every_case(test):
    """Runs `test` over every shape, dtype pair, storage layout and device."""
    for name, values, kwargs in (("shape", SHAPES, {"ids": ids}), ("dtype, compute", PAIRS, {"ids": ids}),
                                 ("strided", [False, True], {"ids": ["contiguous", "strided"]}),
                                 ("device", DEVICES, {})):
        test = pytest.mark.parametrize(name, values, **kwargs)(test)
    return test


def held(e, e_rows):
    """e with rows from e_rows on held fixed (no gradient): what the ranked layer does to reserve components."""
    return torch.cat([e[:e_rows], e[e_rows:].detach()])


@every_case
def test_forward_equals_reference(shape, dtype, compute, strided, device):
    cap, fan_in, fan_out, n, _ = shape
    a, e, b_t = storage(cap, fan_in, fan_out, dtype, device, strided)
    a_n, b_n = ops.ranked_lora_factors(a, e, b_t, n, compute)
    want_a, want_b = reference.ranked_lora_factors(a, e, b_t, n, compute)
    for got, want in ((a_n, want_a), (b_n, want_b)):
        assert got.dtype == compute and got.device == a.device and got.is_contiguous()
        assert torch.equal(got, want)


@every_case
def test_backward_matches_reference(shape, dtype, compute, strided, device):
    cap, fan_in, fan_out, n, e_rows = shape
    a, e, b_t = storage(cap, fan_in, fan_out, dtype, device, strided)
    # the incoming gradients in the compute dtype; grad_b_n transposed, as autograd may hand it over
    grad_a_n = torch.randn(n, fan_in, dtype=f64).to(dtype=compute, device=device)
    grad_b_n = torch.randn(n, fan_out, dtype=f64).to(dtype=compute, device=device).t()
    ga, ge, gb = ops.ranked_lora_factors_backward(grad_a_n, grad_b_n, a, e, b_t, e_rows, [True, True, True])

    def reference_grads(a, e, b_t, grads, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (a, e, b_t)]
        outs = reference.ranked_lora_factors(leaves[0], held(leaves[1], e_rows), leaves[2], n, grads[0].dtype)
        torch.autograd.backward(outs, grads)
        return [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]

    baseline = reference_grads(a, e, b_t, (grad_a_n, grad_b_n), dtype)
    oracle = reference_grads(a, e, b_t, (grad_a_n.double(), grad_b_n.double()), f64)
    for name, got, base, want in zip(("lora_a", "lora_e", "lora_b_t"), (ga, ge, gb), baseline, oracle, strict=True):
        assert got.device == a.device and got.is_contiguous()
        assert_close_to_oracle(name, got, base, want)
    # what must not train is exactly zero, not merely small
    assert not ga[n:].any() and not gb[n:].any() and not ge[e_rows:].any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask", list(itertools.product([False, True], repeat=3)), ids=str)
def test_backward_computes_what_the_mask_asks(mask, device):
    a, e, b_t = storage(6, 7, 5, f32, device)
    grad_a_n = torch.randn(4, 7, device=device) if mask[0] or mask[1] else None
    grad_b_n = torch.randn(5, 4, device=device) if mask[2] else None
    got = ops.ranked_lora_factors_backward(grad_a_n, grad_b_n, a, e, b_t, 3, list(mask))
    for want, g, like in zip(mask, got, (a, e, b_t), strict=True):
        assert (g is not None) == want
        if want:
            assert g.shape == like.shape
    if mask[1]:  # the sum over the row, not a copy of some element
        torch.testing.assert_close(got[1][:3, 0], (grad_a_n[:3] * a[:3]).sum(1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, compute", [(f32, bf16), (f64, f64), (bf16, f32)], ids=ids)
def test_autograd_through_the_op(dtype, compute, device):
    """The op's registered gradient (used by torch.compile and direct calls) is the plain one: e's of every used row."""
    a, e, b_t = (t.requires_grad_() for t in storage(9, 17, 3, dtype, device))
    a_n, b_n = ops.ranked_lora_factors(a, e, b_t, 5, compute)
    ga_n, gb_n = torch.randn_like(a_n), torch.randn_like(b_n)
    got = torch.autograd.grad((a_n, b_n), (a, e, b_t), (ga_n, gb_n))
    ra, re, rb = (t.detach().double().requires_grad_() for t in (a, e, b_t))
    want = torch.autograd.grad(reference.ranked_lora_factors(ra, re, rb, 5, f64), (ra, re, rb),
                               (ga_n.double(), gb_n.double()))
    base_leaves = [t.detach().requires_grad_() for t in (a, e, b_t)]
    base = torch.autograd.grad(reference.ranked_lora_factors(*base_leaves, 5, compute), base_leaves, (ga_n, gb_n))
    for name, g, b, w in zip(("lora_a", "lora_e", "lora_b_t"), got, base, want, strict=True):
        assert_close_to_oracle(name, g, b, w)


def test_autograd_with_one_output_used():
    """The factors behind an unused output get no gradient (None, as the reference gives in eager mode, so an
    optimizer skips them), not a zero one."""
    fn = ops.ranked_lora_factors
    a, e, b_t = (t.requires_grad_() for t in storage(4, 3, 5, f32, "cpu"))
    a_n, _ = fn(a, e, b_t, 2, f32)
    a_n.sum().backward()
    assert b_t.grad is None  # b_n had no gradient: none reaches b_t
    torch.testing.assert_close(a.grad[:2], e[:2].detach().expand(2, 3))
    assert not a.grad[2:].any()
    a, e, b_t = (t.detach().requires_grad_() for t in (a, e, b_t))
    _, b_n = fn(a, e, b_t, 2, f32)
    b_n.sum().backward()
    assert a.grad is None and e.grad is None and b_t.grad is not None


def test_gradcheck():
    def t(*shape):
        return torch.randn(*shape, dtype=f64, requires_grad=True)

    assert torch.autograd.gradcheck(lambda a, e, b: ops.ranked_lora_factors(a, e, b, 3, f64), (t(5, 7), t(5, 1),
                                                                                                  t(5, 4)))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for n, grad in ((3, True), (0, False), (5, True)):
        a, e, b_t = (t.requires_grad_(grad) for t in storage(5, 7, 3, f32, device))
        torch.library.opcheck(_ops.ranked_lora_factors.default, (a, e, b_t, n, bf16))
    a, e, b_t = storage(5, 7, 3, f32, device)
    for mask in ([True, True, True], [False, True, False], [False, False, True]):
        grads = (torch.randn(4, 7, dtype=bf16, device=device), torch.randn(3, 4, dtype=bf16, device=device))
        torch.library.opcheck(_ops.ranked_lora_factors_backward.default, (*grads, a, e, b_t, 2, mask))


def test_empty_sizes():
    a, e, b_t = storage(3, 0, 0, f32, "cpu")
    a_n, b_n = ops.ranked_lora_factors(a, e, b_t, 2, f32)
    assert a_n.shape == (2, 0) and b_n.shape == (0, 2)
    ga, ge, gb = ops.ranked_lora_factors_backward(torch.empty(2, 0), torch.empty(0, 2), a, e, b_t, 2,
                                                  [True, True, True])
    assert ga.shape == (3, 0) and gb.shape == (3, 0)
    assert not ge.any()  # the sum over no elements
    empty = torch.empty(0, 4)
    assert ops.ranked_lora_factors(empty, empty[:, :1], empty, 0, f32)[0].shape == (0, 4)


# ==================================================================================================
# bad input


def _fwd_args(**over):
    a, e, b_t = storage(4, 3, 5, f32, "cpu")
    args = {"lora_a": a, "lora_e": e, "lora_b_t": b_t, "n": 2, "dtype": bf16}
    args.update(over)
    return args


@pytest.mark.parametrize("over, match", [
    ({"lora_a": torch.ones(4, 3, dtype=torch.int32)}, "unsupported dtype Int"),
    ({"lora_e": torch.randn(4)}, "lora_e must be 2-D"),
    ({"lora_e": torch.randn(4, 2)}, r"lora_e.size\(1\) must equal 1"),
    ({"lora_e": torch.randn(3, 1)}, "the capacity"),
    ({"lora_b_t": torch.randn(5, 5)}, "the capacity"),
    ({"lora_b_t": torch.randn(4, 5, dtype=f64)}, "lora_b_t has dtype Double but lora_a has Float"),
    ({"n": 5}, r"n must be in \[0, capacity = 4\], got 5"),
    ({"n": -1}, "n must be in"),
    ({"dtype": torch.int64}, "dtype Long is not supported"),
], ids=lambda v: v if isinstance(v, str) else "-".join(v))
def test_forward_bad_input(over, match):
    args = _fwd_args(**over)
    with pytest.raises(RuntimeError, match=match):
        ops.ranked_lora_factors(*args.values())


@pytest.mark.parametrize("over, match", [
    ({"grad_a_n": None}, "grad_a_n is needed"),
    ({"grad_b_n": None}, "grad_b_n is needed"),
    ({"grad_a_n": torch.randn(2, 4)}, r"grad_a_n.size\(1\) must equal in_features"),
    ({"grad_b_n": torch.randn(4, 2)}, r"grad_b_n.size\(0\) must equal out_features"),
    ({"grad_b_n": torch.randn(5, 3)}, r"grad_b_n.size\(1\) must equal n"),
    ({"grad_b_n": torch.randn(5, 2, dtype=f64)}, "grad_b_n has dtype Double but grad_a_n has Float"),
    ({"grad_a_n": torch.ones(2, 3, dtype=torch.int32)}, "unsupported dtype Int"),
    ({"grad_a_n": torch.randn(5, 3), "grad_b_n": torch.randn(5, 5)}, "more than the capacity 4"),
    ({"e_rows": 3}, r"e_rows must be in \[0, n = 2\], got 3"),
    ({"e_rows": -1}, "e_rows must be in"),
], ids=lambda v: v if isinstance(v, str) else "-".join(v))
def test_backward_bad_input(over, match):
    a, e, b_t = storage(4, 3, 5, f32, "cpu")
    args = {"grad_a_n": torch.randn(2, 3), "grad_b_n": torch.randn(5, 2), "a": a, "e": e, "b_t": b_t, "e_rows": 2,
            "mask": [True, True, True]}
    args.update(over)
    with pytest.raises(RuntimeError, match=match):
        ops.ranked_lora_factors_backward(*args.values())


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_device_mismatch():
    a, e, b_t = storage(4, 3, 5, f32, "cuda")
    with pytest.raises(RuntimeError, match="lora_e is on cpu but lora_a is on cuda"):
        ops.ranked_lora_factors(a, e.cpu(), b_t, 2, f32)
    with pytest.raises(RuntimeError, match="grad_a_n is on cpu but lora_a is on cuda"):
        ops.ranked_lora_factors_backward(torch.randn(2, 3), None, a, e, b_t, 2, [True, False, False])


def test_listed_in_build_info():
    import pefttorch

    info = pefttorch.build_info()
    assert {"ranked_lora_factors", "ranked_lora_factors_backward"} <= set(info["ops"])
    assert "cpu" in info["devices"]
