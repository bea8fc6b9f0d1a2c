"""The reversible coupling ops (MEFT): reversible_coupling and reversible_coupling_backward.

Each result is checked against the pure-PyTorch reference run in float64 on the same (rounded) inputs: its
error must stay within what forming it in float32 (float64 for a float64 stream) and rounding once to the
stream's dtype allows. The reference in the inputs' own dtypes is held to the same bound, so the kernels
and the reference agree to it.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from helpers import DEVICES, HAS_CUDA
from torch._subclasses.fake_tensor import FakeTensorMode

from pefttorch import functional, ops, reference

_ops = torch.ops.pefttorch

f32, f64, bf16, f16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
SHAPES = [(1,), (3, 17), (2, 3, 17)]
LAYOUTS = ["contiguous", "strided", "transposed", "offset"]
CASES = [(s, lay) for s in SHAPES for lay in LAYOUTS if not (lay == "transposed" and len(s) == 1)]
# (stream dtype, f dtype): the stream as float32 (the usual), float64, bfloat16; f in the model's dtype
PAIRS = [*itertools.product([f32, f64, bf16], [f32, bf16, f16]), (f64, f64), (f16, f16)]
# (stream, f, vjp): vjp in f's dtype, and a few where the two differ
TRIPLES = [(t, f, f) for t, f in PAIRS] + [(f32, bf16, f16), (f32, f16, f32), (f64, f32, bf16), (bf16, f32, f64)]
# unit roundoff of each dtype
UNIT = {f64: 2.0**-53, f32: 2.0**-24, bf16: 2.0**-8, f16: 2.0**-11}


def ids(value):
    return str(value).replace("torch.", "")


def tensor(shape, dtype, device, layout="contiguous"):
    """Fresh random normal data (never zeros: zeros hide unwritten outputs) of `shape` in `layout`:
    "contiguous", "strided" (every other element of a wider last dimension), "transposed" (the reversed
    shape permuted into place) or "offset" (contiguous, one element into its storage: not 16-byte aligned)."""
    n = 1
    for s in shape:
        n *= s
    full = {"strided": (*shape[:-1], 2 * shape[-1]), "transposed": tuple(reversed(shape)), "offset": (n + 1,)}
    base = torch.randn(full.get(layout, shape), dtype=f64).to(dtype=dtype, device=device)  # the view on the device
    if layout == "strided":
        t = base[..., ::2]
    elif layout == "transposed":
        t = base.permute(*reversed(range(len(shape))))
    elif layout == "offset":
        t = base[1:].view(shape)
    else:
        t = base
    assert t.shape == shape
    assert layout == "contiguous" or n <= 1 or not t.is_contiguous() or t.storage_offset() == 1
    return t


def other_layout(layout, shape, k=1):
    """The k-th layout after `layout` that fits `shape`: so that the operands of one call differ in layout."""
    fits = [lay for lay in LAYOUTS if not (lay == "transposed" and len(shape) == 1)]
    return fits[(fits.index(layout) + k) % len(fits)]


def random_scale():
    """A coupling factor of random sign and magnitude in [0.25, 2] (not a power of two)."""
    return random.choice([-1.0, 1.0]) * random.uniform(0.25, 2.0)


def unit_acc(stream_dtype):
    return UNIT[f64] if stream_dtype == f64 else UNIT[f32]


def spacing(dtype):
    """The spacing of dtype's subnormals: the rounding error of results near zero."""
    fi = torch.finfo(dtype)
    return fi.smallest_normal * fi.eps


