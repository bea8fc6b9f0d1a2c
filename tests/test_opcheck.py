"""torch.library.opcheck on every op: schema, fake kernel, autograd registration, AOT dispatch; and the fake kernels'
output shapes, dtypes and strides against the real ones (which opcheck does not compare)."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import DEVICES, rand
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_map_only

import pefttorch  # noqa: F401  (registers the ops)


def transposed(*shape, dtype=torch.float32, device="cpu"):
    """A tensor of `shape` that is dense but not contiguous: the reversed shape, permuted into place. torch.empty_like
    keeps such strides, where the kernels return contiguous tensors."""
    return rand(*reversed(shape), dtype=dtype, device=device).permute(*reversed(range(len(shape))))


def forward_samples(device):
    for dtype in (torch.float32, torch.bfloat16):
        for p, bias, lead in ((0.0, True, (5,)), (0.25, False, (2, 3)), (0.25, True, (0,))):
            yield (
                rand(*lead, 12, dtype=dtype, device=device, requires_grad=True),
                rand(7, 12, dtype=dtype, device=device),
                rand(3, 12, dtype=dtype, device=device, requires_grad=True),
                rand(7, 3, dtype=dtype, device=device, requires_grad=True),
                rand(7, dtype=dtype, device=device) if bias else None,
                0.5,
                p,
                torch.tensor(99) if p > 0 else None,
            )


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_forward(device):
    for args in forward_samples(device):
        torch.library.opcheck(torch.ops.pefttorch.lora_linear_forward.default, args)


def backward_samples(device, mask):
    x, w, a, b = rand(2, 3, 12, device=device), rand(7, 12, device=device), rand(3, 12, device=device), rand(
        7, 3, device=device)
    s = rand(6, 3, device=device)
    gy = rand(2, 3, 7, device=device)
    for p in (0.0, 0.25):
        seed = torch.tensor(3) if p > 0 else None
        yield gy, x, w, a, b, s, 0.5, p, seed, mask
    # every operand transposed (a fan_in_fan_out weight): the gradients still come contiguous
    yield (transposed(2, 3, 7, device=device), transposed(2, 3, 12, device=device), transposed(7, 12, device=device),
           transposed(3, 12, device=device), transposed(7, 3, device=device), transposed(6, 3, device=device), 0.5,
           0.0, None, mask)


BACKWARD_MASKS = [[True] * 5, [True, False, True, True, False], [False, True, False, False, True]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask", BACKWARD_MASKS, ids=str)
def test_opcheck_backward(device, mask):
    for args in backward_samples(device, mask):
        torch.library.opcheck(torch.ops.pefttorch.lora_linear_backward.default, args)


# ---- the fake kernels (pefttorch.ops's register_fake) promise torch.compile each output's shape, dtype and strides;
# Inductor plans the graph around them and asserts them at run time (assert_size_stride), and opcheck does not
# compare strides: a fake that keeps a transposed input's strides (torch.empty_like) where the kernel returns a
# contiguous tensor passes opcheck and fails only under torch.compile

def fake_samples(device):
    """(op name, arguments) for every op, each with non-contiguous (transposed) operands among its samples."""
    bf16, t = torch.bfloat16, functools.partial(transposed, device=device)

    def r(*shape, dtype=torch.float32):
        return rand(*shape, dtype=dtype, device=device)

    for args in forward_samples(device):
        yield "lora_linear_forward", args
    yield "lora_linear_forward", (t(2, 3, 12), t(7, 12), t(3, 12), t(7, 3), r(7), 0.5, 0.0, None)
    for mask in BACKWARD_MASKS:
        for args in backward_samples(device, mask):
            yield "lora_linear_backward", args
    yield "density_loss", (t(2, 3, 5, dtype=bf16), 1e-3, 0.0)  # float32 statistics
    yield "density_loss_backward", (torch.rand((), device=device), t(2, 3, 5), 1e-3)
    yield "sparse_mlp", (t(2, 3, 8), r(10, 8), r(10), None, None, t(10, 5), r(5), "gelu", 0.3)
    yield "sparse_mlp", (t(4, 8), t(10, 8), None, t(10, 8), r(10), r(10, 5), None, "silu", 0.0)
    yield "reversible_coupling", (t(2, 3, 5), r(2, 3, 5, dtype=bf16), 0.7)
    yield "reversible_coupling", (r(3, 5), t(3, 5), -2.0)
    yield "reversible_coupling_backward", (t(2, 3, 5), t(2, 3, 5, dtype=bf16), t(2, 3, 5), r(2, 3, 5), t(2, 3, 5),
                                           -0.6)
    factors = [t(5, 11, dtype=bf16)], [t(9, 5, dtype=bf16)], [r(5, 1, dtype=bf16)]
    yield "rank_importance", (*factors, [t(9, 11)], [0], [1], [0], [1], [3], [1.0])  # a float32 score
    yield "component_adamw_", ([r(4, 3)], [t(4, 3)], [r(4, 3)], [r(4, 3).abs()], [torch.ones(4, device=device)], [2],
                               1e-3, 0.9, 0.999, 1e-8, 0.1, [0.0])
    for n in (3, 0):
        yield "ranked_lora_factors", (r(5, 7), r(5, 1), r(5, 4), n, bf16)
        yield "ranked_lora_factors", (t(5, 7), t(5, 1), t(5, 4), n, bf16)
    for mask in ([True, True, True], [False, True, False], [False, False, True]):
        yield "ranked_lora_factors_backward", (t(3, 7, dtype=bf16), t(4, 3, dtype=bf16), t(5, 7), t(5, 1), t(5, 4),
                                               2, mask)
    yield "bottleneck_adapter_forward", (t(2, 3, 12), r(4, 12), r(4), r(12, 4), r(12), None, True, "gelu", 0.5)
    yield "bottleneck_adapter_forward", (t(2, 3, 12), t(4, 12), None, t(12, 4), None, t(2, 3, 12), False, "relu", 1.5)
    yield "bottleneck_adapter_backward", (t(2, 3, 12), t(2, 3, 12), t(4, 12), r(4), t(12, 4), t(6, 4), True, "gelu",
                                          0.5, [True] * 6)
    yield "bottleneck_adapter_backward", (t(2, 3, 12), None, r(4, 12), None, r(12, 4), r(6, 4), False, "silu", -1.0,
                                          [True, False, True, True, True, True])  # no b_down: no gradient
    for transpose in (False, True):
        yield "rotary_embedding", (t(2, 3, 5, 8), r(2, 1, 5, 8), r(2, 1, 5, 8), transpose)
        yield "rotary_embedding", (r(2, 5, 3, 8).transpose(1, 2), t(5, 8), t(5, 8), transpose)  # transformers' q


def layouts(outputs):
    """Each output's shape, dtype, device and strides (None for an absent output): what Inductor asserts. The stride of
    a dimension of size 0 or 1 is never used, and assert_size_stride ignores it as well."""
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    return [None if o is None else (tuple(o.shape), o.dtype, o.device,
                                    tuple(st if n > 1 else None for st, n in zip(o.stride(), o.shape, strict=True)))
            for o in outputs]


@pytest.mark.parametrize("device", DEVICES)
def test_fake_kernels_promise_the_real_shapes_dtypes_and_strides(device):
    """Every op on every sample, real and under FakeTensorMode (the fake kernel, as torch.compile traces it): the
    outputs agree in shape, dtype, device and strides, and in which of them are None."""
    for name, args in fake_samples(device):
        op = getattr(torch.ops.pefttorch, name).default
        with torch.no_grad():
            real = layouts(op(*args))
            mode = FakeTensorMode()
            fake_args = tree_map_only(torch.Tensor, mode.from_tensor, args)
            with mode:
                fake = layouts(op(*fake_args))
        assert fake == real, f"{name}: the fake kernel promises {fake}, the kernel returns {real}"


# ---- eager calls run the registered autograd formula through their own autograd.Function (pefttorch.ops's
# _register_autograd): its values and gradients must be those of the op called through torch.ops, bit for bit

def _eager_cases(device):
    from pefttorch import ops

    x, a = rand(2, 3, 12, device=device, requires_grad=True), rand(4, 12, device=device, requires_grad=True)
    w, b = rand(7, 12, device=device, requires_grad=True), rand(7, 4, device=device, requires_grad=True)
    bias, seed = rand(7, device=device, requires_grad=True), torch.tensor(5)
    yield "lora_linear_forward", ops.lora_linear_forward, (x, w, a, b, bias, 0.5, 0.25, seed)
    act = rand(5, 6, device=device, requires_grad=True)
    yield "density_loss", ops.density_loss, (act, 1e-3, 0.1)
    s, f = rand(3, 8, dtype=torch.float64, device=device, requires_grad=True), rand(3, 8, device=device,
                                                                                   requires_grad=True)
    yield "reversible_coupling", ops.reversible_coupling, (s, f, 0.3)
    wd, bd, wu, bu = (rand(4, 12, device=device, requires_grad=True), rand(4, device=device, requires_grad=True),
                      rand(12, 4, device=device, requires_grad=True), rand(12, device=device, requires_grad=True))
    yield "bottleneck_adapter_forward", ops.bottleneck_adapter_forward, (x, wd, bd, wu, bu, None, True, "gelu", 1.5)


@pytest.mark.parametrize("device", DEVICES)
def test_eager_autograd_equals_the_registered_formula(device):
    for name, eager, args in _eager_cases(device):
        registered = getattr(torch.ops.pefttorch, name).default
        tensors = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        results = []
        for fn in (eager, registered):
            out = fn(*args)
            out = out if isinstance(out, tuple) else (out,)
            first = out[0]
            grads = torch.autograd.grad((first.float() * torch.linspace(-1, 2, first.numel(), device=device)
                                         .view(first.shape)).sum(), tensors)
            results.append((out, grads))
        (out_e, grads_e), (out_r, grads_r) = results
        for e, r in zip(out_e, out_r, strict=True):
            torch.testing.assert_close(e, r, rtol=0, atol=0, msg=name)
        for e, r in zip(grads_e, grads_r, strict=True):
            torch.testing.assert_close(e, r, rtol=0, atol=0, msg=name)
        assert type(out_e[0].grad_fn).__name__.startswith(name)  # the eager path really is the eager Function


@pytest.mark.parametrize("device", DEVICES)
def test_backward_ops_are_registered_as_non_differentiable(device):
    """The backward ops had no Autograd kernel: called on tensors that require grad they gave outputs that required
    grad too (recording their kernels' inner GEMMs), and a backward through them left .grad None, with only a
    deprecation warning. Now they run below autograd: no output requires grad, nothing warns, and opcheck's
    autograd-registration test passes with inputs that require grad."""
    import warnings

    for name, args in fake_samples(device):
        if not name.endswith("_backward"):
            continue
        args = tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                     for a in args)
        op = getattr(torch.ops.pefttorch, name).default
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            outputs = op(*args)
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        assert not any(o is not None and o.requires_grad for o in outputs), name
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration"))


def _bad_calls():
    """(what, call on a device) for arguments every kernel refuses."""
    from pefttorch import functional

    def z(device, *shape, dtype=torch.float32):
        return torch.zeros(*shape, dtype=dtype, device=device)

    ops = torch.ops.pefttorch
    return [
        ("lora_a of other in_features", lambda d: functional.lora_linear(z(d, 2, 8), z(d, 6, 8), z(d, 4, 7),
                                                                         z(d, 6, 4))),
        ("lora_b of other out_features", lambda d: functional.lora_linear(z(d, 2, 8), z(d, 6, 8), z(d, 4, 8),
                                                                          z(d, 5, 4))),
        ("int64 lora_linear", lambda d: ops.lora_linear_forward(
            *(z(d, *s, dtype=torch.int64) for s in [(2, 8), (6, 8), (4, 8), (6, 4)]), None, 1.0, 0.0, None)),
        ("half weight, float x", lambda d: functional.lora_linear(z(d, 2, 8), z(d, 6, 8, dtype=torch.half),
                                                                  z(d, 4, 8), z(d, 6, 4))),
        ("bias of other size", lambda d: functional.lora_linear(z(d, 2, 8), z(d, 6, 8), z(d, 4, 8), z(d, 6, 4),
                                                                z(d, 5))),
        ("coupling scale 0", lambda d: ops.reversible_coupling(z(d, 2, 8), z(d, 2, 8), 0.0)),
        ("coupling f of other shape", lambda d: ops.reversible_coupling(z(d, 2, 8), z(d, 8), 1.0)),
        ("rotary odd head size", lambda d: ops.rotary_embedding(z(d, 2, 7), z(d, 7), z(d, 7))),
        ("rotary cos of other width", lambda d: ops.rotary_embedding(z(d, 2, 8), z(d, 6), z(d, 6))),
        ("sparse_mlp down projection not transposed", lambda d: ops.sparse_mlp(
            z(d, 2, 8), z(d, 5, 8), None, None, None, z(d, 6, 5), None, "relu", 0.0)),
        ("adapter residual of other shape", lambda d: functional.bottleneck_adapter(
            z(d, 2, 8), z(d, 3, 8), z(d, 8, 3), residual=z(d, 3, 8))),
        ("adapter w_up of other width", lambda d: functional.bottleneck_adapter(z(d, 2, 8), z(d, 3, 8), z(d, 8, 4))),
        ("ranked n > capacity", lambda d: ops.ranked_lora_factors(z(d, 4, 8), z(d, 4, 1), z(d, 4, 6), 5,
                                                                   torch.float32)),
        ("ranked n < 0", lambda d: ops.ranked_lora_factors(z(d, 4, 8), z(d, 4, 1), z(d, 4, 6), -1, torch.float32)),
        ("density_loss of int32", lambda d: ops.density_loss(z(d, 3, dtype=torch.int32), 1e-3, 0.0)),
        ("density_loss of nothing", lambda d: ops.density_loss(z(d, 0), 1e-3, 0.0)),
        ("density_loss eps inf", lambda d: ops.density_loss(z(d, 3), float("inf"), 0.0)),
        ("density_loss threshold < 0", lambda d: ops.density_loss(z(d, 3), 1e-3, -1.0)),
        ("lora dropout without a seed", lambda d: ops.lora_linear_forward(z(d, 2, 8), z(d, 6, 8), z(d, 4, 8),
                                                                          z(d, 6, 4), None, 1.0, 0.5, None)),
        ("lora dropout 1", lambda d: ops.lora_linear_forward(z(d, 2, 8), z(d, 6, 8), z(d, 4, 8), z(d, 6, 4), None,
                                                             1.0, 1.0, torch.tensor(1))),
        ("sparse_mlp unknown activation", lambda d: ops.sparse_mlp(
            z(d, 2, 8), z(d, 5, 8), None, None, None, z(d, 5, 6), None, "tanh", 0.0)),
        ("sparse_mlp no neurons", lambda d: ops.sparse_mlp(
            z(d, 2, 8), z(d, 0, 8), None, None, None, z(d, 0, 6), None, "relu", 0.0)),
        ("adapter unknown activation", lambda d: ops.bottleneck_adapter_forward(
            z(d, 2, 8), z(d, 3, 8), None, z(d, 8, 3), None, None, False, "tanh", 1.0)),
        ("importance rank > capacity", lambda d: ops.rank_importance(
            [z(d, 4, 8)], [z(d, 6, 4)], [z(d, 4, 1)], [z(d, 6, 8)], [0], [1], [0], [1], [9], [1.0])),
        ("importance tile of other shape", lambda d: ops.rank_importance(
            [z(d, 4, 8)], [z(d, 6, 4)], [z(d, 4, 1)], [z(d, 5, 8)], [0], [1], [0], [1], [2], [1.0])),
        ("importance stride 0", lambda d: ops.rank_importance(
            [z(d, 4, 8)], [z(d, 6, 4)], [z(d, 4, 1)], [z(d, 6, 8)], [0], [0], [0], [1], [2], [1.0])),
        ("importance offset past the stride", lambda d: ops.rank_importance(
            [z(d, 4, 8)], [z(d, 6, 4)], [z(d, 4, 1)], [z(d, 2, 8)], [3], [2], [0], [1], [2], [1.0])),
        ("importance lora_e of other rows", lambda d: ops.rank_importance(
            [z(d, 4, 8)], [z(d, 6, 4)], [z(d, 3, 1)], [z(d, 6, 8)], [0], [1], [0], [1], [2], [1.0])),
        ("importance weight nan", lambda d: ops.rank_importance(
            [z(d, 4, 8)], [z(d, 6, 4)], [z(d, 4, 1)], [z(d, 6, 8)], [0], [1], [0], [1], [2], [float("nan")])),
    ]


@pytest.mark.parametrize("what, call", _bad_calls(), ids=[w for w, _ in _bad_calls()])
def test_fake_kernels_refuse_what_the_kernels_refuse(what, call):
    """The fake kernels (the meta device, torch.compile's tracing) gave outputs, some of the wrong shape, for
    arguments every kernel refuses. Now the meta device refuses them as the CPU kernel does, naming the same op and
    argument."""
    with pytest.raises(RuntimeError) as on_cpu:
        call("cpu")
    with pytest.raises(RuntimeError) as on_meta:
        call("meta")
    cpu_words, meta_words = (str(e.value).split(":")[0:2] for e in (on_cpu, on_meta))
    assert meta_words[0] == cpu_words[0] and meta_words[1].split()[0] == cpu_words[1].split()[0], \
        (str(on_cpu.value), str(on_meta.value))
