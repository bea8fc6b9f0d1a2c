"""`python bench/bench_model.py`: the whole-model training-step benchmark from the command line."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import model, report
from .cli_lora import DTYPES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Training step of a Llama-style model: full fine-tuning vs LoRA.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="runs:\n" + "\n".join(f"  {k:16} {v}" for k, v in model.RUN_HELP.items()))
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--runs", default=",".join(model.RUNS), help="comma-separated subset of the runs")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (0: losses are cross-checked)")
    p.add_argument("--small", action="store_true", help="the CPU-sized model even on a GPU")
    p.add_argument("--json", type=Path, default=Path("build/bench/model.json"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from rich.console import Console
    from rich.table import Table
    from tqdm import tqdm

    console = Console()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        console.print("[red]--device cuda but no CUDA device is available[/red]")
        return 2
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    shape = model.CPU_SHAPE if (device.type == "cpu" or args.small) else model.GPU_SHAPE
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = set(runs) - set(model.RUNS)
    if unknown:
        console.print(f"[red]unknown runs {sorted(unknown)}; known: {', '.join(model.RUNS)}[/red]")
        return 2
    try:
        import peft  # noqa: F401
    except ImportError:
        console.print("HF PEFT is not installed (pip install peft): its runs are skipped")
        runs = [r for r in runs if not r.startswith("peft+") and r != "peft"]
    # the first LoRA run's initial adapter weights are the start of every other LoRA run
    results, adapter_state = [], None
    for run in tqdm(runs, desc="model bench", unit="run"):
        try:
            result, initial = model.run_one(run, shape, dtype, device, args.steps, args.warmup, args.r, args.dropout,
                                            adapter_state)
        except torch.OutOfMemoryError as err:
            result, initial = model.RunResult(run, ok=False, note=f"out of memory: {err}"), None
        model.release(device)
        adapter_state = adapter_state or initial
        results.append(result)
    model.compare(results, dtype, check_losses=args.dropout == 0.0)
    targets = model.check_targets(results)
    meta = report.metadata(device, dtype) | {"model": shape.label, "r": args.r, "dropout": args.dropout,
                                             "steps": args.steps}
    table = Table(title=f"training step, {shape.label}, {meta['dtype']} on {meta['device']}, LoRA r={args.r} "
                        f"all-linear, AdamW (torch {meta['torch']})", title_justify="left")
    for col in ("run", "step ms", "/ full", "/ peft", "tokens/s", "peak GiB", "trainable", "ok"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for r in results:
        fmt = (lambda v, f: "-" if v is None else format(v, f))  # noqa: E731
        table.add_row(r.run, fmt(r.step_ms, ".1f"), fmt(r.ratio_to_full, ".2f"), fmt(r.ratio_to_peft, ".2f"),
                      fmt(r.tokens_per_s, ",.0f"), fmt(r.peak_gib, ".2f"), fmt(r.trainable, ",d"),
                      "yes" if r.ok else f"[red]no: {r.note}[/red]")
    if console.width < 140:
        console.width = 140
    console.print(table)
    for target, met, measured in targets:
        console.print(f"target {'[green]met[/green]' if met else '[red]missed[/red]'}: {target} ({measured})")
    report.write_json(args.json, meta, model.as_dicts(results), targets)
    console.print(f"results: {args.json}")
    return 0 if all(r.ok for r in results) else 1
