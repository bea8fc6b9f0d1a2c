"""Numerical gradients in float64 on the CPU (torch.autograd.gradcheck)."""

from __future__ import annotations

import pytest
import torch

from pefttorch import functional


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(dropout, bias):
    def f(x, w, a, b, bb):
        # a generator seeded the same way on every call: the same dropout mask at every evaluation
        return functional.lora_linear(x, w, a, b, bb, scaling=0.5, dropout=dropout,
                                      generator=torch.Generator().manual_seed(1))

    def t(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    inputs = (t(2, 3, 7), t(5, 7), t(3, 7), t(5, 3), t(5) if bias else None)
    assert torch.autograd.gradcheck(f, inputs)
