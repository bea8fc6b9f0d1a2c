"""torch.library.opcheck on every op: schema, fake kernel, autograd registration, AOT dispatch."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICES, rand

import pefttorch  # noqa: F401  (registers the ops)


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask", [[True] * 5, [True, False, True, True, False], [False, True, False, False, True]],
                         ids=str)
def test_opcheck_backward(device, mask):
    x, w, a, b = rand(2, 3, 12, device=device), rand(7, 12, device=device), rand(3, 12, device=device), rand(
        7, 3, device=device)
    s = rand(6, 3, device=device)
    gy = rand(2, 3, 7, device=device)
    for p in (0.0, 0.25):
        seed = torch.tensor(3) if p > 0 else None
        torch.library.opcheck(torch.ops.pefttorch.lora_linear_backward.default,
                              (gy, x, w, a, b, s, 0.5, p, seed, mask))


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
