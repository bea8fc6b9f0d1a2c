"""Timing and memory measurement on CPU and CUDA, the same way for every implementation."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, repeat: int = 50, warmup: int = 10) -> float:
    """Median time of fn() in milliseconds.

    CUDA: CUDA events around each call, after `warmup` calls (module load, cuBLAS handles and
    autotuning stay out), median of `repeat`. CPU: torch.utils.benchmark's blocked_autorange, which
    picks the number of calls per measurement itself.
    """
    if device.type == "cuda":
        for _ in range(warmup):
            fn()
        sync(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
        for start, end in zip(starts, ends, strict=True):
            start.record()
            fn()
            end.record()
        sync(device)
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))
    import logging

    # torch.utils.benchmark loads cpp_extension, which logs a CUDA_HOME guess on GPU-less machines
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import benchmark

    fn()  # warm-up
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=max(0.2, repeat / 100)).median * 1e3


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak CUDA memory allocated during fn() above what was allocated before it (None on CPU)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - before