def assert_within(name, out, like, oracle, acc_error):
    """out has like's dtype, shape and device, is contiguous, and is within one rounding to its dtype plus
    `acc_error` (a bound on the error of forming it in opmath precision) of the float64 `oracle`."""
    assert out.dtype == like.dtype and out.shape == like.shape, f"{name}: {out.dtype} {tuple(out.shape)}"
    assert out.device == like.device and out.is_contiguous(), f"{name}: {out.device}, strides {out.stride()}"
    o = oracle.detach().double().cpu()
    bound = 1.01 * UNIT[out.dtype] * o.abs() + 1.01 * acc_error.cpu() + spacing(out.dtype)
    err = (out.detach().double().cpu() - o).abs()
    assert not torch.isnan(out).any(), f"{name}: NaN"
    assert (err <= bound).all(), f"{name} ({out.dtype}): error {err.max().item():.3g}, exceeds its bound by " \
                                 f"{(err - bound).max().item():.3g}"


def forward_bounds(x, f, scale):
    """The float64 oracle of y = scale * x + f, and the error bound of forming it in opmath precision (the
    scale rounded, the product, the sum: one unit each)."""
    x64, f64_ = x.detach().double(), f.detach().double()
    return reference.reversible_coupling(x64, f64_, scale), 3 * unit_acc(x.dtype) * (abs(scale) * x64.abs()
                                                                                       + f64_.abs())


# ==================================================================================================
# reversible_coupling: value and gradients


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, f_dtype", PAIRS, ids=ids)
@pytest.mark.parametrize("shape, layout", CASES, ids=ids)
def test_forward_and_grads_match_reference(shape, layout, dtype, f_dtype, device):
    scale = random_scale()
    x = tensor(shape, dtype, device, layout).requires_grad_()
    f = tensor(shape, f_dtype, device, other_layout(layout, shape)).requires_grad_()
    y = functional.reversible_coupling(x, f, scale)
    oracle, acc_error = forward_bounds(x, f, scale)
    assert_within("y", y, x, oracle, acc_error)
    ref = reference.reversible_coupling(x.detach(), f.detach(), scale).contiguous()
    assert_within("reference y", ref, x, oracle, acc_error)
    assert y.requires_grad

    grad_y = tensor(shape, dtype, device, other_layout(layout, shape, 2))
    grad_x, grad_f = torch.autograd.grad(y, (x, f), grad_y)
    x_ref, f_ref = x.detach().clone().requires_grad_(), f.detach().clone().requires_grad_()
    ref_grads = torch.autograd.grad(reference.reversible_coupling(x_ref, f_ref, scale), (x_ref, f_ref), grad_y)
    g64 = grad_y.double()
    u = unit_acc(dtype)
    # grad_x = scale * grad_y rounded once to x's dtype; grad_f = grad_y rounded to f's dtype (via the
    # opmath type in the reference: one more rounding where f is narrower)
    for name, got in (("grad_x", grad_x), ("reference grad_x", ref_grads[0])):
        assert_within(name, got.contiguous(), x, scale * g64, 2 * u * abs(scale) * g64.abs())
    for name, got in (("grad_f", grad_f), ("reference grad_f", ref_grads[1])):
        assert_within(name, got.contiguous(), f, g64, u * g64.abs())


@pytest.mark.parametrize("device", DEVICES)
def test_forward_grad_of_one_input_only(device):
    """Only the gradient asked for is computed; a frozen f (or x) gets none."""
    x = tensor((3, 17), f32, device).requires_grad_()
    f = tensor((3, 17), bf16, device)
    y = ops.reversible_coupling(x, f, 0.5)
    y.sum().backward()
    assert f.grad is None and torch.equal(x.grad, torch.full_like(x, 0.5))
    x = tensor((3, 17), f32, device)
    f = tensor((3, 17), bf16, device).requires_grad_()
    ops.reversible_coupling(x, f, 0.5).sum().backward()
    assert f.grad.dtype == bf16 and torch.equal(f.grad, torch.ones_like(f))
    with torch.no_grad():
        assert not ops.reversible_coupling(x, f, 0.5).requires_grad


