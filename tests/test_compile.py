"""torch.compile(fullgraph=True) traces the fused op with no graph break, forward and backward."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICES

from pefttorch.nn import LoRALinear


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_compile_lora_linear_fullgraph(device, dropout):
    torch._dynamo.reset()
    layer = LoRALinear.from_linear(torch.nn.Linear(16, 12).to(device), r=4, lora_alpha=8, lora_dropout=dropout)
    torch.nn.init.normal_(layer.lora_B)  # non-zero, so the low-rank path shows in the output
    x = torch.randn(3, 5, 16, device=device, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="inductor")

    # Inductor's own RNG would draw a different seed than eager: make it use eager's so that the two
    # runs, started from the same torch seed, apply the same dropout mask.
    with torch._inductor.config.patch(fallback_random=True):
        torch.manual_seed(0)
        y_c = compiled(x)
        gx_c, ga_c = torch.autograd.grad(y_c.square().sum(), (x, layer.lora_A))
    torch.manual_seed(0)
    y = layer(x)
    gx, ga = torch.autograd.grad(y.square().sum(), (x, layer.lora_A))
    torch.testing.assert_close(y_c, y)
    torch.testing.assert_close(gx_c, gx)
    torch.testing.assert_close(ga_c, ga)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compile_lora_linear_with_transposed_parameters(device):
    """Gradients of a transposed weight or factor (GPT-2's fan_in_fan_out layout) come out of the op contiguous,
    and the fake kernel must say so: Inductor checks the strides it promises."""
    from pefttorch import functional

    torch._dynamo.reset()
    w = torch.randn(10, 6, device=device, requires_grad=True)  # stored (in, out): the op gets its transpose
    a = torch.randn(3, 10, device=device, requires_grad=True)
    b = torch.randn(6, 3, device=device, requires_grad=True)
    x = torch.randn(4, 10, device=device)

    def f(x, w, a, b):
        return functional.lora_linear(x, w.t(), a, b).square().sum()

    # no cached graph: one compiled against an older fake kernel would carry that kernel's strides
    with torch._inductor.config.patch(force_disable_caches=True):
        grads_c = torch.autograd.grad(torch.compile(f, fullgraph=True)(x, w, a, b), (w, a, b))
    for got, want in zip(grads_c, torch.autograd.grad(f(x, w, a, b), (w, a, b)), strict=True):
        torch.testing.assert_close(got, want)
