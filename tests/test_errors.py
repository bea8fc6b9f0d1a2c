"""Bad input gets a clear error that names the tensor and what was expected, never a crash."""

from __future__ import annotations

import pytest
import torch
from helpers import HAS_CUDA, rand

from pefttorch import functional, ops, reference


def args(**over):
    base = dict(x=rand(4, 8), weight=rand(6, 8), lora_a=rand(2, 8), lora_b=rand(6, 2), bias=rand(6))
    base.update(over)
    return base


def call(**over):
    a = args(**over)
    return functional.lora_linear(a["x"], a["weight"], a["lora_a"], a["lora_b"], a["bias"],
                                  dropout=over.get("dropout", 0.0))


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(x=rand(4, 7)), r"x\.size\(-1\) must equal in_features"),
        (dict(lora_a=rand(2, 9)), r"lora_a\.size\(1\) must equal in_features"),
        (dict(lora_b=rand(5, 2)), r"lora_b\.size\(0\) must equal out_features"),
        (dict(lora_b=rand(6, 3)), r"lora_b\.size\(1\) must equal the rank"),
        (dict(lora_a=rand(0, 8), lora_b=rand(6, 0)), r"rank r = lora_a\.size\(0\) must be at least 1"),
        (dict(bias=rand(5)), r"bias\.size\(0\) must equal out_features"),
        (dict(bias=rand(6, 1)), r"bias must be 1-D"),
        (dict(weight=rand(6, 8, 1)), r"weight must be 2-D"),
        (dict(x=torch.tensor(1.0)), r"x must have at least one dimension"),
        (dict(lora_a=rand(2, 8, dtype=torch.float64)), r"lora_a has dtype Double but x has Float"),
        (dict(x=rand(4, 8, dtype=torch.bfloat16)), r"has dtype Float but x has BFloat16"),
        (dict(x=torch.ones(4, 8, dtype=torch.int32), weight=torch.ones(6, 8, dtype=torch.int32)),
         r"x has unsupported dtype Int"),
    ],
)
def test_bad_input_is_a_clear_runtime_error(over, match):
    with pytest.raises(RuntimeError, match=match):
        call(**over)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_dropout_is_a_value_error(p):
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        call(dropout=p)


@pytest.mark.parametrize("scaling, error, match", [
    (float("nan"), ValueError, r"lora_linear: scaling must be finite, got nan"),
    (float("inf"), ValueError, r"lora_linear: scaling must be finite, got inf"),
    ("2", TypeError, r"lora_linear: scaling must be a number, got '2'"),
])
def test_bad_scaling_is_refused(scaling, error, match):
    """A NaN or inf scaling made every output NaN or inf, and a string was read as its number, where
    bottleneck_adapter and reversible_coupling refused a non-finite scale."""
    a = args()
    with pytest.raises(error, match=match):
        functional.lora_linear(a["x"], a["weight"], a["lora_a"], a["lora_b"], scaling=scaling)
    weight = a["weight"].clone()
    with pytest.raises(error, match=match.replace("lora_linear", "merge_lora_")):  # filled the weight with NaN
        functional.merge_lora_(weight, a["lora_a"], a["lora_b"], scaling)
    assert torch.equal(weight, a["weight"])