def test_forward_gradcheck():
    x = torch.randn(3, 17, dtype=f64, requires_grad=True)
    f = torch.randn(3, 17, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: functional.reversible_coupling(a, b, -0.37), (x, f))
    assert torch.autograd.gradgradcheck(lambda a, b: functional.reversible_coupling(a, b, 1.7), (x, f))
    x3 = torch.randn(2, 3, 5, dtype=f64).transpose(0, 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: functional.reversible_coupling(a, a * a, 0.8), (x3,))


# ==================================================================================================
# reversible_coupling_backward


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, f_dtype, vjp_dtype", TRIPLES, ids=ids)
@pytest.mark.parametrize("shape, layout", CASES, ids=ids)
def test_backward_matches_reference(shape, layout, dtype, f_dtype, vjp_dtype, device):
    scale = random_scale()
    x = tensor(shape, dtype, device)
    f = tensor(shape, f_dtype, device, other_layout(layout, shape))
    y = ops.reversible_coupling(x, f, scale)
    if layout != "contiguous":  # y in the layout of the case, same values
        y = tensor(shape, dtype, device, layout).copy_(y)
    grad_y = tensor(shape, dtype, device, other_layout(layout, shape, 2))
    grad_other = tensor(shape, dtype, device, layout)
    vjp = tensor(shape, vjp_dtype, device, other_layout(layout, shape, 3))
    inputs = (y, f, grad_y, grad_other, vjp)
    out = ops.reversible_coupling_backward(*inputs, scale)
    assert isinstance(out, tuple) and len(out) == 3
    oracle = reference.reversible_coupling_backward(*(t.double() for t in inputs), scale)
    ref = reference.reversible_coupling_backward(*inputs, scale)
    y64, f64_, go64, v64 = y.double(), f.double(), grad_other.double(), vjp.double()
    u = unit_acc(dtype)
    acc_error = (
        # the scale rounded, the difference, the quotient (and in the CUDA reference, which multiplies by
        # 1 / scale, the reciprocal)
        4 * u * (y64.abs() + f64_.abs()) / abs(scale),
        2 * u * oracle[1].abs(),  # the scale rounded, the product
        2 * u * (go64.abs() + v64.abs()),  # vjp rounded (float64 vjp, narrower stream), the sum
    )
    for name, got, want, err in zip(("x", "grad_x", "grad_other"), out, oracle, acc_error, strict=True):
        assert_within(name, got, y, want, err)
    for name, got, want, err in zip(("x", "grad_x", "grad_other"), ref, oracle, acc_error, strict=True):
        assert_within("reference " + name, got.contiguous(), y, want, err)

    # the round trip: x reconstructed from y to within the roundings of y and of the reconstruction
    x_err = (out[0].double() - x.double()).abs().cpu()
    x_bound = 10 * UNIT[dtype] * (x.double().abs() + f64_.abs() / abs(scale)).cpu() + spacing(dtype)
    assert (x_err <= x_bound).all(), f"reconstructed x: error {x_err.max().item():.3g}"


