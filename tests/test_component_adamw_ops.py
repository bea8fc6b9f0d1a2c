"""The component AdamW op (IncreLoRA/AdaLoRA's RankAwareAdamW): component_adamw_ against the pure-PyTorch reference.

Both sides start from copies of the same fresh random data and step in the same precision (float32, float64 for
float64 tensors) with the same order of operations, so float32 and float64 agree to a few ulps (the reference's pow
and the kernel's may differ in the last bit, and a CUDA kernel contracts into fused multiply-adds), and bfloat16 and
float16, rounded once from nearly equal float32 values, to within an ulp or two of the storage dtype. The rows past
rows[m] must keep their bits.
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
# (rtol, atol) of kernel vs reference on the same inputs: a few ulps of the step's precision (float32 / float64), or
# about two ulps of the storage dtype for the half types
TOL = {f32: (2e-6, 1e-7), f64: (1e-13, 1e-15), bf16: (1.6e-2, 1e-5), f16: (2e-3, 1e-5)}
STEP_CYCLE = [1.0, 2.0, 50.0, 1000.0]
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)


def ids(value):
    return str(value).replace("torch.", "")


def grad_of(rows, cols, dtype, device, layout):
    """Fresh random gradient of shape (rows, cols) in `layout`: "contiguous", "transposed" (a (cols, rows) matrix
    transposed) or "strided" (every other column of a wider matrix)."""
    def base(*shape):  # converted before the view is taken: .to() of a strided view would make it contiguous
        return torch.randn(*shape, dtype=f64).to(dtype=dtype, device=device)

    if layout == "transposed":
        return base(cols, rows).t()
    if layout == "strided":
        return base(rows, 2 * cols)[:, ::2]
    return base(rows, cols)


def tensor(total, cols, rows, dtype, device, warmup=0.0, layout="contiguous", steps=None, extra_steps=0):
    """One tensor's arguments: params (total, cols), its gradient in `layout`, states from a few earlier steps (m of
    either sign, v > 0; never zeros: zeros hide unread elements), step counts per row cycling through 1, 2, 50, 1000
    (or `steps`), `extra_steps` more entries than rows, and rows and warmup."""
    def rnd(scale=1.0):
        return (scale * torch.randn(total, cols, dtype=f64)).to(dtype=dtype, device=device)

    if steps is None:
        steps = [STEP_CYCLE[k % len(STEP_CYCLE)] for k in range(total + extra_steps)]
    return dict(
        params=rnd(),
        grads=grad_of(total, cols, dtype, device, layout),
        exp_avgs=rnd(0.1),
        exp_avg_sqs=(0.01 * torch.rand(total, cols, dtype=f64) + 1e-3).to(dtype=dtype, device=device),
        steps=torch.tensor(steps, dtype=f32, device=device),
        rows=rows,
        warmup=warmup,
    )


KEYS = ["params", "grads", "exp_avgs", "exp_avg_sqs", "steps", "rows"]


def clone(tensors):
    return [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in tensors]


def run(fn, tensors, weight_decay, **hyper):
    """fn (ops.component_adamw_ or reference.component_adamw_) on the tensors' lists, in place."""
    h = dict(HYPER, **hyper)
    fn(*[[t[k] for t in tensors] for k in KEYS], h["lr"], h["beta1"], h["beta2"], h["eps"], weight_decay,
       [t["warmup"] for t in tensors])


def assert_step(tensors, weight_decay, **hyper):
    """Runs the op on `tensors` and the reference on copies; the updated rows agree to the dtype's tolerance, the rest
    and the inputs that are not updated (grads, steps) keep their bits. Returns the tensors from before the step."""
    before, want = clone(tensors), clone(tensors)
    run(ops.component_adamw_, tensors, weight_decay, **hyper)
    run(reference.component_adamw_, want, weight_decay, **hyper)
    for i, (t, b, w) in enumerate(zip(tensors, before, want, strict=True)):
        n = t["rows"]
        rtol, atol = TOL[t["params"].dtype]
        for k in ("params", "exp_avgs", "exp_avg_sqs"):
            assert t[k].dtype == b[k].dtype and t[k].shape == b[k].shape
            torch.testing.assert_close(t[k][:n], w[k][:n], rtol=rtol, atol=atol, msg=lambda m: f"{i} {k}: {m}")  # noqa: B023
            assert torch.equal(t[k][n:], b[k][n:]), f"tensor {i}: {k} changed past rows = {n}"
            # the step did something (random data: in float32 and float64 no row stays put; a bfloat16 element may
            # round back to its old value, and lr 0 leaves the parameters)
            moved = n > 0 and t[k].dtype in (f32, f64) and (k != "params" or hyper.get("lr", 1.0) != 0.0)
            assert not moved or not torch.equal(t[k][:n], b[k][:n])
        assert torch.equal(t["grads"], b["grads"]) and torch.equal(t["steps"], b["steps"])
    return before


