#!/usr/bin/env python
"""Host time of a training step: the rank and model suites' runs on a tiny model, on the CPU.

With hidden 64 the arithmetic is negligible, so a step's time is what the host spends issuing it: Python,
autograd, the dispatcher. On a GPU that cost runs beside the kernels and is hidden while it is shorter than
them; a run whose host time per step exceeds the GPU time of the step waits on the host instead (on the H200,
IncreLoRA's steps took 1.15-1.4x LoRA's where its extra arithmetic is about 1%). This measures it without a GPU.
Runs with torch's AdamW use its foreach form (what a CUDA run gets by default), so the optimizer's host cost
compares like with like; 'lora' (rank suite, r = 8) is the reference of the ratios. Phases (forward, backward,
optimizer, allocation call) are timed separately; IncreLoRA and AdaLoRA are reported while allocating and after
their budget is final. Median over the steps; best of `--repeats` runs for the times (a shared machine's noise
only adds time), median over the repeats for the ratios, each taken to LoRA in the same repeat.

    python bench/host_overhead.py lora increlora adalora
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

from pefttorch._args import nonnegative_int, positive_int
from pefttorch.bench import model as bench_model
from pefttorch.bench import rank as bench_rank
from pefttorch.bench.model import ModelShape, make_batches

SHAPE = ModelShape(hidden=64, layers=16, mlp=160, vocab=256, heads=4, batch=1, seq=8)  # 16 layers as on the GPU
PHASES = ("fwd", "bwd", "opt", "alloc")


def measure(run: str, warmup: int, steps: int) -> dict[str, dict[str, float]]:
    """{phase of the schedule: {part of the step: median ms}} of one run."""
    device = torch.device("cpu")
    p = bench_rank.plan(warmup, steps)
    if run in bench_rank.RUNS:
        net, opt, _, update = bench_rank._make(run, SHAPE, torch.float32, device, 8, 0.0, p,
                                               bench_rank.count_modules(SHAPE))
    else:  # a run of the model or meft suite
        net, opt, update = bench_model._make(run, SHAPE, torch.float32, device, 16, 0.0, None), None, None
    if opt is None or run == "lora":
        opt = torch.optim.AdamW([q for q in net.parameters() if q.requires_grad], lr=bench_rank.LR, foreach=True)
    net.train()
    times: dict[str, list[list[float]]] = {}
    for i, ids in enumerate(make_batches(SHAPE, p.warmup + p.steps, device)):
        allocator = getattr(net, "allocator", None)
        phase = "final" if allocator is None or allocator.finished else "allocating"
        t = [time.perf_counter()]
        loss = net(input_ids=ids, labels=ids).loss
        t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        opt.step()
        t.append(time.perf_counter())
        if update is not None:
            update(p.offset + 1 + i)
        t.append(time.perf_counter())
        opt.zero_grad(set_to_none=True)
        if i >= p.warmup:
            times.setdefault(phase, []).append([(b - a) * 1e3 for a, b in itertools.pairwise(t)])
    out = {}
    for phase, rows in times.items():
        parts = {k: statistics.median(r[j] for r in rows) for j, k in enumerate(PHASES)}
        parts["step"] = statistics.median(sum(r) for r in rows)
        parts["steps"] = len(rows)
        out[phase] = parts
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    known = list(dict.fromkeys(bench_rank.RUNS + bench_model.RUNS + bench_model.MEFT_RUNS))
    # checked here, not by argparse's choices: with nargs="*" it checks the default list as one value, and refused it
    parser.add_argument("runs", nargs="*", metavar="RUN",
                        help=f"runs of the rank suite ({', '.join(bench_rank.RUNS)}) or of the model and meft "
                             f"suites ({', '.join(dict.fromkeys(bench_model.RUNS + bench_model.MEFT_RUNS))}); "
                             f"default: lora increlora adalora")
    parser.add_argument("--steps", type=positive_int, default=40)
    parser.add_argument("--warmup", type=nonnegative_int, default=10)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--threads", type=positive_int, default=1)
    args = parser.parse_args()
    args.runs = args.runs or ["lora", "increlora", "adalora"]
    unknown = [r for r in args.runs if r not in known]
    if unknown:
        parser.error(f"unknown runs {unknown}; known: {', '.join(known)}")
    torch.set_num_threads(args.threads)
    best: dict[tuple[str, str], dict[str, float]] = {}
    ratios: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):  # interleaved, so drift in the machine's speed hits every run alike
        measured = {(run, phase): parts for run in args.runs for phase, parts in measure(run, args.warmup,
                                                                                        args.steps).items()}
        for key, parts in measured.items():
            if key not in best or parts["step"] < best[key]["step"]:
                best[key] = parts
            if ("lora", "final") in measured:
                ratios.setdefault(key, []).append(parts["step"] / measured[("lora", "final")]["step"])
    print(f"host ms per step, {SHAPE.layers} layers, hidden {SHAPE.hidden}: best of {args.repeats} medians; "
          f"'/ lora' is the median over the repeats of the ratio to LoRA measured in the same repeat")
    print(f"{'run':14s} {'phase':11s} {'steps':>5s} {'step':>7s} " + " ".join(f"{k:>7s}" for k in PHASES)
          + ("   / lora" if ratios else ""))
    for (run, phase), parts in best.items():
        ratio = f"   {statistics.median(ratios[(run, phase)]):5.2f}x" if ratios else ""
        print(f"{run:14s} {phase:11s} {parts['steps']:5d} {parts['step']:7.2f} "
              + " ".join(f"{parts[k]:7.2f}" for k in PHASES) + ratio)


if __name__ == "__main__":
    main()
