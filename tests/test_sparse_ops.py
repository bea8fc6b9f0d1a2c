"""The DEFT ops (density_loss, density_loss_backward, sparse_mlp) against the pure-PyTorch reference.

Every comparison is with a float64 oracle computed from the same (rounded) inputs. For sparse_mlp at a
threshold > 0 the threshold is put in a gap of the float64 |activation| values that is wide relative to
how far a kernel computing in the input's dtype can be off, so the mask cannot depend on rounding.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICES, DTYPES, assert_close_to_oracle, rand

from pefttorch import functional, ops, reference

_ops = torch.ops.pefttorch

# ==================================================================================================
# density_loss

SHAPES = [(1,), (3, 17), (2, 3, 17), (5, 1, 33)]
LAYOUTS = ["contiguous", "strided", "transposed"]
CASES = [(s, lay) for s in SHAPES for lay in LAYOUTS if not (lay == "transposed" and len(s) == 1)]

# elementwise tolerance of a gradient rounded once into its dtype: (rtol, atol); atol covers float16 subnormals.
# float64: the autograd oracle itself loses ~a^2/eps ulps to cancellation (the kernel uses the closed form).
GRAD_TOL = {torch.float64: (1e-10, 0.0), torch.float32: (1e-5, 0.0), torch.bfloat16: (8e-3, 0.0),
            torch.float16: (2e-3, 1.2e-7)}
# relative tolerance of the loss (a mean of <= 200 terms, accumulated in float32 / float64)
LOSS_RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}


def activations(shape, dtype, device, layout="contiguous", eps=1e-7, threshold=None):
    """Random activations with magnitudes spread over sqrt(eps) * 10^(-1.5 .. 1.5) (1e-5 .. 1e-2 for
    eps = 1e-7): the loss is neither saturated at 1 nor near 0. None lies within 5 % of `threshold` (after
    rounding to dtype). `layout`: "contiguous", "strided" (every other element of a wider last dimension)
    or "transposed" (the reversed shape permuted into place)."""
    if layout == "strided":
        full = (*shape[:-1], 2 * shape[-1])
    elif layout == "transposed":
        full = tuple(reversed(shape))
    else:
        full = shape
    mag = eps**0.5 * 10.0 ** torch.empty(full, dtype=torch.float64).uniform_(-1.5, 1.5)
    a = (torch.randn(full, dtype=torch.float64) * mag).to(dtype)
    if threshold is not None:
        near = (a.double().abs() - threshold).abs() < 0.05 * threshold
        a = torch.where(near, 1.5 * a, a)
    a = a.to(device)
    if layout == "strided":
        a = a[..., ::2]
    elif layout == "transposed":
        a = a.permute(*reversed(range(len(shape))))
        assert not a.is_contiguous()
    assert a.shape == shape
    return a


def _grad_oracle(a, eps, upstream=1.0):
    a64 = a.detach().double().requires_grad_()
    (reference.density_loss(a64, eps) * upstream).backward()
    return a64.grad


def _assert_grad_close(name, grad, oracle, dtype):
    assert grad.dtype == dtype and grad.shape == oracle.shape, f"{name}: {grad.dtype} {tuple(grad.shape)}"
    rtol, atol = GRAD_TOL[dtype]
    torch.testing.assert_close(grad.detach().double().cpu(), oracle.cpu(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, layout", CASES, ids=str)
@pytest.mark.parametrize("eps", [1e-7, 1e-3])
def test_density_loss_matches_reference(shape, layout, dtype, device, eps):
    threshold = functional.default_density_threshold(eps)
    a = activations(shape, dtype, device, layout, eps=eps, threshold=threshold).requires_grad_()
    loss, density = functional.density_loss(a, eps)
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.shape == () and density.shape == () and loss.dtype == stat and density.dtype == stat
    assert loss.device.type == device and density.device.type == device
    assert not density.requires_grad

    oracle = reference.density_loss(a.detach().double(), eps)
    if a.numel() > 10:
        assert 0.05 < oracle.item() < 0.95, f"loss {oracle.item()} saturated: the data does not test much"
    assert_close_to_oracle("loss", loss, reference.density_loss(a.detach(), eps), oracle)
    torch.testing.assert_close(loss.double(), oracle, rtol=LOSS_RTOL[dtype], atol=0.0)
    want = reference.activation_density(a.detach(), threshold)
    assert a.numel() < 10 or 0 < want.item() < 1
    assert torch.equal(density, want), f"density {density.item()} != {want.item()}"

    loss.backward()
    _assert_grad_close("grad", a.grad, _grad_oracle(a, eps), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype",
    [torch.float64, torch.float32, torch.bfloat16, torch.float16],
    ids=str,
)
def test_density_loss_backward_scales_by_upstream_grad(dtype, device):
    """A non-unit upstream gradient (the loss weighted in a sum of losses) reaches the gradient unrounded."""
    eps = 1e-7
    a = activations((4, 33), dtype, device).requires_grad_()
    weight = 0.1 + torch.rand(()).item()  # not a power of two, not a float32 number
    loss, _ = functional.density_loss(a, eps)
    (weight * loss).backward()
    _assert_grad_close("grad", a.grad, _grad_oracle(a, eps, weight), dtype)

    # the backward op directly, with the gradient in the loss's dtype
    grad = torch.tensor(weight, dtype=loss.dtype, device=device)
    ga = _ops.density_loss_backward(grad, a.detach(), eps)
    _assert_grad_close("density_loss_backward", ga, _grad_oracle(a, eps, weight), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("threshold", [0.0, 1e-4, 3e-3])
def test_density_explicit_threshold(device, threshold):
    """The density at a given threshold (0: the share of non-zero activations), as the reference counts it."""
    a = activations((7, 45), torch.float32, device, threshold=threshold or None)
    if threshold == 0.0:
        a = torch.where(torch.rand(a.shape, device=device) < 0.3, torch.zeros((), device=device), a)
    loss, density = ops.density_loss(a, 1e-7, threshold)
    want = reference.activation_density(a, threshold)
    assert 0 < want.item() < 1
    assert torch.equal(density, want)
    torch.testing.assert_close(loss.double(), reference.density_loss(a.double(), 1e-7), rtol=2e-6, atol=0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_density_loss_large_input_is_accurate(device):
    """Over a million elements: the chunked CPU reduction / the multi-block CUDA reduction."""
    eps = 1e-7
    a = activations((3, 400_000), torch.float32, device)
    loss, density = ops.density_loss(a, eps, eps**0.5)
    oracle = reference.density_loss(a.double(), eps)
    count = (a.double().abs() > eps**0.5).sum().item()
    assert density.item() == pytest.approx(count / a.numel(), rel=1e-7)
    rel = abs(loss.item() - oracle.item()) / oracle.item()
    assert rel <= 1e-6, f"relative error of the loss {rel:.3g} > 1e-6"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_density_loss_large_input_value_and_grad(device, dtype):
    """The large input's density and gradient (parallel, multi-block), and the loss to plain float32 sums."""
    eps = 1e-7
    a = activations((400_000, 3), dtype, device, layout="transposed", threshold=eps**0.5).requires_grad_()
    loss, density = functional.density_loss(a, eps)
    oracle = reference.density_loss(a.detach().double(), eps)
    # what the float32 sums of the CPU kernel reach at this size; float64 input: float64 accuracy
    torch.testing.assert_close(loss.double(), oracle, rtol=1e-12 if dtype == torch.float64 else 5e-5, atol=0.0)
    count = (a.detach().double().abs() > eps**0.5).sum().item()
    assert density.item() == pytest.approx(count / a.numel(), rel=1e-7)
    loss.backward()
    _assert_grad_close("grad", a.grad, _grad_oracle(a, eps), dtype)