def mixed_tensors(dtype, device):
    """Tensors of different shapes for one call: odd sizes (1, 3, 17), rows 0, partial and all, a (cap, 1) lora_E
    like column, warmup off and on (shorter and longer than some rows' step counts), gradients in every layout."""
    return [
        tensor(1, 1, 1, dtype, device),
        tensor(3, 17, 3, dtype, device, warmup=100.0, layout="strided"),  # all rows, every row still warming up
        tensor(17, 3, 9, dtype, device, warmup=3.0, layout="transposed", extra_steps=5),  # partial rows
        tensor(17, 1, 17, dtype, device, warmup=20.0),  # lora_E-like: one column
        tensor(17, 17, 0, dtype, device),  # rows 0: untouched
        tensor(33, 20, 30, dtype, device, layout="transposed"),
        tensor(5, 1100, 4, dtype, device, warmup=1.0),  # wide rows (several column pieces on CUDA)
    ]


# ==================================================================================================
# values


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_matches_reference(dtype, weight_decay, device):
    assert_step(mixed_tensors(dtype, device), weight_decay)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_close_to_float64_definition(device):
    """Not just the reference's own float32 arithmetic: the float32 step is within float32 rounding of the definition
    evaluated in float64 on the same inputs."""
    tensors = mixed_tensors(f32, device)
    want = [{k: v.double() if isinstance(v, torch.Tensor) and k != "steps" else v for k, v in t.items()}
            for t in tensors]
    run(ops.component_adamw_, tensors, 0.1)
    run(reference.component_adamw_, want, 0.1)
    for t, w in zip(tensors, want, strict=True):
        for k in ("params", "exp_avgs", "exp_avg_sqs"):
            torch.testing.assert_close(t[k].double(), w[k], rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("step", [1.0, 2.0, 50.0, 1000.0])
def test_each_step_count(step, device):
    """Every row at one step count (the bias corrections of step 1 are the largest), with and without warmup."""
    tensors = [tensor(7, 5, 6, f32, device, steps=[step] * 7), tensor(3, 9, 3, f32, device, warmup=60.0,
                                                                    steps=[step] * 3)]
    assert_step(tensors, 0.01)


@pytest.mark.parametrize("device", DEVICES)
def test_hyperparameter_edges(device):
    """lr 0 leaves the parameters but not the moments; beta1 = beta2 = 0 (moments are the gradient); eps 0."""
    tensors = [tensor(6, 5, 4, f32, device)]
    before = assert_step(tensors, 0.0, lr=0.0)
    assert torch.equal(tensors[0]["params"], before[0]["params"])
    assert_step([tensor(6, 5, 4, f32, device)], 0.1, beta1=0.0, beta2=0.0)
    assert_step([tensor(6, 5, 4, f64, device)], 0.1, eps=0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_matches_torch_adamw(device):
    """With every row at the same step and no warmup, the op is torch.optim.AdamW (written differently: equal to
    float32 rounding), over several steps from zero states."""
    p = torch.randn(6, 9, device=device)
    ref = p.clone().requires_grad_()
    opt = torch.optim.AdamW([ref], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, foreach=False)
    m, v, steps = torch.zeros_like(p), torch.zeros_like(p), torch.zeros(6, device=device)
    for _ in range(3):
        g = torch.randn_like(p)
        ref.grad = g.clone()
        opt.step()
        steps += 1
        ops.component_adamw_([p], [g], [m], [v], [steps], [6], 1e-2, 0.9, 0.999, 1e-8, 0.1, [0.0])
    state = opt.state[ref]
    torch.testing.assert_close(p, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m, state["exp_avg"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(v, state["exp_avg_sq"], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_steps_with_stride(device):
    """steps[m] is read through its stride (a view of every other entry of a longer vector)."""
    t = tensor(9, 4, 7, f32, device)
    t["steps"] = torch.tensor([STEP_CYCLE[k % 4] for k in range(18)], device=device)[::2]
    assert not t["steps"].is_contiguous()
    assert_step([t], 0.05)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [f32, bf16], ids=ids)
def test_many_tensors(dtype, device):
    """Several hundred tensors in one call (one launch on CUDA: a descriptor table of that size)."""
    tensors = []
    for i in range(300):
        total, cols = random.randint(1, 24), random.randint(1, 40)
        tensors.append(tensor(total, cols, random.randint(0, total), dtype, device, warmup=random.choice([0.0, 30.0]),
                              layout=["contiguous", "transposed", "strided"][i % 3]))
    assert_step(tensors, 0.01)


@pytest.mark.parametrize("device", DEVICES)
def test_large(device):
    """Many parallel row chunks (CPU), many blocks along rows and columns (CUDA)."""
    assert_step([tensor(64, 4096, 60, f32, device, warmup=10.0),
                 tensor(3000, 8, 2999, f32, device, layout="transposed")], 0.01)


def test_cpu_result_independent_of_threads():
    """Each element is updated by one thread with the same arithmetic: the same bits with any number of threads."""
    tensors = [tensor(200, 300, 150, f32, "cpu", warmup=5.0), tensor(50, 70, 50, f32, "cpu")]
    one, many = clone(tensors), clone(tensors)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        run(ops.component_adamw_, one, 0.1)
        torch.set_num_threads(max(2, threads))
        run(ops.component_adamw_, many, 0.1)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many, strict=True):
        for k in ("params", "exp_avgs", "exp_avg_sqs"):
            assert torch.equal(a[k], b[k])


@pytest.mark.parametrize("device", DEVICES)
def test_parameters_that_require_grad(device):
    """The parameters are leaves that require grad, their gradients p.grad: the wrapper steps under no_grad, inside
    or outside a no_grad block, with no warning, and the parameters stay leaves."""
    t = tensor(5, 4, 3, f32, device)
    want = clone([t])
    run(reference.component_adamw_, want, 0.1)
    for no_grad in (False, True):
        u = clone([t])[0]
        p = u["params"].requires_grad_()
        p.grad = u["grads"]
        u["grads"] = p.grad
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            if no_grad:
                with torch.no_grad():
                    run(ops.component_adamw_, [u], 0.1)
            else:
                run(ops.component_adamw_, [u], 0.1)
        assert p.is_leaf and p.requires_grad and p.grad_fn is None
        torch.testing.assert_close(p.detach(), want[0]["params"], rtol=TOL[f32][0], atol=TOL[f32][1])


def test_empty_lists():
    ops.component_adamw_([], [], [], [], [], [], 1e-3, 0.9, 0.999, 1e-8, 0.0, [])  # nothing to do, no error


def test_kernels_registered():
    """build_info() lists the op, so test_build checks its kernels; checked here alike."""
    assert "component_adamw_" in pefttorch.build_info()["ops"]
    assert torch._C._dispatch_has_kernel_for_dispatch_key("pefttorch::component_adamw_", "CPU")
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("pefttorch::component_adamw_", "CUDA")
    assert has_cuda == pefttorch.build_info()["cuda"]


# ==================================================================================================
# opcheck, torch.compile


def op_args(tensors, weight_decay=0.1):
    lists = [[t[k] for t in tensors] for k in KEYS]
    return (*lists, HYPER["lr"], HYPER["beta1"], HYPER["beta2"], HYPER["eps"], weight_decay,
            [t["warmup"] for t in tensors])


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for dtype in DTYPES:
        tensors = [tensor(3, 17, 2, dtype, device, warmup=4.0, layout="strided"), tensor(17, 3, 0, dtype, device),
                   tensor(9, 11, 9, dtype, device, layout="transposed")]
        torch.library.opcheck(_ops.component_adamw_.default, op_args(tensors))
    torch.library.opcheck(_ops.component_adamw_.default, op_args([tensor(1, 1, 1, f32, device)], 0.0))


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    torch._dynamo.reset()
    tensors = [tensor(17, 3, 9, f32, device, warmup=3.0), tensor(5, 11, 5, f32, device)]
    eager, compiled_in = clone(tensors), clone(tensors)

    def f(params, grads, exp_avgs, exp_avg_sqs, steps):
        # the gradients as a training step would have them: computed in the graph
        ops.component_adamw_(params, [g * 2 for g in grads], exp_avgs, exp_avg_sqs, steps, [9, 5], 1e-2, 0.9, 0.999,
                             1e-8, 0.1, [3.0, 0.0])

    compiled = torch.compile(f, fullgraph=True)
    f(*[[t[k] for t in eager] for k in KEYS[:5]])
    compiled(*[[t[k] for t in compiled_in] for k in KEYS[:5]])
    for a, b in zip(compiled_in, eager, strict=True):
        for k in ("params", "exp_avgs", "exp_avg_sqs"):
            torch.testing.assert_close(a[k], b[k])


# ==================================================================================================
# errors


def good(**over):
    """Two valid tensors' op arguments (the twelve of the schema) as a dict, with the entries in `over` replaced;
    `over` values that are callables get the entry and return the replacement."""
    ts = [tensor(5, 7, 5, f32, "cpu"), tensor(6, 9, 3, f32, "cpu", warmup=10.0, layout="transposed")]
    names = [*KEYS, "lr", "beta1", "beta2", "eps", "weight_decay", "warmup"]
    args = dict(zip(names, op_args(ts), strict=True))
    for k, v in over.items():
        args[k] = v(args[k]) if callable(v) else v
    return args.values()


def at(i, value):
    """Replaces entry i of a list."""
    return lambda lst: [value if j == i else x for j, x in enumerate(lst)]


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(grads=lambda v: v[:1]), r"component_adamw_: every list must have one entry per tensor: params has 2 but "
                                      r"grads has 1"),
        (dict(rows=lambda v: [*v, 1]), r"params has 2 but rows has 3"),
        (dict(warmup=[]), r"params has 2 but warmup has 0"),
        (dict(steps=lambda v: v[1:]), r"params has 2 but steps has 1"),
        (dict(params=[]), r"params has 0 but grads has 2"),
        (dict(lr=float("nan")), r"component_adamw_: lr must be finite, got nan"),
        (dict(eps=float("inf")), r"eps must be finite, got inf"),
        (dict(weight_decay=float("-inf")), r"weight_decay must be finite, got -inf"),
        (dict(beta1=float("nan")), r"beta1 must be finite, got nan"),
        (dict(beta2=1.0), r"component_adamw_: beta2 must be in \[0, 1\), got 1"),
        (dict(beta1=-0.1), r"beta1 must be in \[0, 1\), got -0.1"),
        (dict(params=at(1, torch.randn(6, 9, 1))), r"component_adamw_: params\[1\] must be 2-D, got shape \[6, 9, 1\]"),
        (dict(params=at(0, torch.randn(35))), r"params\[0\] must be 2-D, got shape \[35\]"),
        (dict(grads=at(0, torch.randn(7, 5))), r"grads\[0\] must have the shape of params\[0\] \[5, 7\], got \[7, 5\]"),
        (dict(exp_avg_sqs=at(1, torch.rand(6, 8))), r"exp_avg_sqs\[1\] must have the shape of params\[1\] \[6, 9\]"),
        (dict(exp_avgs=at(0, torch.randn(5, 7, 1))), r"exp_avgs\[0\] must have the shape of params\[0\]"),
        (dict(params=at(0, torch.ones(5, 7, dtype=torch.int32))), r"params\[0\] has unsupported dtype Int"),
        (dict(exp_avgs=at(1, torch.ones(6, 9, dtype=torch.bool))), r"exp_avgs\[1\] has unsupported dtype Bool"),
        (dict(grads=at(1, torch.randn(6, 9, dtype=bf16))),
         r"grads\[1\] has dtype BFloat16 but params\[0\] has Float; params, grads, exp_avgs and exp_avg_sqs of all "
         r"tensors must share one dtype: call the op once per dtype"),
        (dict(params=lambda v: [v[0], v[1].double()], grads=lambda v: [v[0], v[1].double()],
              exp_avgs=lambda v: [v[0], v[1].double()], exp_avg_sqs=lambda v: [v[0], v[1].double()]),
         r"params\[1\] has dtype Double but params\[0\] has Float"),
        (dict(params=at(0, torch.randn(7, 5).t())),
         r"params\[0\] must be contiguous \(the optimizer allocates parameters and states so\), got strides \[1, 5\]"),
        (dict(exp_avgs=at(1, torch.randn(6, 18)[:, ::2])), r"exp_avgs\[1\] must be contiguous"),
        (dict(exp_avg_sqs=at(0, torch.rand(7, 5).t())), r"exp_avg_sqs\[0\] must be contiguous"),
        (dict(steps=at(0, torch.ones(5, dtype=f64))), r"steps\[0\] must be float32, got Double"),
        (dict(steps=at(1, torch.ones(6, 1))), r"steps\[1\] must be 1-D, got shape \[6, 1\]"),
        (dict(steps=at(0, torch.ones(4))),
         r"steps\[0\] must have at least rows\[0\] = 5 entries \(one step count per updated row\), got 4"),
        (dict(rows=at(1, -1)), r"rows\[1\] must be in \[0, params\[1\].size\(0\)\] = \[0, 6\], got -1"),
        (dict(rows=at(0, 6)), r"rows\[0\] must be in \[0, params\[0\].size\(0\)\] = \[0, 5\], got 6"),
        (dict(warmup=at(0, -1.0)), r"warmup\[0\] must be finite and >= 0 \(0: no warmup\), got -1"),
        (dict(warmup=at(1, float("inf"))), r"warmup\[1\] must be finite and >= 0 \(0: no warmup\), got inf"),
        (dict(warmup=at(1, float("nan"))), r"warmup\[1\] must be finite and >= 0"),
    ],
    ids=lambda v: ",".join(v) if isinstance(v, dict) else None,
)
def test_bad_input(over, match):
    args = list(good(**over))
    before = [t.clone() for t in args[0]]
    with pytest.raises(RuntimeError, match=match):
        ops.component_adamw_(*args)
    # every check comes before any update: a rejected call changes nothing
    assert all(torch.equal(a, b) for a, b in zip(args[0], before, strict=False))