def test_a_tensor_that_requires_grad_is_refused_as_a_constant():
    """A scaling, dropout or eps given as a tensor that requires grad was read as its number in silence: no gradient
    reached it (or backward failed with "does not require grad" when it was the only one); a plain tensor is read."""
    a = args()
    s = torch.tensor(2.0, requires_grad=True)
    with pytest.raises(TypeError, match=r"lora_linear: scaling must be a Python number; got a tensor that requires "
                                        r"grad"):
        functional.lora_linear(a["x"], a["weight"], a["lora_a"], a["lora_b"], scaling=s)
    with pytest.raises(TypeError, match="lora_linear: dropout must be a Python number; got a tensor"):
        functional.lora_linear(a["x"], a["weight"], a["lora_a"], a["lora_b"], dropout=s.detach().requires_grad_())
    with pytest.raises(TypeError, match="density_loss: eps must be a Python number; got a tensor"):
        functional.density_loss(a["x"], eps=torch.tensor(0.1, requires_grad=True))
    with pytest.raises(TypeError, match="lora_linear: dropout must be a number, got '0.5'"):
        functional.lora_linear(a["x"], a["weight"], a["lora_a"], a["lora_b"], dropout="0.5")
    torch.testing.assert_close(
        functional.lora_linear(a["x"], a["weight"], a["lora_a"], a["lora_b"], scaling=torch.tensor(2.0)),
        reference.lora_linear(a["x"], a["weight"], a["lora_a"], a["lora_b"], scaling=2.0))
    # where no gradient is asked for (no_grad, merge_lora_), such a tensor is read as its number
    want = reference.lora_linear(a["x"], a["weight"], a["lora_a"], a["lora_b"], scaling=2.0)
    with torch.no_grad():
        got = functional.lora_linear(a["x"], a["weight"], a["lora_a"], a["lora_b"], scaling=s)
    torch.testing.assert_close(got, want)
    weight = a["weight"].clone()
    functional.merge_lora_(weight, a["lora_a"], a["lora_b"], s)
    torch.testing.assert_close(weight, a["weight"] + 2.0 * a["lora_b"] @ a["lora_a"])


def test_a_scale_beyond_float32_is_refused_in_words():
    """1e39 is finite but not a float32: it failed inside an ATen call ("value cannot be converted to type float
    without overflow") naming neither the op nor the argument, and merge_lora_ would have filled the weight with
    inf. A float64 call takes it."""
    a = args()
    with pytest.raises(ValueError, match=r"lora_linear: scaling=1e\+39 is beyond float32's range"):
        functional.lora_linear(a["x"], a["weight"], a["lora_a"], a["lora_b"], scaling=1e39)
    weight = a["weight"].clone()
    with pytest.raises(ValueError, match=r"merge_lora_: scaling=-1e\+39 is beyond float32's range"):
        functional.merge_lora_(weight, a["lora_a"], a["lora_b"], -1e39)
    assert torch.equal(weight, a["weight"])
    x = a["x"]
    with pytest.raises(ValueError, match=r"bottleneck_adapter: scale=1e\+39 is beyond float32's range"):
        functional.bottleneck_adapter(x, torch.randn(2, x.shape[-1]), torch.randn(x.shape[-1], 2), scale=1e39)
    d = {k: v.double() for k, v in a.items() if isinstance(v, torch.Tensor)}
    assert torch.isfinite(functional.lora_linear(d["x"], d["weight"], d["lora_a"], d["lora_b"], scaling=1e39)).all()


@pytest.mark.parametrize("weight_shape, a_shape, b_shape, fan_in_fan_out", [
    ((4, 6), (2, 1), (4, 2), False),  # broadcast: every column got one update
    ((4, 6), (2, 6), (1, 2), False),  # broadcast: every row got one update
    ((4, 6), (2, 6), (4, 3), False),
    ((4, 6), (2, 6), (4, 2), True),  # a (4, 6) weight stored (in, out) is 6 out x 4 in
])
def test_merge_refuses_factors_that_do_not_fit(weight_shape, a_shape, b_shape, fan_in_fan_out):
    weight = torch.randn(weight_shape)
    before = weight.clone()
    with pytest.raises(ValueError, match=r"merge_lora_: lora_a \(r, in_features\) and lora_b \(out_features, r\) "
                                         r"must fit a weight of"):
        functional.merge_lora_(weight, torch.randn(a_shape), torch.randn(b_shape), 1.0, fan_in_fan_out=fan_in_fan_out)
    assert torch.equal(weight, before)


def test_merge_refuses_a_weight_that_is_not_floating_point():
    weight = torch.ones(4, 6, dtype=torch.int8)  # the update was truncated into it
    with pytest.raises(ValueError, match=r"merge_lora_: weight must be a 2-D floating-point tensor, got torch.int8"):
        functional.merge_lora_(weight, torch.randn(2, 6), torch.randn(4, 2), 1.0)


def test_reversible_coupling_refuses_a_string_scale():
    with pytest.raises(TypeError, match=r"reversible_coupling: scale must be a number, got '2'"):
        functional.reversible_coupling(torch.randn(3), torch.randn(3), "2")


