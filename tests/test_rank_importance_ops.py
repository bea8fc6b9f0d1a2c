"""The rank importance op (IncreLoRA): rank_importance against the pure-PyTorch reference.

The reference forms dW in float64 from the same (rounded) factors, so for every factor dtype the only
difference is how the kernel forms and sums the terms: float64 on the CPU (the result agrees to the rounding to
float32), float32 on CUDA (within 1e-5 of the magnitude sum_k |B E A| |G| that bounds its rounding errors).
"""

from __future__ import annotations

import random
import warnings

import pytest
import torch
from helpers import DEVICES, HAS_CUDA

import pefttorch
from pefttorch import ops, reference

_ops = torch.ops.pefttorch

f32, f64, bf16, f16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
DTYPES = [f32, f64, bf16, f16]
LAYOUTS = ["contiguous", "strided", "transposed"]


def ids(value):
    return str(value).replace("torch.", "")


def matrix(rows, cols, dtype, device, layout="contiguous"):
    """Fresh random normal data (never zeros) of shape (rows, cols) in `layout`: "contiguous", "strided" (every
    other column of a wider matrix) or "transposed" (a (cols, rows) matrix transposed)."""
    def base(*shape):  # converted before the view is taken: .to() of a strided view would make it contiguous
        return torch.randn(*shape, dtype=f64).to(dtype=dtype, device=device)

    if layout == "strided":
        t = base(rows, 2 * cols)[:, ::2]
    elif layout == "transposed":
        t = base(cols, rows).t()
    else:
        t = base(rows, cols)
    assert t.shape == (rows, cols)
    assert layout == "contiguous" or min(rows, cols) <= 1 or not t.is_contiguous()
    return t


def sampled(dim, offset, stride):
    return len(range(offset, dim, stride))


def module(out, inp, cap, rank, dtype, device, grid=(0, 1, 0, 1), layout="contiguous", weight=None, e_shape="col"):
    """One module's arguments: a dict of lora_a (cap, in), lora_b (out, cap), lora_e ((cap, 1) for e_shape "col",
    (cap,) for "vec", every other element of a longer vector for "strided"), the grad tile of the grid
    (row_offset, row_stride, col_offset, col_stride), the rank and a weight."""
    r0, rs, c0, cs = grid
    if e_shape == "col":
        e = torch.randn(cap, 1, dtype=f64).to(dtype=dtype, device=device)
    elif e_shape == "vec":
        e = torch.randn(cap, dtype=f64).to(dtype=dtype, device=device)
    else:
        e = torch.randn(2 * cap, 1, dtype=f64).to(dtype=dtype, device=device)[::2]
    b_layout = LAYOUTS[(LAYOUTS.index(layout) + 1) % len(LAYOUTS)]  # operands of one module in different layouts
    g_layout = LAYOUTS[(LAYOUTS.index(layout) + 2) % len(LAYOUTS)]
    return dict(
        lora_a=matrix(cap, inp, dtype, device, layout),
        lora_b=matrix(out, cap, dtype, device, b_layout),
        lora_e=e,
        grad_tiles=matrix(sampled(out, r0, rs), sampled(inp, c0, cs), f32, device, g_layout),
        row_offset=r0, row_stride=rs, col_offset=c0, col_stride=cs, rank=rank,
        weight=random.uniform(0.1, 3.0) if weight is None else weight,
    )


KEYS = ["lora_a", "lora_b", "lora_e", "grad_tiles", "row_offset", "row_stride", "col_offset", "col_stride", "rank",
        "weight"]


def args_of(modules):
    """The op's ten lists from a list of module dicts."""
    return [[m[k] for m in modules] for k in KEYS]


def reference_scores(modules):
    """reference.rank_importance on the modules (lora_e in either shape, (cap, 1) or (cap,), as given)."""
    return reference.rank_importance(*args_of(modules))