@pytest.mark.parametrize("eps, scale, fd_eps", [(1e-3, 0.05, 1e-6), (1e-7, 1e-3, 1e-9)])
def test_density_loss_gradcheck(eps, scale, fd_eps):
    a = (torch.randn(3, 7, dtype=torch.float64) * scale).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: functional.density_loss(t, eps)[0], (a,), eps=fd_eps)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_density_loss_nan_propagates(device, dtype):
    a = activations((4, 9), dtype, device, threshold=1e-7**0.5)
    a.view(-1)[torch.randint(0, a.numel(), ()).item()] = float("nan")
    loss, density = ops.density_loss(a, 1e-7, 1e-7**0.5)
    assert torch.isnan(loss).item()
    assert torch.equal(density, reference.activation_density(a, 1e-7**0.5))  # NaN is not counted as active


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_density_loss_of_huge_finite_activations_is_their_limit(device, dtype):
    """|a| above sqrt of the compute dtype's max: a^2 overflowed to inf, and inf / inf made the loss NaN (the gradient,
    0 there, was right) from finite activations; each such term is its limit, 1."""
    big = 1e200 if dtype == torch.float64 else 2e19
    a = torch.tensor([big, -big, 1.0, 0.0], dtype=dtype, device=device).requires_grad_()
    loss, _ = functional.density_loss(a, 1e-7)
    want = (2 + 1 / (1 + 1e-7)) / 4
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert reference.density_loss(a.detach(), 1e-7).item() == pytest.approx(want, rel=1e-6)
    loss.backward()
    assert torch.isfinite(a.grad).all() and a.grad[0] == 0 and a.grad[3] == 0
    # an inf activation (an overflow) stays NaN in the loss, as in its gradient: not a plausible value
    inf = torch.tensor([float("inf"), 1.0], dtype=dtype, device=device)
    assert functional.density_loss(inf, 1e-7)[0].isnan() and reference.density_loss(inf, 1e-7).isnan()


# ==================================================================================================
# sparse_mlp

HIDDEN, INTER, OUT = 33, 70, 19
MLPS = {  # name: (activation, gated)
    "relu": ("relu", False),
    "gelu": ("gelu", False),
    "gelu_tanh_gated": ("gelu_tanh", True),
    "silu_gated": ("silu", True),
}
TOKENS = [1, 3, 16, 17]  # up to 16: the CPU sparse path; 17: the dense path
LEAD_3D = {1: (1, 1), 3: (1, 3), 16: (4, 4), 17: (17, 1)}
# unit roundoff of each dtype
UNIT = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-9, torch.float16: 2.0**-11}
# pre-activation levels of the designed MLPs, a factor 2 apart (also after every activation), and the
# pre-activation of an inactive neuron (|act| <= 3e-3 for every activation)
LEVELS = torch.tensor([0.3, 0.6, 1.2, 2.4, 4.0], dtype=torch.float64)
DEAD = -9.0