@pytest.mark.parametrize("device", DEVICES)
def test_backward_inside_a_reversible_block(device):
    """The backward op drives the backward of a two-stream reversible block (y1 = a x1 + F(x2), y2 = b x2 +
    G(y1)) from its outputs alone, and gives autograd's gradients through the forward op."""
    a, b = 0.9, -1.3
    w_f, w_g = (torch.randn(17, 17, dtype=bf16, device=device) / 4 for _ in range(2))

    def F(t):
        return torch.tanh(t.to(bf16) @ w_f)

    def G(t):
        return torch.sin(t.to(bf16) @ w_g)

    # streams on the bfloat16 grid, so that F(x2 reconstructed) == F(x2) (its bf16 input rounds alike) and the
    # gradients can be compared tightly
    x1, x2 = (tensor((3, 17), bf16, device).float().requires_grad_() for _ in range(2))
    y1 = ops.reversible_coupling(x1, F(x2), a)
    y2 = ops.reversible_coupling(x2, G(y1), b)
    g1, g2 = tensor((3, 17), f32, device), tensor((3, 17), f32, device)
    want = torch.autograd.grad((y1, y2), (x1, x2), (g1, g2))

    # reversible backward: from y1, y2 only, recomputing G(y1), then F(x2)
    y1, y2 = y1.detach(), y2.detach()
    y1_ = y1.clone().requires_grad_()
    g_out = G(y1_)
    (vjp_g,) = torch.autograd.grad(g_out, y1_, g2.to(g_out.dtype))
    x2_rec, grad_x2, grad_y1 = ops.reversible_coupling_backward(y2, g_out.detach(), g2, g1, vjp_g, b)
    x2_ = x2_rec.clone().requires_grad_()
    f_out = F(x2_)
    (vjp_f,) = torch.autograd.grad(f_out, x2_, grad_y1.to(f_out.dtype))
    x1_rec, grad_x1, grad_x2 = ops.reversible_coupling_backward(y1, f_out.detach(), grad_y1, grad_x2, vjp_f, a)

    torch.testing.assert_close(x2_rec, x2.detach())
    torch.testing.assert_close(x1_rec, x1.detach())
    assert torch.equal(x2_rec.to(bf16), x2.detach().to(bf16))
    torch.testing.assert_close(grad_x1, want[0])
    torch.testing.assert_close(grad_x2, want[1])


# ==================================================================================================
# empty and large tensors


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0,), (2, 0, 3)], ids=ids)
def test_empty(shape, device):
    x = torch.empty(shape, device=device, requires_grad=True)
    f = torch.empty(shape, dtype=bf16, device=device, requires_grad=True)
    y = functional.reversible_coupling(x, f, 0.5)
    assert y.shape == shape and y.dtype == f32 and y.device == x.device
    grad_x, grad_f = torch.autograd.grad(y, (x, f), torch.empty_like(y))
    assert grad_x.shape == shape and grad_f.shape == shape and grad_f.dtype == bf16
    out = ops.reversible_coupling_backward(y.detach(), f.detach(), torch.empty_like(y), torch.empty_like(y),
                                           torch.empty(shape, dtype=f16, device=device), 0.5)
    for t in out:
        assert t.shape == shape and t.dtype == f32 and t.device == x.device


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "offset"])
def test_large(layout, device):
    """Many parallel chunks (CPU) or a grid-stride loop over more than one grid (CUDA); "offset" tensors are
    not 16-byte aligned, which takes the CUDA kernels' scalar path; an odd size leaves a tail of n % 4."""
    shape = (7, 300_001)
    scale = random_scale()
    x, f = tensor(shape, f32, device, layout), tensor(shape, bf16, device, layout)
    y = ops.reversible_coupling(x, f, scale)
    oracle, acc_error = forward_bounds(x, f, scale)
    assert_within("y", y, x, oracle, acc_error)
    grad_y, grad_other, vjp = tensor(shape, f32, device), tensor(shape, f32, device, layout), tensor(shape, bf16,
                                                                                                     device)
    out = ops.reversible_coupling_backward(y, f, grad_y, grad_other, vjp, scale)
    oracle = reference.reversible_coupling_backward(*(t.double() for t in (y, f, grad_y, grad_other, vjp)), scale)
    for name, got, want in zip(("x", "grad_x", "grad_other"), out, oracle, strict=True):
        # a loose bound here (the element-exact ones are above): every element written, none misplaced
        assert_within(name, got, y, want, 1e-5 * (want.abs() + 1))


# ==================================================================================================
# opcheck, torch.compile