def _sharing(case):
    """good()'s arguments with tensor 0's memory shared between two of (params, grads, exp_avgs, exp_avg_sqs)."""
    args = list(good())
    p, g, m, v = (lst[0] for lst in args[:4])
    if case == "grad is the state":
        g = m
    elif case == "grad is a view of the parameter":
        g = p[:1].expand_as(p)  # broadcast: no simple overlap status, the same storage
    elif case == "states overlap":
        buf = torch.zeros(p.numel() + p.shape[1])
        m, v = buf[: p.numel()].view(p.shape), buf[p.shape[1]:].view(p.shape)
    elif case == "parameter is its state":
        v = p
    for k, t in enumerate((p, g, m, v)):
        args[k] = [t, *args[k][1:]]
    return args


@pytest.mark.parametrize("case, names", [
    ("grad is the state", r"grads\[0\] and exp_avgs\[0\]"),
    ("grad is a view of the parameter", r"grads\[0\] and params\[0\]"),
    ("states overlap", r"exp_avgs\[0\] and exp_avg_sqs\[0\]"),
    ("parameter is its state", r"params\[0\] and exp_avg_sqs\[0\]"),
])
def test_shared_memory_is_refused(case, names):
    """The kernel reads the gradient and writes the parameter and its states element by element: a gradient that
    is (a view of) one of them was once read after being updated, and gave a wrong step without an error."""
    args = _sharing(case)
    before = [t.clone() for t in (*args[0], *args[2], *args[3])]
    with pytest.raises(RuntimeError, match=rf"component_adamw_: {names} share memory"):
        ops.component_adamw_(*args)
    assert all(torch.equal(a, b) for a, b in zip((*args[0], *args[2], *args[3]), before, strict=True))


