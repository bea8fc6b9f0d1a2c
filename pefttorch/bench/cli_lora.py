"""`python bench/bench_lora.py`: the LoRA layer benchmark from the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from . import lora, report

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split(":")[0] if __doc__ else None,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="implementations:\n" + "\n".join(f"  {k:18} {v}" for k, v in
                                                                         lora.IMPL_HELP.items()))
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if present)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--quick", action="store_true", help="two shapes only")
    p.add_argument("--shapes", default=None,
                   help="comma-separated TOKENSxINxOUTrRANK[pDROPOUT], e.g. 8192x4096x4096r16p0.1")
    p.add_argument("--impls", default=",".join(lora.IMPLS), help="comma-separated subset of the implementations")
    p.add_argument("--repeat", type=int, default=50, help="timed calls per measurement on GPU (default 50)")
    p.add_argument("--json", type=Path, default=Path("build/bench/lora.json"), help="where to write the results")
    p.add_argument("--plot", type=Path, default=None, help="PNG plot (default: next to the JSON)")
    p.add_argument("--compare", type=Path, default=None, help="an earlier JSON: print the change per row")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from rich.console import Console
    from tqdm import tqdm

    console = Console()
    if args.device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cpu":
            console.print("no CUDA device: running on the CPU with CPU-sized shapes")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            console.print("[red]--device cuda but no CUDA device is available[/red]")
            return 2
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    shapes = ([lora.Shape.parse(s) for s in args.shapes.split(",")] if args.shapes
              else lora.default_shapes(device, args.quick))
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    unknown = set(impls) - set(lora.IMPLS)
    if unknown:
        console.print(f"[red]unknown implementations {sorted(unknown)}; known: {', '.join(lora.IMPLS)}[/red]")
        return 2
    missing = lora._peft_available()
    if missing and any(i.startswith("peft") for i in impls if i != "pefttorch"):
        console.print(missing)
        impls = [i for i in impls if not i.startswith("peft") or i == "pefttorch"]

    rows: list[lora.Row] = []
    with tqdm(total=len(shapes) * len(impls), desc="lora bench", unit="impl") as bar:
        for shape in shapes:
            rows += lora.run_shape(shape, impls, dtype, device, args.repeat,
                                   progress=lambda text: (bar.set_postfix_str(text), bar.update(0)))
            bar.update(len(impls))
    meta = report.metadata(device, dtype)
    dict_rows = lora.as_dicts(rows)
    targets = lora.check_targets(rows, dtype)
    report.print_table(meta, dict_rows, impls, targets, console)
    report.write_json(args.json, meta, dict_rows, targets)
    plot_path = args.plot or args.json.with_suffix(".png")
    report.plot(plot_path, meta, dict_rows, impls)
    console.print(f"results: {args.json}, plot: {plot_path}")
    if args.compare:
        compare(console, json.loads(args.compare.read_text()), dict_rows)
    return 0 if all(r.ok for r in rows) else 1


def compare(console, old: dict, rows: list[dict]) -> None:
    """Change of each row's time against an earlier run (same shape, pass and implementation)."""
    before = {(r["shape"], r["mode"], r["impl"]): r for r in old.get("rows", [])}
    console.print(f"change against {old.get('meta', {}).get('commit')} ({old.get('meta', {}).get('date')}):")
    for r in rows:
        o = before.get((r["shape"], r["mode"], r["impl"]))
        if o and o.get("ms") and r.get("ms"):
            console.print(f"  {r['shape']:32} {r['mode']:8} {r['impl']:17} {o['ms']:9.3f} -> {r['ms']:9.3f} ms "
                          f"({(r['ms'] / o['ms'] - 1) * 100:+.1f}%)")