def x_view(lead, dtype, device, layout, values=None):
    """x of shape (*lead, HIDDEN) in the memory layout `layout`, filled with `values` (float64) or random."""
    v = torch.randn(*lead, HIDDEN, dtype=torch.float64) if values is None else values.reshape(*lead, HIDDEN)
    if layout == "contiguous":
        x = v.to(dtype)
    elif layout == "padded":  # unit inner stride, row stride > hidden: the kernel reads rows in place
        x = torch.cat([v, torch.randn(*lead, 5, dtype=torch.float64)], -1).to(dtype)[..., :HIDDEN]
    elif layout == "strided":  # every other column of a wider tensor
        x = torch.stack([v, torch.randn_like(v)], -1).flatten(-2).to(dtype)[..., ::2]
    elif layout == "transposed":  # (hidden, *reversed(lead)) permuted into place
        x = v.permute(*reversed(range(v.dim()))).contiguous().to(dtype).permute(*reversed(range(v.dim())))
    else:
        raise ValueError(layout)
    assert x.shape == (*lead, HIDDEN)
    assert torch.equal(x.double(), v.to(dtype).double())
    return x.to(device)


def mlp_weights(kind, dtype, device, *, biases=True, x=None, pre=None):
    """(w_in, b_in, w_up, b_up, w_down_t, b_down) for the MLP `kind`, random; or, given tokens `x`
    (tokens, HIDDEN) and a designed float64 pre-activation `pre` (tokens, INTER), with w_in solved so
    that x W_in^T + b_in = pre (exactly in float64 before w_in is rounded to dtype)."""
    _, gated = MLPS[kind]
    f64 = dict(dtype=torch.float64)
    b_in = 0.5 * torch.randn(INTER, **f64) + (0.0 if pre is not None else 1.0)
    if pre is None:
        w_in = torch.randn(INTER, HIDDEN, **f64) / HIDDEN**0.5
    else:  # min-norm solution of x W^T = pre - b_in: tokens <= HIDDEN, so it is exact
        w_in = (torch.linalg.pinv(x.double().reshape(-1, HIDDEN).cpu()) @ (pre - b_in)).t()
    w_up = torch.randn(INTER, HIDDEN, **f64) / HIDDEN**0.5 if gated else None
    b_up = torch.randn(INTER, **f64) if gated else None
    w_down_t = torch.randn(INTER, OUT, **f64) / INTER**0.5
    b_down = torch.randn(OUT, **f64)
    if not biases:
        b_in = b_up = b_down = None
    return tuple(t.to(dtype=dtype, device=device) if t is not None else None
                 for t in (w_in, b_in, w_up, b_up, w_down_t, b_down))


def gate_abs_and_error(x, w_in, b_in, activation):
    """|g| = |act(x W_in^T + b_in)| in float64 from the rounded inputs, (tokens, INTER), and a bound on how
    far a kernel computing in x's dtype (float32 accumulation; float64 for float64) may be from it."""
    x64, w64 = x.double().reshape(-1, HIDDEN).cpu(), w_in.double().cpu()
    b64 = b_in.double().cpu() if b_in is not None else None
    pre = F.linear(x64, w64, b64)
    g = reference.ACTIVATIONS[activation](pre)
    u = UNIT[x.dtype]
    u_acc = UNIT[torch.float64] if x.dtype == torch.float64 else UNIT[torch.float32]
    mag = F.linear(x64.abs(), w64.abs(), b64.abs() if b64 is not None else None)
    err_pre = u * pre.abs() + (HIDDEN + 2) * u_acc * mag  # rounding of the product, accumulation error
    # |act'| <= 1.13 for every activation here; the activation's own rounding; a 2x margin on top
    err = 2 * (1.2 * err_pre + u * g.abs() + 8 * u_acc * g.abs())
    return g.abs(), err


def robust_threshold(gabs, err, target, dtype, pool):
    """A threshold at about the `target` quantile of |g| over the tokens `pool` that no |g| can cross
    by rounding: outside every [(|g| - err) / (1 + 2u), (|g| + err) / (1 - 2u)] (2u: the threshold's own
    rounding to the dtype). None if there is no such gap near the target."""
    u = UNIT[dtype]
    lo = ((gabs - err) / (1 + 2 * u)).flatten()
    hi = ((gabs + err) / (1 - 2 * u)).flatten()
    order = torch.argsort(lo)
    lo, hi = lo[order], hi[order]
    reach = torch.cummax(hi, 0).values  # the highest end of the intervals starting at or before each one
    gaps = torch.nonzero(reach[:-1] < lo[1:]).flatten()
    cands = (reach[gaps] + lo[gaps + 1]) / 2
    cands = cands[cands > 0]
    if cands.numel() == 0:
        return None
    values = gabs[pool].flatten()
    quantiles = (values[None, :] < cands[:, None]).double().mean(1)
    best = torch.argmin((quantiles - target).abs())
    return cands[best].item() if abs(quantiles[best].item() - target) <= 0.15 else None


