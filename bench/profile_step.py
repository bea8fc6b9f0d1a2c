#!/usr/bin/env python
"""Where a training step's GPU time goes: the kernels of one `pefttorch bench model` run, by total time.

Builds the model suite's Llama-style model for each named run (full, pefttorch, peft, meft1, ...; see
pefttorch/bench/model.py), takes a few warm-up steps, profiles two more with torch.profiler and prints the top
kernels of each, so the gap between a run and its bound can be traced to the kernels that make it.

    python bench/profile_step.py full pefttorch --rows 15
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from pefttorch.bench import model as bench_model


def profile_run(run: str, rows: int, dropout: float) -> None:
    device, shape = torch.device("cuda"), bench_model.GPU_SHAPE
    model = bench_model._make(run, shape, torch.bfloat16, device, 16, dropout, None)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    batches = bench_model.make_batches(shape, 5, device)

    def step(ids):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for ids in batches[:3]:
        step(ids)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for ids in batches[3:]:
            step(ids)
        torch.cuda.synchronize()
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
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