def test_step_bumps_the_version_counters():
    """As any in-place update does: a graph that saved a parameter before the step refuses to backward after it,
    where it once computed with the updated values, silently."""
    args = list(good())
    p = args[0][0].requires_grad_()
    y = (p * p).sum()
    versions = [t._version for t in args[0]]
    ops.component_adamw_(*args)
    assert all(t._version > v for t, v in zip(args[0], versions, strict=True))
    with pytest.raises(RuntimeError, match=r"modified by an inplace operation"):
        y.backward()


def test_bad_input_empty_op_call():
    """The op itself (not the wrapper) on empty lists: with no tensor, the dispatcher has no device to pick a kernel
    by, and says so before any kernel runs (the op's own check is for callers that bypass the dispatcher)."""
    with pytest.raises(RuntimeError, match=r"There were no tensor arguments to this function"):
        _ops.component_adamw_([], [], [], [], [], [], 1e-3, 0.9, 0.999, 1e-8, 0.0, [])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_device_mismatch():
    with pytest.raises(RuntimeError, match=r"component_adamw_: params\[1\] is on cuda:0 but params\[0\] is on cpu"):
        ops.component_adamw_(*good(params=lambda v: [v[0], v[1].cuda()]))
    with pytest.raises(RuntimeError, match=r"component_adamw_: grads\[0\] is on cpu but params\[0\] is on cuda:0"):
        ops.component_adamw_(*good(params=lambda v: [t.cuda() for t in v]))
    to_cuda = lambda lst: [t.cuda() for t in lst]  # noqa: E731
    with pytest.raises(RuntimeError, match=r"component_adamw_: steps\[1\] is on cpu but params\[0\] is on cuda:0"):
        ops.component_adamw_(*good(params=to_cuda, grads=to_cuda, exp_avgs=to_cuda, exp_avg_sqs=to_cuda,
                                   steps=lambda v: [v[0].cuda(), v[1]]))
