"""Benchmark output: the run's metadata, a table, JSON, a plot."""

from __future__ import annotations

import datetime as _dt
import importlib
import os
import platform
import subprocess
from pathlib import Path

import torch


def metadata(device: torch.device, dtype: torch.dtype) -> dict:
    import pefttorch

    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "device_type": device.type,
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "pefttorch": pefttorch.__version__,
        "build": pefttorch.build_info(),
        "commit": os.environ.get("PEFTTORCH_COMMIT") or _git_commit(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        meta["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    for peer in ("peft", "transformers"):
        try:
            meta[peer] = importlib.import_module(peer).__version__
        except ImportError:
            meta[peer] = None
    return meta


def cpu_name() -> str:
    """The CPU's model name (platform.processor() is empty on Linux: the results said just "cpu")."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _git_commit() -> str | None:
    """The checkout's short hash, "-dirty" when tracked files changed; None outside a git checkout. PEFTTORCH_COMMIT,
    when set, wins (metadata()): the GPU machine's copy of the tree carries a stale .git, so bench/gpu_session.sh's
    caller passes the hash."""
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        top, commit = out.stdout.split()
        if Path(top).resolve() != root:
            # an installed copy (site-packages) inside some other checkout, e.g. a venv in a project's tree: that
            # checkout's commit is not pefttorch's
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return commit + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _fmt_ms(row: dict | None) -> str:
    if row is None or row.get("ms") is None:
        return "-"
    text = f"{row['ms']:.3f}"
    if row.get("ratio_to_base") is not None and row["impl"] != "base":
        text += f" ({row['ratio_to_base']:.2f}x)"
    return text if row.get("ok", True) else f"[red]MISMATCH[/red] {text}"


def print_table(meta: dict, rows: list[dict], impls: list[str], targets: list, console=None) -> None:
    """One line per shape and mode: ms of each implementation (ratio to the base layer), pefttorch's
    speed-up over HF PEFT, peak memory, tokens/s."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    if console.width < 140:  # piped output defaults to 80 columns, too narrow for this table
        console.width = 140
    table = Table(title=f"LoRA layer, {meta['dtype']} on {meta['device']} (torch {meta['torch']}, "
                        f"pefttorch {meta['pefttorch']}, peft {meta.get('peft') or 'absent'}); ms, median",
                  title_justify="left")
    table.add_column("tokens x in->out, rank, dropout")
    table.add_column("pass")
    relative = any(r.get("ratio_to_base") is not None for r in rows)  # without base: the times alone
    for impl in impls:
        table.add_column(impl + (" (/base)" if relative and impl != "base" else " ms"), justify="right")
    table.add_column("pefttorch speed-up vs peft", justify="right")
    table.add_column("peak MiB base/peft/ours", justify="right")
    table.add_column("ours Mtok/s", justify="right")
    by = {(r["shape"], r["mode"], r["impl"]): r for r in rows}
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for mode in ("fwd", "fwd+bwd"):
            cells = [_fmt_ms(by.get((shape, mode, impl))) for impl in impls]
            ours = by.get((shape, mode, "pefttorch"))
            speed = f"{ours['speedup_vs_peft']:.2f}x" if ours and ours.get("speedup_vs_peft") else "-"
            peaks = "/".join(
                f"{by[(shape, mode, i)]['peak_mib']:.0f}"
                if (shape, mode, i) in by and by[(shape, mode, i)]["peak_mib"] is not None else "-"
                for i in ("base", "peft", "pefttorch"))
            tps = f"{ours['tokens_per_s'] / 1e6:.2f}" if ours and ours.get("tokens_per_s") else "-"
            table.add_row(shape, mode, *cells, speed, peaks, tps)
    console.print(table)
    for row in rows:
        if not row.get("ok", True):
            console.print(f"[red]mismatch[/red] {row['impl']} at {row['shape']}: {row['note']}")
    print_targets(targets, console)


def plot(path: Path, meta: dict, rows: list[dict], impls: list[str]) -> None:
    """Ratio to the base layer per shape, one bar per implementation, forward and forward+backward; the time itself
    where the base layer was not run (the ratios' plot was empty)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    by = {(r["shape"], r["mode"], r["impl"]): r for r in rows}
    relative = any(r.get("ratio_to_base") is not None for r in rows)
    key = "ratio_to_base" if relative else "ms"
    shown = [i for i in impls if i != "base"]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.1 * len(shapes) * len(shown) / 2), 8), sharex=True)
    width = 0.8 / max(1, len(shown))
    for ax, mode in zip(axes, ("fwd", "fwd+bwd"), strict=True):
        for k, impl in enumerate(shown):
            xs, ys, bad = [], [], []
            for s, shape in enumerate(shapes):
                r = by.get((shape, mode, impl))
                if r and r.get(key) is not None:
                    xs.append(s + (k - (len(shown) - 1) / 2) * width)
                    ys.append(r[key])
                    bad.append(not r.get("ok", True))
            bars = ax.bar(xs, ys, width, label=impl)
            for bar, b in zip(bars, bad, strict=True):
                if b:
                    bar.set_hatch("xx")
                    bar.set_edgecolor("red")
        if relative:
            ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel(f"{mode}: time / base layer" if relative else f"{mode}: ms")
        ax.grid(axis="y", alpha=0.3)
    if shown:  # --impls base alone: nothing but the base line to show
        axes[0].legend(ncol=len(shown), fontsize=8)
    axes[0].set_title(f"LoRA layer, {meta['dtype']} on {meta['device']}\ntorch {meta['torch']}, "
                      f"commit {meta.get('commit')}; lower is better, hatched = mismatch", fontsize=9)
    axes[1].set_xticks(range(len(shapes)), shapes, rotation=30, ha="right", fontsize=8)
    save_figure(fig, path)


def print_model_table(meta: dict, title: str, rows: list[dict], targets: list, console=None) -> None:
    """One line per run: step time, ratios to full fine-tuning, to HF PEFT and to pefttorch LoRA (the columns
    whose run is there), tokens/s, peak memory, trainable parameters, MEFT's reconstruction error, the check."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"training step, {title}, {meta['dtype']} on {meta['device']} (torch {meta['torch']}, "
                        f"peft {meta.get('peft') or 'absent'}); {peak_label(meta)}", title_justify="left")
    runs = {row["run"] for row in rows}
    columns = [("run", None, None), ("step ms", "step_ms", ".1f"), ("/ full", "ratio_to_full", ".2f"),
               ("/ peft", "ratio_to_peft", ".2f"), ("/ pefttorch", "ratio_to_lora", ".2f"),
               ("tokens/s", "tokens_per_s", ",.0f"), ("peak MiB", "peak_mib", ",.1f"), ("trainable", "trainable", ",d"),
               ("recon. error", "reconstruction_error", ".1e"), ("check", None, None)]
    shown = [c for c in columns if not (c[1] == "ratio_to_full" and "full" not in runs
                                        or c[1] == "ratio_to_peft" and "peft" not in runs
                                        or c[1] == "ratio_to_lora" and "pefttorch" not in runs
                                        or c[1] == "reconstruction_error" and all(r.get(c[1]) is None for r in rows))]
    for name, _, _ in shown:
        table.add_column(name, justify="left" if name == "run" else "right")

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    for row in rows:
        check = "ok" if row["ok"] else f"[red]{row['note']}[/red]"
        row = {**row, "peak_mib": None if row.get("peak_gib") is None else row["peak_gib"] * 1024}
        table.add_row(*(row["run"] if name == "run" else check if name == "check" else fmt(row.get(key), spec)
                        for name, key, spec in shown))
    console.print(table)
    print_targets(targets, console)


def peak_label(meta: dict) -> str:
    if meta.get("device_type") == "cuda":
        return "peak: torch.cuda.max_memory_allocated"
    return "peak: tensors alive in one untimed step"


def plot_model(path: Path, meta: dict, rows: list[dict], _impls=None) -> None:
    """Step time relative to full fine-tuning (the time itself where full fine-tuning did not run: every bar was 0)
    and peak memory of each run; flagged runs hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in rows if r.get("step_ms")]
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 1.4 * len(runs)), 4))
    names = [r["run"] for r in runs]
    colours = ["grey" if r["run"].startswith("full") else "C0" for r in runs]
    if all(r.get("ratio_to_full") is not None for r in runs):
        bars = [axes[0].bar(names, [r["ratio_to_full"] for r in runs], color=colours)]
        axes[0].axhline(1.0, color="black", linewidth=0.8)
        axes[0].set_ylabel("step time / full fine-tuning")
    else:
        bars = [axes[0].bar(names, [r["step_ms"] for r in runs], color=colours)]
        axes[0].set_ylabel("step ms")
    if all(r.get("peak_gib") is not None for r in runs):
        bars.append(axes[1].bar(names, [r["peak_gib"] for r in runs],
                                color=["grey" if r["run"].startswith("full") else "C1" for r in runs]))
        axes[1].set_ylabel("peak GiB" + ("" if meta.get("device_type") == "cuda" else " (tensors alive)"))
    else:
        axes[1].text(0.5, 0.5, "peak memory not measured", ha="center", va="center")
        axes[1].set_axis_off()
    for group in bars:
        for bar, r in zip(group, runs, strict=True):
            if not r.get("ok", True):
                bar.set_hatch("xx")
                bar.set_edgecolor("red")
    for ax in axes:
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(f"training step on {meta['device']} ({meta['dtype']}), torch {meta['torch']}, "
                 f"commit {meta.get('commit')}; hatched = flagged", fontsize=9)
    save_figure(fig, path)


def print_targets(targets: list, console) -> None:
    for target, met, measured in targets:
        console.print(f"target {'[green]met[/green]' if met else '[red]missed[/red]'}: {target} ({measured})")


def save_figure(fig, path: Path) -> None:
    """Writes a benchmark plot (creating its folder) and frees the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