def oracle_and_baseline(x, w, activation, threshold):
    def ref(cast):
        c = [t.to(cast) if t is not None else None for t in (x, *w)]
        return reference.sparse_mlp(*c, activation, threshold)

    return ref(torch.float64), ref(x.dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", list(MLPS))
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("layout", ["contiguous", "3d", "strided", "transposed"])
def test_sparse_mlp_threshold_zero_is_the_dense_mlp(layout, tokens, kind, dtype, device):
    activation, _ = MLPS[kind]
    biases = tokens != 3  # both with and without the optional biases
    w = mlp_weights(kind, dtype, device, biases=biases)
    if layout == "3d":
        x = x_view(LEAD_3D[tokens], dtype, device, "contiguous")
    elif layout == "transposed":
        x = x_view(LEAD_3D[tokens], dtype, device, "transposed")
    else:
        x = x_view((tokens,), dtype, device, layout)
    y = ops.sparse_mlp(x, *w, activation, 0.0)
    oracle, baseline = oracle_and_baseline(x, w, activation, 0.0)
    assert y.shape == (*x.shape[:-1], OUT) and y.device.type == device
    assert_close_to_oracle("y", y, baseline, oracle)
    # and the functional wrapper, with keyword arguments, gives the same
    w_in, b_in, w_up, b_up, w_down_t, b_down = w
    y2 = functional.sparse_mlp(x, w_in, w_down_t, b_in=b_in, w_up=w_up, b_up=b_up, b_down=b_down,
                               activation=activation)
    assert torch.equal(y2, y)


def designed_pre(case, tokens, on, off):
    """The gate's pre-activations (tokens, INTER), at LEVELS (each jittered by ~2 %) or DEAD.

    sparse: 75 % of the neurons dead for every token, 12 % active for every token, 13 % whose level
    (dead or not) is drawn per token. dense: every (token, neuron) drawn from LEVELS, 10 % dead.
    Token `on` has every neuron at the top level, token `off` every neuron dead."""
    f64 = dict(dtype=torch.float64)
    if case == "sparse":
        pre = torch.full((tokens, INTER), DEAD, **f64)
        perm = torch.randperm(INTER)
        n_live, n_mixed = round(0.12 * INTER), round(0.13 * INTER)
        live, mixed = perm[:n_live], perm[n_live:n_live + n_mixed]
        pre[:, live] = LEVELS[torch.randint(1, len(LEVELS), (tokens, n_live))]
        pre[:, mixed] = torch.cat([torch.tensor([DEAD]), LEVELS])[torch.randint(0, len(LEVELS) + 1, (tokens, n_mixed))]
    else:
        pre = LEVELS[torch.randint(0, len(LEVELS), (tokens, INTER))]
        pre[torch.rand(tokens, INTER) < 0.1] = DEAD
    if on is not None:
        pre[on] = LEVELS[-1]
    if off is not None:
        pre[off] = DEAD
    return pre * (1 + 0.02 * torch.randn(tokens, INTER, **f64))


def _build_case(case, tokens, kind, dtype, device, layout):
    """x, weights and a rounding-robust threshold for `case`, drawn until the float64 reference confirms
    the regime meant; also the token made all-active (`on`), all-inactive (`off`) and the others."""
    activation, _ = MLPS[kind]
    off = on = None
    if case == "sparse":  # few neurons active for any token: the CPU sparse path (up to 16 tokens)
        target = 0.87
        off = 1 if tokens >= 3 else None
    else:  # most neurons active (the dense fallback); a token that activates every neuron, one none
        target = 0.25
        if tokens >= 3:
            on, off = 0, 1
    ordinary = [t for t in range(tokens) if t not in (on, off)]
    for _ in range(10):
        x = x_view((tokens,), dtype, device, layout)
        w = mlp_weights(kind, dtype, device, x=x, pre=designed_pre(case, tokens, on, off))
        gabs, err = gate_abs_and_error(x, w[0], w[1], activation)
        threshold = robust_threshold(gabs, err, target, dtype, ordinary)
        if threshold is None:
            continue
        mask = gabs > threshold
        share = mask.any(0).double().mean().item()
        masks_something = ((gabs > 1e-2) & ~mask).any()  # the threshold zeroes activations that are not ~0
        rows_ok = (on is None or mask[on].all()) and (off is None or not mask[off].any())
        differ = len(ordinary) < 2 or not torch.equal(mask[ordinary].any(0), mask[ordinary].all(0))
        if (0.04 <= share <= 0.35 if case == "sparse" else share > 0.6) and masks_something and rows_ok and differ:
            return x, w, threshold, on, off, ordinary
    raise AssertionError(f"no draw in 10 gave the {case} regime with a rounding-robust threshold")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", list(MLPS))
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("case, layout", [("sparse", "contiguous"), ("sparse", "padded"), ("dense", "contiguous"),
                                          ("dense", "transposed")])
def test_sparse_mlp_threshold_matches_reference(case, layout, tokens, kind, dtype, device):
    """sparse: ~5-30 % of the neurons active for any token (the CPU sparse path up to 16 tokens), the
    active set differing per token, one token with none active; dense: most active (the dense fallback),
    one token with all active and one with none. The threshold sits in a wide gap of the |activations|."""
    activation, _ = MLPS[kind]
    x, w, threshold, on, off, ordinary = _build_case(case, tokens, kind, dtype, device, layout)
    gabs, _ = gate_abs_and_error(x, w[0], w[1], activation)
    mask = gabs > threshold  # which neurons each token activates, per the float64 reference
    share = mask.any(0).double().mean().item()  # the share of neurons some token activates
    if case == "sparse":
        assert 0.04 <= share <= 0.35, f"active share {share:.2f}: not the sparse regime meant"
    else:
        assert share > 0.6, f"active share {share:.2f}: not the dense regime meant"
    if len(ordinary) >= 2:  # the active set differs from token to token
        assert not torch.equal(mask[ordinary].any(0), mask[ordinary].all(0))
    if on is not None:
        assert mask[on].all()
    if off is not None:
        assert not mask[off].any()

    y = ops.sparse_mlp(x, *w, activation, threshold)
    oracle, baseline = oracle_and_baseline(x, w, activation, threshold)
    assert y.shape == (tokens, OUT)
    assert_close_to_oracle("y", y, baseline, oracle)
    if off is not None:  # every neuron masked for this token: b_down exactly
        assert torch.equal(y[off], w[5])
    # the masked neurons matter: the dense MLP differs
    dense = reference.sparse_mlp(*(t.double() if t is not None else None for t in (x, *w)), activation, 0.0)
    assert (dense - oracle).abs().max() > 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", list(MLPS))
@pytest.mark.parametrize("tokens", TOKENS)
def test_sparse_mlp_all_inactive(tokens, kind, dtype, device):
    """A threshold above every |g|: the output is b_down for every token, or zeros without it."""
    activation, _ = MLPS[kind]
    x = x_view((tokens,), dtype, device, "contiguous")
    w = mlp_weights(kind, dtype, device)
    gabs, _ = gate_abs_and_error(x, w[0], w[1], activation)
    threshold = 2 * gabs.max().item() + 0.1
    y = ops.sparse_mlp(x, *w, activation, threshold)
    assert torch.equal(y, w[5].expand(tokens, OUT))
    y = ops.sparse_mlp(x, *w[:5], None, activation, threshold)
    assert y.shape == (tokens, OUT) and not y.any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_sparse_mlp_paths_agree_on_an_unrepresentable_threshold(dtype, device):
    """An activation v (a number of the dtype) and a threshold just below it that the dtype cannot hold:
    the sparse path (1 token) and the dense path (17 tokens) mask the neuron alike, as the reference does
    (comparing in float32 at least: active in half precision, where rounding the threshold would make it v)."""
    v = torch.tensor(0.3, dtype=dtype).item()
    threshold = v - 0.25 * torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(v))
    assert threshold < v
    w_in = torch.tensor([[v], [-1.0], [-1.0], [-1.0]], dtype=dtype, device=device)  # one of 4 neurons active
    w_down_t = torch.tensor([[1.0, 2.0]] * 4, dtype=dtype, device=device)
    for tokens in (1, 17):
        x = torch.ones(tokens, 1, dtype=dtype, device=device)
        y = ops.sparse_mlp(x, w_in, None, None, None, w_down_t, None, "relu", threshold)
        want = reference.sparse_mlp(x, w_in, None, None, None, w_down_t, None, "relu", threshold)
        assert torch.equal(y, want), f"{tokens} tokens: {y[0].tolist()} != reference {want[0].tolist()}"
        if dtype != torch.float32:
            assert want[0, 0].item() == v


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("tokens", [1, 4, 16])  # each accumulator size of the CUDA kernels
@pytest.mark.parametrize("gated", [False, True])
def test_sparse_mlp_at_aligned_sizes(gated, tokens, dtype, device):
    """Sizes at which the CUDA kernels take their 16-byte loads (hidden and out multiples of a pack, aligned rows),
    split the intermediate neurons into many lists and the outputs into two blocks of columns: HIDDEN, INTER and
    OUT above reach only the element-wise paths. About 20% of the neurons active, the threshold in the widest gap
    of the |activations| near there, so rounding cannot move a neuron across it."""
    g = torch.Generator().manual_seed(100 + tokens)
    hidden, inter, out = 64, 2100, 1032
    f64 = dict(dtype=torch.float64)
    w = [torch.randn(inter, hidden, generator=g, **f64) / hidden**0.5, 0.3 * torch.randn(inter, generator=g, **f64),
         torch.randn(inter, hidden, generator=g, **f64) / hidden**0.5 if gated else None,
         0.3 * torch.randn(inter, generator=g, **f64) if gated else None,
         torch.randn(inter, out, generator=g, **f64) / inter**0.5, 0.3 * torch.randn(out, generator=g, **f64)]
    w = [t.to(dtype).to(device) if t is not None else None for t in w]
    x = torch.randn(tokens, hidden, generator=g, **f64).to(dtype).to(device)
    activation = "silu" if gated else "gelu"
    gabs = reference.ACTIVATIONS[activation](x.double() @ w[0].double().t() + w[1].double()).abs().flatten()
    ranked = gabs.sort().values
    lo, hi = int(0.75 * ranked.numel()), int(0.85 * ranked.numel())
    k = lo + int((ranked[lo + 1:hi + 1] - ranked[lo:hi]).argmax())
    threshold = float((ranked[k] + ranked[k + 1]) / 2)
    assert (ranked[k + 1] - ranked[k]) / threshold > 1e-4, "no gap wide enough to be safe from rounding"
    y = ops.sparse_mlp(x, *w, activation, threshold)
    oracle, baseline = oracle_and_baseline(x, w, activation, threshold)
    assert_close_to_oracle("y", y, baseline, oracle)
    share = (gabs > threshold).reshape(tokens, inter).double().mean().item()
    assert 0.1 < share < 0.3, share


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=str)
def test_sparse_mlp_no_tokens(device, lead):
    w = mlp_weights("silu_gated", torch.float32, device)
    x = torch.empty(*lead, HIDDEN, device=device)
    for threshold in (0.0, 0.5):
        y = ops.sparse_mlp(x, *w, "silu", threshold)
        assert y.shape == (*lead, OUT) and y.dtype == x.dtype and y.device.type == device


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_mlp_no_outputs(device):
    """out = 0 (w_down_t of shape (intermediate, 0)): an empty result, not a crash (the CUDA launch shape once
    divided by the number of column blocks, zero here)."""
    w = list(mlp_weights("silu_gated", torch.float32, device))
    w[4], w[5] = w[4][:, :0], None
    x = torch.randn(2, HIDDEN, device=device)
    y = ops.sparse_mlp(x, *w, "silu", 0.5)
    assert y.shape == (2, 0) and y.device.type == device


