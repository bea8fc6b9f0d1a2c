"""Shared test helpers: devices, dtypes, random data, and error bounds against a float64 oracle."""

from __future__ import annotations

import pytest
import torch

from pefttorch.testing import check_accuracy

HAS_CUDA = torch.cuda.is_available()

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")]),
]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

def rand(*shape, dtype=torch.float32, device="cpu", requires_grad=False, scale=1.0) -> torch.Tensor:
    """Fresh random normal data (never zeros: zeros hide unwritten outputs)."""
    t = torch.randn(*shape, dtype=torch.float32, device=device) * scale
    return t.to(dtype).requires_grad_(requires_grad)


def assert_close_to_oracle(name: str, out: torch.Tensor, baseline: torch.Tensor, oracle: torch.Tensor,
                           factor: float = 3.0) -> None:
    """`out`'s error against a float64 `oracle` is at most `factor` times that of a plain PyTorch
    computation in the same dtype (`baseline`): see pefttorch.testing.check_accuracy."""
    assert out.shape == oracle.shape, f"{name}: shape {tuple(out.shape)} != {tuple(oracle.shape)}"
    assert out.dtype == baseline.dtype, f"{name}: dtype {out.dtype} != {baseline.dtype}"
    acc = check_accuracy(out, baseline, oracle, factor)
    assert acc.ok, f"{name} ({out.dtype}): {acc}"


def run_in_threads(run, keys) -> None:
    """`run(key)` for each key, each in a thread of its own (named by the key), all started, then all joined."""
    import threading

    threads = [threading.Thread(target=run, args=(k,), name=k) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