def test_op_level_dropout_checks():
    a = args()
    with pytest.raises(RuntimeError, match=r"dropout_p must be in \[0, 1\)"):
        ops.lora_linear_forward(a["x"], a["weight"], a["lora_a"], a["lora_b"], None, 1.0, 1.0, torch.tensor(1))
    with pytest.raises(RuntimeError, match="needs a seed tensor"):
        ops.lora_linear_forward(a["x"], a["weight"], a["lora_a"], a["lora_b"], None, 1.0, 0.5, None)
    with pytest.raises(RuntimeError, match="seed must be an int64 tensor with one element"):
        ops.lora_linear_forward(a["x"], a["weight"], a["lora_a"], a["lora_b"], None, 1.0, 0.5, torch.tensor(1.0))


def test_backward_op_missing_saved_tensors():
    a = args()
    gy = rand(4, 6)
    with pytest.raises(RuntimeError, match="x is needed for the weight or lora_a gradient"):
        torch.ops.pefttorch.lora_linear_backward(gy, None, a["weight"], a["lora_a"], a["lora_b"], None, 1.0, 0.0,
                                                 None, [False, False, True, False, False])
    with pytest.raises(RuntimeError, match="s is needed for the lora_b gradient"):
        torch.ops.pefttorch.lora_linear_backward(gy, None, a["weight"], a["lora_a"], a["lora_b"], None, 1.0, 0.0,
                                                 None, [False, False, False, True, False])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_mixed_devices():
    with pytest.raises(RuntimeError, match=r"weight is on cpu but x is on cuda"):
        call(x=rand(4, 8, device="cuda"))


@pytest.mark.parametrize("sign, scaling, match", [
    (float("nan"), 2.0, r"merge_lora_: sign must be finite, got nan"),
    (1e30, 1e30, r"merge_lora_: sign \* scaling=1\S*e\+60 is beyond float32's range"),
])
def test_merge_refuses_a_sign_that_would_ruin_the_weight(sign, scaling, match):
    """Only scaling was checked: sign=nan filled the weight with NaN for good, sign=1e30 with inf."""
    a = args()
    weight = a["weight"].clone()
    with pytest.raises(ValueError, match=match):
        functional.merge_lora_(weight, a["lora_a"], a["lora_b"], scaling, sign=sign)
    assert torch.equal(weight, a["weight"])


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_call_refuses_a_non_finite_scaling(dynamic):
    """The wrapper checks scaling in eager calls only; a compiled function called with NaN gave NaN everywhere (no
    eager call had checked it first)."""
    torch._dynamo.reset()
    a = args()
    compiled = torch.compile(lambda x, w, la, lb, s: functional.lora_linear(x, w, la, lb, scaling=s),
                             fullgraph=True, dynamic=dynamic, backend="eager")
    torch.testing.assert_close(compiled(a["x"], a["weight"], a["lora_a"], a["lora_b"], 0.5),
                               functional.lora_linear(a["x"], a["weight"], a["lora_a"], a["lora_b"], scaling=0.5))
    with pytest.raises(Exception, match=r"lora_linear_forward: scaling must be finite, got nan"):
        compiled(a["x"], a["weight"], a["lora_a"], a["lora_b"], float("nan"))


@pytest.mark.slow
def test_compiled_density_loss_takes_each_eps():
    """The default threshold's check of eps (math.isfinite) could not be traced: a compiled density_loss failed under
    fullgraph once eps changed between calls (or on the first call with dynamic=True)."""
    torch._dynamo.reset()
    a = torch.randn(3, 8)
    for dynamic in (False, True):
        compiled = torch.compile(lambda a, eps: functional.density_loss(a, eps), fullgraph=True, dynamic=dynamic,
                                 backend="eager")
        for eps in (1e-3, 1e-2):
            for got, want in zip(compiled(a, eps), functional.density_loss(a, eps), strict=True):
                torch.testing.assert_close(got, want)
        with pytest.raises(Exception, match="eps must be positive and finite, got -0.001"):  # not a complex threshold
            compiled(a, -1e-3)