# ==================================================================================================
# opcheck, torch.compile


def density_samples(device):
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        yield activations((3, 17), dtype, device).requires_grad_(), 1e-7, 1e-7**0.5
        yield activations((2, 3, 5), dtype, device, "transposed"), 1e-3, 0.0
    yield activations((1,), torch.float16, device).requires_grad_(), 1e-7, 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_density_loss(device):
    for a, eps, threshold in density_samples(device):
        torch.library.opcheck(_ops.density_loss.default, (a, eps, threshold))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_density_loss_backward(device):
    for a, eps, _ in density_samples(device):
        a = a.detach()
        grad = torch.rand((), dtype=torch.float64 if a.dtype == torch.float64 else torch.float32, device=device)
        torch.library.opcheck(_ops.density_loss_backward.default, (grad, a, eps))


def sparse_mlp_samples(device):
    for dtype in (torch.float32, torch.bfloat16):
        for lead, gated, biases, threshold in (((1,), False, True, 0.3), ((3,), True, False, 0.5),
                                               ((17,), False, False, 0.1), ((2, 3), True, True, 0.0),
                                               ((1, 17), True, True, 0.4)):
            kind = "silu_gated" if gated else "gelu"
            yield (rand(*lead, HIDDEN, dtype=dtype, device=device), *mlp_weights(kind, dtype, device, biases=biases),
                   MLPS[kind][0], threshold)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_sparse_mlp(device):
    for args in sparse_mlp_samples(device):
        torch.library.opcheck(_ops.sparse_mlp.default, args)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    torch._dynamo.reset()
    w = mlp_weights("silu_gated", torch.float32, device)
    x = rand(3, HIDDEN, device=device)

    def f(a, x):
        loss, density = functional.density_loss(a * 2.0, 1e-7)
        y = ops.sparse_mlp(x, *w, "silu", 0.3)
        return loss, density, y

    compiled = torch.compile(f, fullgraph=True)
    a = activations((4, 9), torch.float32, device, threshold=1e-7**0.5 / 2).requires_grad_()
    loss_c, dens_c, y_c = compiled(a, x)
    (grad_c,) = torch.autograd.grad(loss_c, a)
    loss, dens, y = f(a, x)
    (grad,) = torch.autograd.grad(loss, a)
    torch.testing.assert_close(loss_c, loss)
    assert torch.equal(dens_c, dens)
    torch.testing.assert_close(y_c, y)
    torch.testing.assert_close(grad_c, grad)
    torch.testing.assert_close(y, reference.sparse_mlp(x, *w, "silu", 0.3))


