#!/usr/bin/env python
"""Where a training step's GPU time goes: the kernels of one `pefttorch bench model` run, by total time.

Builds the model suite's Llama-style model for each named run (full, pefttorch, peft, meft1, ...; see
pefttorch/bench/model.py; also the rank suite's lora, increlora and adalora, with their allocation calls), takes a few
warm-up steps, profiles two more with torch.profiler and prints how much of the step the GPU was busy (well
below 100%: the GPU waits on the host or on a synchronisation) and the top kernels, so the gap between a run and
its bound can be traced to the kernels that make it, or to the host.

    python bench/profile_step.py full pefttorch increlora --rows 15
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import pefttorch
from pefttorch.bench import model as bench_model
from pefttorch.bench import rank as bench_rank

WARMUP, PROFILED = 3, 2


def profile_run(run: str, rows: int, dropout: float) -> None:
    device, shape = torch.device("cuda"), bench_model.GPU_SHAPE
    update, first = None, 1
    if run in ("lora", "increlora", "adalora"):  # the rank suite's runs (lora: its r = 8 bound), with allocation
        p = bench_rank.plan(WARMUP, PROFILED)
        model, opt, _, update = bench_rank._make(run, shape, torch.bfloat16, device, 8, dropout, p,
                                                 bench_rank.count_modules(shape))
        first = p.offset + 1
    else:
        model = bench_model._make(run, shape, torch.bfloat16, device, 16, dropout, None)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    batches = bench_model.make_batches(shape, WARMUP + PROFILED, device)

    def step(i, ids):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        if update is not None:
            update(first + i)
        opt.zero_grad(set_to_none=True)

    for i, ids in enumerate(batches[:WARMUP]):
        step(i, ids)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for i, ids in enumerate(batches[WARMUP:], start=WARMUP):
            step(i, ids)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) * 1e3 / PROFILED
    busy = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3 / PROFILED
    # Kernels' time against the steps' wall time: well below 1, the GPU waits (on the host issuing the step, or on
    # a synchronisation), and a faster kernel will not shorten the step.
    print(f"== {run}: GPU busy {busy:.1f} ms of {wall:.1f} ms per step ({busy / wall:.0%}; profiled, so the host "
          f"is slower than unprofiled)")
    print(f"== {run}: two steps, kernels by total GPU time")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="runs of the model suite, e.g. full pefttorch meft1")
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--dropout", type=float, default=0.0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_step.py profiles GPU kernels: no CUDA device here")
    for run in args.runs:
        profile_run(run, args.rows, args.dropout)
        if run.endswith("+fused"):  # fuse_rotary switches a module-level function: not for the runs after
            pefttorch.unfuse_rotary()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
