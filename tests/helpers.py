"""Shared test helpers: devices, dtypes, random data, and error bounds against a float64 oracle."""

from __future__ import annotations

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")]),
]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# Absolute slack on top of the relative bound, per dtype: covers outputs whose plain low-precision
# error happens to be ~0 on tiny problems.
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def rand(*shape, dtype=torch.float32, device="cpu", requires_grad=False, scale=1.0) -> torch.Tensor:
    """Fresh random normal data (never zeros: zeros hide unwritten outputs)."""
    t = torch.randn(*shape, dtype=torch.float32, device=device) * scale
    return t.to(dtype).requires_grad_(requires_grad)


def assert_close_to_oracle(name: str, out: torch.Tensor, baseline: torch.Tensor, oracle: torch.Tensor,
                           factor: float = 3.0) -> None:
    """Bounds the error of `out` by `factor` times the error of a plain PyTorch computation in the
    same dtype (`baseline`), both measured against a float64 `oracle`, plus a small absolute slack.

    This is the flash-attention style of test: it is as strict as the dtype allows, neither looser
    (a fixed rtol for bf16 would let real bugs through on small values) nor impossible.
    """
    assert out.shape == oracle.shape, f"{name}: shape {tuple(out.shape)} != {tuple(oracle.shape)}"
    assert out.dtype == baseline.dtype, f"{name}: dtype {out.dtype} != {baseline.dtype}"
    assert not torch.isnan(out).any(), f"{name}: NaN in output"
    o = oracle.double().cpu()
    err = (out.double().cpu() - o).abs().max().item() if out.numel() else 0.0
    base = (baseline.double().cpu() - o).abs().max().item() if out.numel() else 0.0
    bound = factor * base + ATOL[out.dtype] * max(1.0, o.abs().max().item() if o.numel() else 1.0)
    assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g} (plain {out.dtype} error {base:.3g})"