# ==================================================================================================
# errors


def mlp_call(path="op", **over):
    w = dict(zip(("w_in", "b_in", "w_up", "b_up", "w_down_t", "b_down"), mlp_weights("silu_gated", torch.float32,
                                                                                       "cpu"), strict=True))
    args = dict(x=rand(3, HIDDEN), **w, activation="silu", threshold=0.1)
    args.update(over)
    if path == "op":
        return ops.sparse_mlp(*args.values())
    # functional.sparse_mlp with a gradient to compute: the reference serves, after the op's checks
    args["w_in"].requires_grad_(args["w_in"].is_floating_point())
    x, w_in, w_down_t = args.pop("x"), args.pop("w_in"), args.pop("w_down_t")
    return functional.sparse_mlp(x, w_in, w_down_t, **args)


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(activation="tanh"), r"sparse_mlp: unsupported activation 'tanh'; supported: relu, gelu, gelu_tanh, silu"),
        (dict(threshold=-0.1), r"sparse_mlp: threshold must be >= 0, got -0\.1"),
        (dict(x=rand(3, HIDDEN + 1)), r"x\.size\(-1\) must equal hidden = w_in\.size\(1\) \(33\)"),
        (dict(x=torch.tensor(1.0)), r"x must have at least one dimension"),
        (dict(w_up=rand(INTER, HIDDEN + 1)), r"w_up must have w_in's shape"),
        (dict(w_up=rand(INTER - 1, HIDDEN), b_up=rand(INTER - 1)), r"b_up\.size\(0\) must equal intermediate"),
        (dict(w_down_t=rand(INTER + 1, OUT)), r"w_down_t\.size\(0\) must equal intermediate = w_in\.size\(0\) \(70\)"),
        (dict(w_down_t=rand(OUT, INTER)), r"w_down_t\.size\(0\) must equal intermediate"),
        (dict(b_down=rand(OUT + 1)), r"b_down\.size\(0\) must equal out = w_down_t\.size\(1\)"),
        (dict(b_in=rand(INTER, 1)), r"b_in must be 1-D"),
        (dict(w_in=rand(INTER, HIDDEN, 1)), r"w_in must be 2-D"),
        (dict(w_in=rand(0, HIDDEN), b_in=None, w_up=None, b_up=None, w_down_t=rand(0, OUT)),
         r"no intermediate neurons"),
        (dict(w_up=None), r"b_up given without w_up"),
        (dict(w_in=rand(INTER, HIDDEN, dtype=torch.float64)), r"w_in has dtype Double but x has Float"),
        (dict(w_down_t=rand(INTER, OUT, dtype=torch.bfloat16)), r"w_down_t has dtype BFloat16 but x has Float"),
        (dict(x=rand(3, HIDDEN, dtype=torch.float16)), r"has dtype Float but x has Half"),
        (dict(x=torch.ones(3, HIDDEN, dtype=torch.int32)), r"x has unsupported dtype Int"),
    ],
    ids=lambda v: ",".join(v) if isinstance(v, dict) else None,
)
@pytest.mark.parametrize("path", ["op", "with-grad"])  # with grad: the reference checked only three of them
def test_sparse_mlp_bad_input(over, match, path):
    with pytest.raises(RuntimeError, match=match):
        mlp_call(path, **over)


