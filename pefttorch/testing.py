"""Accuracy checks shared by the test suite and the benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Absolute slack on top of the relative bound, per dtype (relative to the largest |oracle| value, or
# 1): covers outputs whose plain low-precision error happens to be ~0 on tiny problems.
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@dataclass
class Accuracy:
    ok: bool
    error: float  # max |out - oracle|
    bound: float  # factor * max |baseline - oracle| + slack
    baseline_error: float

    def __str__(self) -> str:
        return f"max error {self.error:.3g} {'<=' if self.ok else '>'} bound {self.bound:.3g} " \
               f"(plain computation's error {self.baseline_error:.3g})"


def check_accuracy(out: torch.Tensor, baseline: torch.Tensor, oracle: torch.Tensor, factor: float = 3.0) -> Accuracy:
    """Bounds the error of `out` by `factor` times the error of a plain PyTorch computation of the same
    thing in the same dtype (`baseline`), both against a higher-precision `oracle`, plus a small slack.

    As strict as the dtype allows: a fixed tolerance would be too loose for small values in bf16 (and
    let bugs through) or impossible in fp32. NaN in `out` never passes.
    """
    if out.shape != oracle.shape or out.dtype != baseline.dtype:
        return Accuracy(False, float("inf"), 0.0, 0.0)
    if out.numel() == 0:
        return Accuracy(True, 0.0, 0.0, 0.0)
    o = oracle.detach().double().cpu()
    err = (out.detach().double().cpu() - o).abs().max().item()
    base = (baseline.detach().double().cpu() - o).abs().max().item()
    bound = factor * base + ATOL[out.dtype] * max(1.0, o.abs().max().item())
    ok = err <= bound and not torch.isnan(out).any().item()
    return Accuracy(ok, err, bound, base)