def magnitude(modules):
    """weight * sum |B| |E| |A| |G| over each module's sample: the scale of the rounding errors of the score."""
    mags = []
    for m in modules:
        n, a, b, e = m["rank"], m["lora_a"].double(), m["lora_b"].double(), m["lora_e"].double().reshape(-1, 1)
        dw_abs = b[:, :n].abs() @ (e[:n].abs() * a[:n].abs())
        sample = dw_abs[m["row_offset"]::m["row_stride"], m["col_offset"]::m["col_stride"]]
        mags.append(abs(m["weight"]) * (sample * m["grad_tiles"].double().abs()).sum().cpu())
    return torch.stack(mags)


def assert_scores(got, modules, device):
    """got is the float32 (modules,) result on `device`, and within the rounding of the kernel's precision of the
    reference on the same inputs: float64 sums (CPU) or float32 (CUDA), and one rounding to float32."""
    want = reference_scores(modules)
    assert got.dtype == f32 and got.shape == (len(modules),) and got.device.type == torch.device(device).type
    assert not got.requires_grad
    g, w = got.double().cpu(), want.double().cpu()
    kernel_error = (1e-12 if torch.device(device).type == "cpu" else 1e-5) * magnitude(modules)
    bound = 2.0**-23 * (g.abs() + w.abs()) + kernel_error
    err = (g - w).abs()
    assert not torch.isnan(got).any()
    assert (err <= bound).all(), f"error {err.max().item():.3g} exceeds its bound by {(err - bound).max().item():.3g}"
    return want


def mixed_modules(dtype, device):
    """Modules of different shapes, ranks and samples, for one call: odd sizes (1, 3, 17, not multiples of 8),
    ranks 0, 1, cap and between, exact (strides 1) and strided samples with offsets, every layout."""
    return [
        module(1, 1, 1, 1, dtype, device),
        module(3, 17, 5, 5, dtype, device, layout="strided", e_shape="vec"),
        module(17, 3, 8, 1, dtype, device, layout="transposed", e_shape="strided"),
        module(17, 17, 3, 0, dtype, device),  # rank 0
        module(33, 20, 16, 9, dtype, device, grid=(2, 3, 1, 4), layout="strided"),
        module(20, 33, 7, 7, dtype, device, grid=(0, 2, 2, 3), layout="transposed", e_shape="vec"),
        module(5, 9, 6, 3, dtype, device, grid=(4, 5, 8, 9), e_shape="strided"),  # one sampled element
        module(3, 5, 2, 2, dtype, device, grid=(3, 4, 0, 1)),  # offset past the rows: empty sample
        module(70, 130, 70, 70, dtype, device, grid=(1, 2, 0, 1), layout="transposed"),  # several k tiles (CUDA)
    ]