@pytest.mark.parametrize(
    "a, eps, threshold, match",
    [
        (torch.empty(0), 1e-7, 0.1, r"density_loss: a is empty"),
        (torch.empty(3, 0), 1e-7, 0.1, r"density_loss: a is empty"),
        (rand(4), 0.0, 0.1, r"density_loss: eps must be positive and finite, got 0"),
        (rand(4), -1e-3, 0.1, r"density_loss: eps must be positive and finite, got -0\.001"),
        # an infinite eps (or one beyond float32's range) made every term 0 and its gradient 0 * inf = NaN
        (rand(4), float("inf"), 0.1, r"density_loss: eps must be positive and finite, got inf"),
        (rand(4), float("nan"), 0.1, r"density_loss: eps must be positive and finite, got nan"),
        (rand(4), 1e300, 0.1, r"density_loss: eps = 1e\+300 is outside float32's normal range .* for Float a"),
        (rand(4), 1e-7, -0.5, r"density_loss: threshold must be >= 0, got -0\.5"),
        # below float32's range eps became 0 in the kernel, and an exact zero activation gave 0 / 0 = NaN
        (rand(4), 1e-46, 0.1, r"density_loss: eps = 1e-46 is outside float32's normal range .* for Float a"),
        (rand(4).half(), 1e-40, 0.1, r"eps = 1e-40 is outside float32's normal range .* for Half a"),
        (torch.ones(4, dtype=torch.int32), 1e-7, 0.1, r"density_loss: a has unsupported dtype Int"),
        (torch.ones(4, dtype=torch.bool), 1e-7, 0.1, r"density_loss: a has unsupported dtype Bool"),
    ],
)
def test_density_loss_bad_input(a, eps, threshold, match):
    with pytest.raises(RuntimeError, match=match):
        ops.density_loss(a, eps, threshold)


def test_default_density_threshold_is_sqrt_eps():
    """The documented default, pinned by a literal (the other tests take it from the function they check)."""
    a = torch.tensor([0.0, 0.995e-3, 1.005e-3, -2e-3, 5e-4])  # sqrt(1e-6) = 1e-3: two of five above it
    loss, density = functional.density_loss(a, eps=1e-6)
    assert density.item() == pytest.approx(2 / 5)
    assert functional.default_density_threshold(1e-6) == pytest.approx(1e-3, rel=1e-12)


@pytest.mark.parametrize("eps", [0.0, -1.0, float("inf"), float("nan")])
def test_functional_density_loss_bad_eps(eps):
    """The default threshold is sqrt(eps): a negative eps once reached the op as a complex number"""
    with pytest.raises(ValueError, match=r"density_loss: eps must be positive"):
        functional.density_loss(rand(4), eps=eps)


def test_density_loss_backward_bad_input():
    with pytest.raises(RuntimeError, match=r"grad must have one element"):
        _ops.density_loss_backward(rand(2), rand(4), 1e-7)
    with pytest.raises(RuntimeError, match=r"density_loss_backward: a is empty"):
        _ops.density_loss_backward(torch.tensor(1.0), torch.empty(0), 1e-7)
    with pytest.raises(RuntimeError, match=r"a has unsupported dtype Long"):
        _ops.density_loss_backward(torch.tensor(1.0), torch.ones(3, dtype=torch.int64), 1e-7)
    with pytest.raises(RuntimeError, match=r"density_loss_backward: eps must be positive and finite, got 0"):
        _ops.density_loss_backward(torch.tensor(1.0), rand(4), 0.0)
    with pytest.raises(RuntimeError, match=r"density_loss_backward: eps = 1e-40 is outside float32's normal range"):
        _ops.density_loss_backward(torch.tensor(1.0), rand(4), 1e-40)


