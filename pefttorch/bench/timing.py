"""Timing and memory measurement on CPU and CUDA, the same way for every implementation."""

from __future__ import annotations

import statistics
import weakref
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


class LiveTensorBytes:
    """Peak bytes of the tensors alive on one device while a region runs: the CPU's stand-in for
    ``torch.cuda.max_memory_allocated`` (the CPU allocator keeps no such count).

    A dispatch mode sees every tensor an operator returns (our custom ops included) and follows its storage
    until it is freed; `tensors` are the ones already alive at the start (parameters, gradients, optimizer
    state). Temporaries that a C++ kernel allocates and frees inside one operator are not seen, nor is the
    allocator's rounding: this counts tensors, as ``max_memory_allocated`` does, not the process's pages.
    Every operator pays a Python call: measure an untimed step with it, never a timed one.
    """

    def __init__(self, device: torch.device, tensors=()) -> None:
        self.device_type = torch.device(device).type
        self.live: dict[int, int] = {}  # storage address -> bytes, for every storage followed and not yet freed
        self.current = self.peak = 0
        for t in tensors:
            self._follow(t)

    def _follow(self, t) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type != self.device_type:
            return
        storage = t.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self.live:  # views share their base's storage: counted once
            return
        self.live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._freed, key)  # runs when the storage's last reference goes

    def _freed(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __enter__(self) -> LiveTensorBytes:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    tracker._follow(t)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
