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