def test_density_loss_float64_takes_an_eps_below_float32s_range():
    """float64 activations compute in float64: an eps float32 cannot hold is accepted and exact zeros give 0."""
    a = torch.tensor([0.0, 1e-30, 0.0, 2.0], dtype=torch.float64, requires_grad=True)
    loss, _ = functional.density_loss(a, eps=1e-46)
    want = reference.density_loss(a.detach(), 1e-46)
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert torch.isfinite(a.grad).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens", [1, 3, 17])
@pytest.mark.parametrize("activation,threshold", [("relu", 0.0), ("gelu", 0.1), ("relu", 0.1)])
def test_sparse_mlp_strided_biases_and_nan(tokens, device, activation, threshold):
    """Biases that are strided views are read as such (the sparse path once read them as contiguous), and a NaN
    activation is active and propagates as in the dense MLP, on the sparse path (few tokens, few active neurons)
    as on the dense one, with and without a threshold (the dense path's mask once dropped a NaN gate above 0,
    and the CUDA kernel's ReLU turned NaN into 0)."""
    g = torch.Generator().manual_seed(tokens)
    inter, hidden, out = 64, 8, 5

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device)

    x, w_in, w_up, w_down_t = randn(tokens, hidden), randn(inter, hidden), randn(inter, hidden), randn(inter, out)
    b_in = randn(inter) - 3  # few active neurons: the sparse path for up to 16 tokens
    b_up, b_down = randn(2 * inter)[::2], randn(3 * out)[1::3]
    args = (x, w_in, b_in, w_up, b_up, w_down_t, b_down, activation, threshold)
    torch.testing.assert_close(ops.sparse_mlp(*args), reference.sparse_mlp(*args))
    x[0, 0] = float("nan")
    y, want = ops.sparse_mlp(*args), reference.sparse_mlp(*args)
    assert want[0].isnan().all() and y[0].isnan().all()
    torch.testing.assert_close(y[1:], want[1:])
    # a NaN gate neuron for every token: every output is NaN, whichever path runs
    x[0, 0] = 0.0
    b_in[5] = float("nan")
    y, want = ops.sparse_mlp(*args), reference.sparse_mlp(*args)
    assert want.isnan().all() and y.isnan().all()


@pytest.mark.parametrize("tokens", [1, 20])  # the sparse and the dense path
def test_sparse_mlp_forward_mode_gives_the_references_tangent(tokens):
    """Dual tensors (torch.func.jvp, forward AD) need not require grad: the call went to the op, which has no
    derivative, and the tangent came out zero (jvp) or None (forward AD on the sparse path)."""
    w = dict(zip(("w_in", "b_in", "w_up", "b_up", "w_down_t", "b_down"),
                 mlp_weights("silu_gated", torch.float64, "cpu"), strict=True))
    x, t = rand(tokens, HIDDEN, dtype=torch.float64), rand(tokens, HIDDEN, dtype=torch.float64)

    def fn(impl):
        return lambda x_: impl(x_, w["w_in"], w["b_in"], w["w_up"], w["b_up"], w["w_down_t"], w["b_down"], "silu",
                               0.05)

    def ours(x_, w_in, b_in, w_up, b_up, w_down_t, b_down, activation, threshold):
        return functional.sparse_mlp(x_, w_in, w_down_t, b_in=b_in, w_up=w_up, b_up=b_up, b_down=b_down,
                                     activation=activation, threshold=threshold)

    _, want = torch.func.jvp(fn(reference.sparse_mlp), (x,), (t,))
    assert want.abs().sum() > 0
    _, got = torch.func.jvp(fn(ours), (x,), (t,))
    torch.testing.assert_close(got, want)
    with torch.autograd.forward_ad.dual_level():
        got = torch.autograd.forward_ad.unpack_dual(fn(ours)(torch.autograd.forward_ad.make_dual(x, t))).tangent
    torch.testing.assert_close(got, want)


def test_sparse_mlp_with_a_gradient_computes_in_the_autocast_dtype():
    """With a gradient to compute the reference serves: under autocast it added the float32 bias to the bfloat16
    product, a float32 output where the op (and the dense MLP) give bfloat16."""
    w = [t.requires_grad_() if t is not None else t for t in mlp_weights("silu_gated", torch.float32, "cpu")]
    w_in, b_in, w_up, b_up, w_down_t, b_down = w
    x = rand(3, HIDDEN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = functional.sparse_mlp(x, w_in, w_down_t, b_in=b_in, w_up=w_up, b_up=b_up, b_down=b_down,
                                  activation="silu", threshold=0.1)
        with torch.no_grad():
            want = functional.sparse_mlp(x, w_in, w_down_t, b_in=b_in, w_up=w_up, b_up=b_up, b_down=b_down,
                                         activation="silu", threshold=0.1)
    assert y.dtype == want.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w_in.grad is not None and w_in.grad.dtype == torch.float32


@pytest.mark.parametrize("call", [
    lambda: functional.sparse_mlp(rand(3, HIDDEN), rand(INTER, HIDDEN), rand(INTER, OUT), threshold="0.1"),
    lambda: functional.density_loss(rand(3, 5), eps="1e-3"),
    lambda: functional.density_loss(rand(3, 5), threshold="0.1"),
], ids=["sparse_mlp threshold", "density_loss eps", "density_loss threshold"])
def test_a_string_hyperparameter_is_refused(call):
    """float() read '0.1' as its number, where lora_linear's scaling refused a string."""
    with pytest.raises(TypeError, match=r"must be a number, got '"):
        call()