def forward_samples(device):
    for dtype, f_dtype in [(f32, bf16), (f32, f16), (f64, f32), (bf16, f32), (f32, f32)]:
        yield tensor((3, 17), dtype, device).requires_grad_(), tensor((3, 17), f_dtype, device), 0.7
        yield tensor((2, 3, 5), dtype, device, "transposed"), tensor((2, 3, 5), f_dtype, device).requires_grad_(), -2.0
        yield (tensor((1,), dtype, device).requires_grad_(), tensor((1,), f_dtype, device).requires_grad_(), 1.0)
    yield torch.empty(0, 4, device=device, requires_grad=True), torch.empty(0, 4, dtype=bf16, device=device), 0.5


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_reversible_coupling(device):
    for args in forward_samples(device):
        torch.library.opcheck(_ops.reversible_coupling.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_reversible_coupling_backward(device):
    for dtype, f_dtype, vjp_dtype in [(f32, bf16, bf16), (f32, f16, f32), (f64, f64, f32), (bf16, f32, bf16)]:
        for shape, layout in [((3, 17), "contiguous"), ((2, 3, 5), "strided"), ((1,), "offset")]:
            args = (tensor(shape, dtype, device, layout), tensor(shape, f_dtype, device), tensor(shape, dtype, device),
                    tensor(shape, dtype, device, layout), tensor(shape, vjp_dtype, device, layout), -0.6)
            torch.library.opcheck(_ops.reversible_coupling_backward.default, args)
    e = torch.empty(2, 0, device=device)
    torch.library.opcheck(_ops.reversible_coupling_backward.default, (e, e.to(bf16), e, e, e.to(bf16), 0.5))


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    torch._dynamo.reset()

    # h * 2 around the ops, not a transcendental: exact in bf16 both ways (on the H200 a compiled tanh rounded one
    # element one bf16 ulp away from eager's, which says nothing about our ops)
    def f(x, h):
        y = functional.reversible_coupling(x, h * 2, 0.8)
        # the backward op has no autograd: it runs inside a custom backward, on tensors that need no gradient
        yd, xd, hd = y.detach(), x.detach(), h.detach()
        x_rec, grad_x, grad_other = ops.reversible_coupling_backward(yd, hd * 2, yd * 2, xd, hd, 0.8)
        return y, x_rec, grad_x, grad_other

    compiled = torch.compile(f, fullgraph=True)
    x = tensor((3, 17), f32, device).requires_grad_()
    h = tensor((3, 17), bf16, device).requires_grad_()
    got, want = compiled(x, h), f(x, h)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    grads_c = torch.autograd.grad(got[0].sum(), (x, h))
    grads = torch.autograd.grad(want[0].sum(), (x, h))
    for g, w in zip(grads_c, grads, strict=True):
        torch.testing.assert_close(g, w)


# ==================================================================================================
# errors


@pytest.mark.parametrize(
    "x, f, scale, match",
    [
        (torch.randn(3, 17), torch.randn(3, 16), 1.0,
         r"reversible_coupling: f must have the shape of x \[3, 17\], got \[3, 16\]"),
        (torch.randn(3, 17), torch.randn(17), 1.0, r"f must have the shape of x \[3, 17\], got \[17\]"),
        (torch.ones(4, dtype=torch.int32), torch.randn(4), 1.0, r"reversible_coupling: x has unsupported dtype Int"),
        (torch.randn(4), torch.ones(4, dtype=torch.bool), 1.0, r"reversible_coupling: f has unsupported dtype Bool"),
        (torch.randn(4), torch.randn(4), 0.0, r"reversible_coupling: scale must be finite and nonzero.*, got 0"),
        (torch.randn(4), torch.randn(4), -0.0, r"scale must be finite and nonzero.*, got -0"),
        (torch.randn(4), torch.randn(4), float("nan"), r"scale must be finite and nonzero.*, got nan"),
        (torch.randn(4), torch.randn(4), float("inf"), r"scale must be finite and nonzero.*, got inf"),
        (torch.randn(4), torch.randn(4), float("-inf"), r"scale must be finite and nonzero.*, got -inf"),
        # zero, infinite or subnormal in the float32 the kernels compute in: y = f exactly, x reconstructed as NaN
        (torch.randn(4), torch.randn(4), 1e-46,
         r"scale must be finite and nonzero in float32, the kernels' compute dtype \(a normal number\), got 1e-46"),
        (torch.randn(4, dtype=bf16), torch.randn(4), -1e-40, r"nonzero in float32.*got -1e-40"),
        (torch.randn(4), torch.randn(4), 1e39, r"nonzero in float32.*got 1e\+39"),
        (torch.randn(4, dtype=f64), torch.randn(4), 1e-320,
         r"finite and nonzero \(a normal number\), got (1e-320|9\.99989e-321)"),
    ],
)
def test_forward_bad_input(x, f, scale, match):
    with pytest.raises(RuntimeError, match=match):
        ops.reversible_coupling(x, f, scale)
    if "scale" in match:  # the fake kernel checks the scale alike (its dtype messages name dtypes as torch does)
        with FakeTensorMode() as mode, pytest.raises(RuntimeError, match=match):
            ops.reversible_coupling(mode.from_tensor(x), mode.from_tensor(f), scale)


def test_a_float64_stream_takes_a_scale_below_float32s_range():
    x, f = torch.randn(4, dtype=f64), torch.randn(4, dtype=f64)
    torch.testing.assert_close(ops.reversible_coupling(x, f, 1e-300), 1e-300 * x + f)


def backward_args(**over):
    shape = (3, 17)
    args = dict(y=torch.randn(shape), f=torch.randn(shape, dtype=bf16), grad_y=torch.randn(shape),
                grad_other=torch.randn(shape), vjp=torch.randn(shape, dtype=bf16), scale=0.5)
    args.update(over)
    return args.values()


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(f=torch.randn(3, 18)),
         r"reversible_coupling_backward: f must have the shape of y \[3, 17\], got \[3, 18\]"),
        (dict(grad_y=torch.randn(17, 3)), r"grad_y must have the shape of y"),
        (dict(grad_other=torch.randn(1, 3, 17)), r"grad_other must have the shape of y"),
        (dict(vjp=torch.randn(3, 17, 1)), r"vjp must have the shape of y"),
        (dict(grad_y=torch.randn(3, 17, dtype=bf16)), r"grad_y has dtype BFloat16 but y has Float"),
        (dict(grad_other=torch.randn(3, 17, dtype=f64)), r"grad_other has dtype Double but y has Float"),
        (dict(y=torch.ones(3, 17, dtype=torch.int64)), r"reversible_coupling_backward: y has unsupported dtype Long"),
        (dict(vjp=torch.ones(3, 17, dtype=torch.int32)), r"vjp has unsupported dtype Int"),
        (dict(f=torch.ones(3, 17, dtype=torch.uint8)), r"f has unsupported dtype Byte"),
        (dict(scale=0.0), r"reversible_coupling_backward: scale must be finite and nonzero.*, got 0"),
        (dict(scale=float("nan")), r"scale must be finite and nonzero.*, got nan"),
        (dict(scale=float("inf")), r"scale must be finite and nonzero.*, got inf"),
        (dict(scale=1e-46), r"reversible_coupling_backward: scale must be finite and nonzero in float32"),
    ],
    ids=lambda v: ",".join(v) if isinstance(v, dict) else None,
)
def test_backward_bad_input(over, match):
    with pytest.raises(RuntimeError, match=match):
        ops.reversible_coupling_backward(*backward_args(**over))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_device_mismatch():
    x, f = torch.randn(4, device="cuda"), torch.randn(4)
    with pytest.raises(RuntimeError, match=r"reversible_coupling: f is on cpu but x is on cuda:0"):
        ops.reversible_coupling(x, f, 1.0)
    with pytest.raises(RuntimeError, match=r"reversible_coupling: f is on cuda:0 but x is on cpu"):
        ops.reversible_coupling(f, x, 1.0)
    with pytest.raises(RuntimeError, match=r"reversible_coupling_backward: vjp is on cpu but y is on cuda:0"):
        ops.reversible_coupling_backward(*backward_args(y=x, f=x, grad_y=x, grad_other=x, vjp=f))