# ==================================================================================================
# values


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_matches_reference(dtype, device):
    modules = mixed_modules(dtype, device)
    got = ops.rank_importance(*args_of(modules))
    want = assert_scores(got, modules, device)
    assert got[3] == 0 and got[7] == 0  # rank 0 and the empty sample: exactly 0
    assert (want[[0, 1, 2, 4, 5, 6, 8]] > 0).all()  # (the data are random normal: no zero score elsewhere)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_exact_score_of_dense_update(layout, device):
    """Strides 1: the whole matrix, i.e. weight * sum |B diag(E) A * G| with dW formed densely."""
    modules = [module(17, 3, 5, 4, f32, device, layout=layout), module(3, 17, 6, 6, f32, device, layout=layout)]
    got = ops.rank_importance(*args_of(modules))
    for m, score in zip(modules, got, strict=True):
        n = m["rank"]
        dw = m["lora_b"][:, :n].double() @ (m["lora_e"][:n].double() * m["lora_a"][:n].double())
        want = m["weight"] * (dw * m["grad_tiles"].double()).abs().sum()
        torch.testing.assert_close(score.double(), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_samples_partition_the_matrix(device):
    """The row_stride * col_stride samples of offsets (r0, c0) cover every element once: their scores add up to
    the exact score (all with the same weight, tiles cut from one gradient)."""
    out, inp, cap, rs, cs = 17, 23, 6, 3, 4
    exact = module(out, inp, cap, 5, f32, device, weight=1.0)
    full_g = exact["grad_tiles"]
    parts = []
    for r0 in range(rs):
        for c0 in range(cs):
            parts.append(dict(exact, row_offset=r0, row_stride=rs, col_offset=c0, col_stride=cs,
                              grad_tiles=full_g[r0::rs, c0::cs]))
    got = ops.rank_importance(*args_of([exact, *parts]))
    torch.testing.assert_close(got[1:].double().sum(), got[0].double(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_weight_scales_and_zero_cases(device):
    m = module(9, 11, 4, 4, f32, device, weight=1.0)
    base = ops.rank_importance(*args_of([m]))
    scaled = ops.rank_importance(*args_of([dict(m, weight=-2.5), dict(m, weight=0.0), dict(m, rank=0)]))
    torch.testing.assert_close(scaled[0], -2.5 * base[0], rtol=1e-6, atol=0)
    assert scaled[1] == 0 and scaled[2] == 0
    # a zero gradient, or a zero factor (LoRA's B starts at zero), scores exactly 0
    z = [dict(m, grad_tiles=torch.zeros_like(m["grad_tiles"])), dict(m, lora_b=torch.zeros_like(m["lora_b"]))]
    assert torch.equal(ops.rank_importance(*args_of(z)), torch.zeros(2, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [f32, bf16], ids=ids)
def test_many_modules(dtype, device):
    """Several hundred modules in one call (one launch on CUDA: a descriptor table of that size)."""
    modules = []
    for i in range(300):
        out, inp = random.randint(1, 40), random.randint(1, 40)
        cap = random.randint(1, 12)
        rs, cs = random.randint(1, 4), random.randint(1, 4)
        grid = (random.randrange(rs), rs, random.randrange(cs), cs)
        modules.append(module(out, inp, cap, random.randint(0, cap), dtype, device, grid=grid,
                              layout=LAYOUTS[i % 3], e_shape=["col", "vec", "strided"][i % 2]))
    got = ops.rank_importance(*args_of(modules))
    assert_scores(got, modules, device)


@pytest.mark.parametrize("device", DEVICES)
def test_large(device):
    """Many parallel row chunks (CPU), several row and column pieces and k tiles (CUDA)."""
    modules = [module(300, 1100, 130, 130, f32, device, layout="contiguous"),
               module(1100, 257, 64, 40, bf16, device, grid=(1, 3, 0, 1), layout="transposed")]
    got = ops.rank_importance(*args_of(modules[:1])), ops.rank_importance(*args_of(modules[1:]))
    assert_scores(got[0], modules[:1], device)
    assert_scores(got[1], modules[1:], device)


def test_cpu_result_independent_of_threads():
    """The CPU kernel sums each row separately and the rows in order: the same bits with any number of threads."""
    modules = [module(200, 300, 16, 16, f32, "cpu"), module(50, 70, 8, 5, f32, "cpu", grid=(1, 2, 0, 3))]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.rank_importance(*args_of(modules))
        torch.set_num_threads(max(2, threads))
        many = ops.rank_importance(*args_of(modules))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def with_parameters(m):
    """m with factors that require grad, as trainable LoRA factors do."""
    return dict(m, lora_a=m["lora_a"].clone().requires_grad_(), lora_b=m["lora_b"].clone().requires_grad_(),
                lora_e=m["lora_e"].clone().requires_grad_())


@pytest.mark.parametrize("device", DEVICES)
def test_parameters_that_require_grad(device):
    """The factors are trainable parameters: the wrapper computes the score under no_grad, so it is a plain tensor
    (no autograd node, no warning), inside or outside a no_grad block."""
    m = module(7, 9, 4, 3, f32, device)
    want = ops.rank_importance(*args_of([m]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = ops.rank_importance(*args_of([with_parameters(m)]))
        with torch.no_grad():
            got_no_grad = ops.rank_importance(*args_of([with_parameters(m)]))
    assert not got.requires_grad and got.grad_fn is None
    assert torch.equal(got, want) and torch.equal(got_no_grad, want)


def test_empty_lists():
    got = ops.rank_importance([], [], [], [], [], [], [], [], [], [])
    assert got.shape == (0,) and got.dtype == f32 and got.device.type == "cpu"
    assert torch.equal(reference.rank_importance([], [], [], [], [], [], [], [], [], []), got)


def test_kernels_registered():
    """build_info() lists the ops whose kernels test_build checks; this op's kernels are checked here alike."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key("pefttorch::rank_importance", "CPU")
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("pefttorch::rank_importance", "CUDA")
    assert has_cuda == pefttorch.build_info()["cuda"]


# ==================================================================================================
# opcheck, torch.compile


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for dtype in DTYPES:
        modules = [module(3, 17, 5, 5, dtype, device, layout="strided"),
                   module(17, 3, 4, 0, dtype, device),
                   module(9, 11, 6, 2, dtype, device, grid=(1, 2, 2, 3), layout="transposed", e_shape="vec")]
        torch.library.opcheck(_ops.rank_importance.default, tuple(args_of(modules)))
    torch.library.opcheck(_ops.rank_importance.default, tuple(args_of([module(1, 1, 1, 1, f32, device)])))


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    torch._dynamo.reset()
    modules = [module(17, 3, 5, 4, f32, device), module(9, 11, 6, 2, f32, device, grid=(1, 2, 2, 3))]
    lists = args_of(modules)

    def f(a, b, e, g):
        # the gradient tiles as a training step would have them: computed in the graph
        return ops.rank_importance(a, b, e, [t * 2 for t in g], *lists[4:])

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(*lists[:4]), f(*lists[:4]))


# ==================================================================================================
# errors


def good(**over):
    """Two valid modules' lists, with the lists in `over` replaced; `over` values that are callables get the list
    and return the replacement."""
    mods = [module(5, 7, 4, 3, f32, "cpu"), module(6, 9, 3, 2, f32, "cpu", grid=(1, 2, 0, 3), e_shape="vec")]
    lists = dict(zip(KEYS, args_of(mods), strict=True))
    for k, v in over.items():
        lists[k] = v(lists[k]) if callable(v) else v
    return lists.values()


def at(i, value):
    """Replaces entry i of a list."""
    return lambda lst: [value if j == i else x for j, x in enumerate(lst)]


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(lora_b=lambda v: v[:1]), r"rank_importance: every list must have one entry per module: lora_a has 2 "
                                       r"but lora_b has 1"),
        (dict(weight=lambda v: [*v, 1.0]), r"lora_a has 2 but weight has 3"),
        (dict(grad_tiles=[]), r"lora_a has 2 but grad_tiles has 0"),
        (dict(lora_a=[]), r"lora_a has 0 but lora_b has 2"),
        (dict(lora_a=at(1, torch.randn(3, 9, 1))), r"rank_importance: lora_a\[1\] must be 2-D, got shape \[3, 9, 1\]"),
        (dict(lora_b=at(0, torch.randn(5 * 4))), r"lora_b\[0\] must be 2-D, got shape \[20\]"),
        (dict(lora_b=at(0, torch.randn(5, 3))), r"lora_b\[0\].size\(1\) must equal cap = lora_a\[0\].size\(0\) "
                                                r"\(4\), got shape \[5, 3\]"),
        (dict(lora_e=at(1, torch.randn(3, 2))), r"lora_e\[1\] must have shape \(cap,\) or \(cap, 1\) with cap = "
                                                r"lora_a\[1\].size\(0\) = 3, got \[3, 2\]"),
        (dict(lora_e=at(1, torch.randn(4))), r"lora_e\[1\] must have shape \(cap,\) or \(cap, 1\)"),
        (dict(lora_e=at(0, torch.tensor(1.0))), r"lora_e\[0\] must have shape"),
        (dict(lora_a=at(0, torch.ones(4, 7, dtype=torch.int32))), r"lora_a\[0\] has unsupported dtype Int"),
        (dict(lora_e=at(1, torch.ones(3, dtype=torch.bool))), r"lora_e\[1\] has unsupported dtype Bool"),
        (dict(lora_b=at(1, torch.randn(6, 3, dtype=bf16))),
         r"lora_b\[1\] has dtype BFloat16 but lora_a\[0\] has Float; the factors of all modules \(lora_a, lora_b, "
         r"lora_e\) must share one dtype"),
        (dict(lora_a=lambda v: [v[0], v[1].double()], lora_b=lambda v: [v[0], v[1].double()],
              lora_e=lambda v: [v[0], v[1].double()]), r"lora_a\[1\] has dtype Double but lora_a\[0\] has Float"),
        (dict(grad_tiles=at(0, torch.randn(5, 7, dtype=bf16))), r"grad_tiles\[0\] must be float32, got BFloat16"),
        (dict(grad_tiles=at(0, torch.randn(35))), r"grad_tiles\[0\] must be 2-D, got shape \[35\]"),
        (dict(grad_tiles=at(1, torch.randn(3, 2))),
         r"grad_tiles\[1\] must have the sampled shape \[3, 3\] \(len\(range\(row_offset, out, row_stride\)\) with "
         r"out = lora_b\[1\].size\(0\) = 6, len\(range\(col_offset, in, col_stride\)\) with in = "
         r"lora_a\[1\].size\(1\) = 9\), got \[3, 2\]"),
        (dict(grad_tiles=at(0, torch.randn(7, 5))), r"grad_tiles\[0\] must have the sampled shape \[5, 7\]"),
        (dict(row_stride=at(0, 0)), r"rank_importance: row_stride\[0\] must be >= 1, got 0"),
        (dict(col_stride=at(1, -3)), r"col_stride\[1\] must be >= 1, got -3"),
        (dict(row_offset=at(1, 2)), r"row_offset\[1\] must be in \[0, row_stride\[1\]\) = \[0, 2\), got 2"),
        (dict(col_offset=at(0, -1)), r"col_offset\[0\] must be in \[0, col_stride\[0\]\) = \[0, 1\), got -1"),
        (dict(rank=at(0, 5)), r"rank\[0\] must be in \[0, cap\] with cap = lora_a\[0\].size\(0\) = 4, got 5"),
        (dict(rank=at(1, -1)), r"rank\[1\] must be in \[0, cap\] with cap = lora_a\[1\].size\(0\) = 3, got -1"),
        (dict(weight=at(1, float("nan"))), r"rank_importance: weight\[1\] must be finite, got nan"),
        (dict(weight=at(0, float("inf"))), r"weight\[0\] must be finite, got inf"),
        (dict(weight=at(0, float("-inf"))), r"weight\[0\] must be finite, got -inf"),
    ],
    ids=lambda v: ",".join(v) if isinstance(v, dict) else None,
)
def test_bad_input(over, match):
    with pytest.raises(RuntimeError, match=match):
        ops.rank_importance(*good(**over))


def test_bad_input_empty_op_call():
    """The op itself (not the wrapper) on empty lists: with no tensor, the dispatcher has no device to pick a kernel
    by, and says so before any kernel runs (the op's own check is for callers that bypass the dispatcher)."""
    with pytest.raises(RuntimeError, match=r"There were no tensor arguments to this function"):
        _ops.rank_importance([], [], [], [], [], [], [], [], [], [])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_device_mismatch():
    to_cuda = lambda lst: [t.cuda() for t in lst]  # noqa: E731
    with pytest.raises(RuntimeError, match=r"rank_importance: lora_a\[1\] is on cuda:0 but lora_a\[0\] is on cpu"):
        ops.rank_importance(*good(lora_a=lambda v: [v[0], v[1].cuda()]))
    with pytest.raises(RuntimeError, match=r"rank_importance: lora_b\[0\] is on cpu but lora_a\[0\] is on cuda:0"):
        ops.rank_importance(*good(lora_a=to_cuda))
    lists = list(good())
    lists[:3] = [[t.cuda() for t in lst] for lst in lists[:3]]
    with pytest.raises(RuntimeError, match=r"rank_importance: grad_tiles\[0\] is on cpu but lora_a\[0\] is on cuda:0"):
        ops.rank_importance(*lists)
