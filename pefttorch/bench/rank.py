"""Rank allocation in a training run: IncreLoRA (grows ranks) and AdaLoRA (prunes them) against pefttorch
LoRA at the final rank (the bound) and against HF PEFT's AdaLoRA, on the model suite's Llama-style model.

The timed steps include the allocation events: the schedules are set so that several of them fall inside
the timed window and the final budget (``target`` per module on average) is reached about 3/4 through
it. Allocation is not free (importance scores, host synchronisation on event steps, optimizer state
following the components), so the mean over all timed steps is what the targets are about; the median
shows the ordinary step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import model as _model
from .model import ModelShape, build_model, make_batches, median, release, time_steps

RUNS = ("lora", "increlora", "adalora", "peft-adalora")
RUN_HELP = {
    "lora": "pefttorch LoRA at r = the target rank, torch AdamW (the bound)",
    "increlora": "pefttorch IncreLoRA from rank 1 to the target average, RankAwareAdamW",
    "adalora": "pefttorch AdaLoRA from 1.5x the target rank down to it, RankAwareAdamW",
    "peft-adalora": "HF PEFT AdaLoRA with the same schedule, torch AdamW",
}
LR = 1e-4


@dataclass(frozen=True)
class Plan:
    """Where the allocation events fall. Global steps run from ``offset + 1`` to ``total``; the last `steps`
    are timed. Events come every `interval` steps after `start` (the end of the warm-up), `events` of them,
    the last one at `end`, where the budget is reached (about 3/4 through the timed steps). The offset
    (< interval) aligns the events with the start of the timed window."""

    warmup: int
    steps: int
    interval: int
    events: int
    offset: int

    @property
    def start(self) -> int:
        return self.offset + self.warmup

    @property
    def end(self) -> int:
        return self.start + self.interval * self.events

    @property
    def total(self) -> int:
        return self.start + self.steps


def plan(warmup: int, steps: int) -> Plan:
    """About five events (more when steps are few), the last one ~3/4 through the `steps` timed steps."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"rank: need at least one timed step and warmup >= 0, got steps={steps}, warmup={warmup}")
    reach = max(1, math.ceil(0.75 * steps))
    interval = max(1, reach // 5)
    return Plan(warmup=warmup, steps=steps, interval=interval, events=reach // interval,
                offset=(-warmup) % interval)


def increlora_kwargs(target: int, modules: int, p: Plan) -> dict:
    """IncreLoRA's schedule for this plan: rank 1 to start, the budget reached at the plan's last event (top_h
    and incre_rank_num set so that `p.events` allocations are needed)."""
    init = 1
    need = (target - init) * modules
    default = max(1, target // 2)  # the config's incre_rank_num
    # rank handed out per event (top_h x incre_rank_num) such that exactly `events` events spend the budget,
    # with incre_rank_num as near the default as that allows
    for incre in sorted(range(1, max(need, 1) + 1), key=lambda i: (abs(i - default), i)):
        top_h = min(modules, max(1, math.ceil(need / (incre * p.events))))
        if top_h * incre * p.events >= need and top_h * incre * (p.events - 1) < need:
            break
    else:  # none fits (too few modules for so many events): the budget is reached earlier
        incre, top_h = default, min(modules, max(1, math.ceil(need / (default * p.events))))
    return dict(target_rank=target, init_rank=init, incre_interval=p.interval, init_warmup=p.start, top_h=top_h,
                incre_rank_num=incre)


def adalora_kwargs(target: int, p: Plan) -> dict:
    """AdaLoRA's schedule (HF PEFT's fields): from 1.5x the target rank, pruning from the end of the warm-up
    every `interval` steps, the final budget from the plan's last event on."""
    return dict(init_r=max(target + 1, round(1.5 * target)), target_r=target, tinit=p.start,
                tfinal=p.total - p.end, deltaT=p.interval, total_step=p.total)


@dataclass
class RankResult:
    run: str
    median_ms: float | None = None
    mean_ms: float | None = None
    tokens_per_s: float | None = None  # at the mean step time
    peak_gib: float | None = None
    trainable: int | None = None  # adapter parameters allocated (spare capacity included)
    modules: int | None = None
    budget: int | None = None  # target rank x modules
    initial_rank: int | None = None  # total over the modules
    final_rank: int | None = None
    events: list = field(default_factory=list)  # [{step, timed_step, total_rank, modules}] of every event
    events_timed: int = 0  # events inside the timed window
    budget_reached_at: int | None = None  # timed step (1-based) from which the budget held; 0: before them
    event_mean_ms: float | None = None  # mean of the timed steps with an event
    quiet_mean_ms: float | None = None  # mean of the other timed steps
    config: dict | None = None
    step_ms: list | None = None  # every timed step
    rank_trace: list | None = None  # total rank after every step (warm-up included)
    losses: list | None = None
    ok: bool = True
    note: str = ""
    mean_ratio_to_lora: float | None = None
    median_ratio_to_lora: float | None = None
    mean_ratio_to_peft: float | None = None
    median_ratio_to_peft: float | None = None


def count_modules(shape: ModelShape) -> int:
    """The modules target_modules="all-linear" adapts (every linear layer but the output head)."""
    import pefttorch
    from pefttorch.tuners.lora.model import plan_targets

    net = build_model(shape, torch.float32, torch.device("meta"))
    return len(plan_targets(net, pefttorch.LoraConfig(target_modules="all-linear")))


def _make(run: str, shape, dtype, device, target: int, dropout: float, p: Plan, modules: int):
    """(model, optimizer, the run's config as a dict, update(step) -> None)."""
    import pefttorch

    common = dict(lora_alpha=2 * target, lora_dropout=dropout, target_modules="all-linear")
    if run == "lora":
        net = _model._make("pefttorch", shape, dtype, device, target, dropout, None)
        params = [q for q in net.parameters() if q.requires_grad]
        return net, torch.optim.AdamW(params, lr=LR), {"r": target, **common}, None
    net = build_model(shape, dtype, device)
    if run == "peft-adalora":
        import peft

        # task_type: PEFT's causal-LM wrapper calls AdaLoraModel.forward, which adds the orthogonal regulariser
        # to the loss (a plain PeftModel calls the transformers model directly and skips it; ours adds it always)
        kwargs = {**adalora_kwargs(target, p), **common, "task_type": "CAUSAL_LM"}
        net = peft.get_peft_model(net, peft.AdaLoraConfig(**kwargs))
        params = [q for q in net.parameters() if q.requires_grad]
        return net, torch.optim.AdamW(params, lr=LR), kwargs, net.base_model.update_and_allocate
    if run == "increlora":
        kwargs = {**increlora_kwargs(target, modules, p), **common}
        config = pefttorch.IncreLoraConfig(**kwargs)
    elif run == "adalora":
        kwargs = {**adalora_kwargs(target, p), **common}
        config = pefttorch.AdaLoraConfig(**kwargs)
    else:
        raise ValueError(f"unknown run {run!r}; known: {', '.join(RUNS)}")
    net = pefttorch.get_peft_model(net, config)
    params = [q for q in net.parameters() if q.requires_grad]
    return net, pefttorch.optim.RankAwareAdamW(params, lr=LR), kwargs, net.update_and_allocate


def _total_rank(run: str, net, target: int, modules: int) -> int:
    if run == "lora":
        return target * modules
    if run == "peft-adalora":  # the components not masked (the pattern PEFT keeps), all of them before any mask
        pattern = net.peft_config["default"].rank_pattern
        if pattern:
            return sum(sum(mask) for mask in pattern.values())
        return net.base_model.rankallocator.init_bgt
    return sum(net.rank_pattern().values())


def run_one(run: str, shape: ModelShape, dtype: torch.dtype, device: torch.device, p: Plan, target: int = 8,
            dropout: float = 0.0, modules: int | None = None) -> RankResult:
    """Trains `run` for the plan's warm-up and timed steps on the model suite's batches and measures it."""
    modules = modules or count_modules(shape)
    result = RankResult(run, modules=modules, budget=target * modules)
    net, opt, result.config, update = _make(run, shape, dtype, device, target, dropout, p, modules)
    result.trainable = sum(q.numel() for q in net.parameters() if q.requires_grad)
    result.initial_rank = _total_rank(run, net, target, modules)
    net.train()

    def step(global_step, ids):
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        if update is not None:
            update(global_step)
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    trace = []

    def after(global_step):  # host-side bookkeeping only (no device synchronisation), outside the timing
        trace.append(_total_rank(run, net, target, modules))

    result.losses, result.step_ms, result.peak_gib = time_steps(
        step, make_batches(shape, p.warmup + p.steps, device), p.warmup, device, after, first_step=p.offset + 1)
    result.rank_trace = trace
    result.final_rank = trace[-1]
    result.events = _events(run, net, trace, p)
    _summarise(result, shape, p)
    return result


def _events(run: str, net, trace: list[int], p: Plan) -> list[dict]:
    """Every allocation event: its global step, timed step (None in the warm-up), total rank after it and
    the number of modules whose rank changed (None for HF PEFT, which masks)."""
    def timed(step):
        return step - p.start if step > p.start else None

    def at(step):
        return trace[step - p.offset - 1]

    if run == "lora":
        return []
    if run == "peft-adalora":
        # PEFT masks on the steps its budget schedule says, up to total_step - tfinal (and re-applies the final
        # mask at every step after it: part of its cost, not an event)
        alloc = net.base_model.rankallocator
        steps = [s for s in range(p.offset + 1, p.end + 1) if alloc.budget_schedule(s)[1] or s == p.end]
        return [{"step": s, "timed_step": timed(s), "total_rank": at(s), "modules": None} for s in steps]
    return [{"step": e["step"], "timed_step": timed(e["step"]), "total_rank": at(e["step"]),
             "modules": len(e["ranks"])} for e in net.base_model.allocator.events if e["ranks"]]


def _summarise(r: RankResult, shape: ModelShape, p: Plan) -> None:
    ms = r.step_ms
    r.median_ms = median(ms)
    r.mean_ms = sum(ms) / len(ms)
    r.tokens_per_s = shape.batch * shape.seq / (r.mean_ms * 1e-3)
    event_steps = {e["timed_step"] for e in r.events if e["timed_step"] is not None}
    r.events_timed = len(event_steps)
    busy = [t for j, t in enumerate(ms, 1) if j in event_steps]
    quiet = [t for j, t in enumerate(ms, 1) if j not in event_steps]
    r.event_mean_ms = sum(busy) / len(busy) if busy else None
    r.quiet_mean_ms = sum(quiet) / len(quiet) if quiet else None
    # the first point from which the total rank stays at the budget (0: before the timed steps)
    trace = [r.initial_rank, *r.rank_trace]
    held = len(trace)
    while held > 0 and trace[held - 1] == r.budget:
        held -= 1
    r.budget_reached_at = max(0, held - p.warmup) if held < len(trace) else None
    notes = []
    if not all(math.isfinite(v) for v in r.losses):
        r.ok = False
        notes.append("non-finite loss")
    if r.run != "lora":
        if r.final_rank != r.budget:
            notes.append(f"final total rank {r.final_rank}, budget {r.budget}")
            r.ok = r.ok and r.run == "peft-adalora"  # PEFT's masking is its own business; ours must hit it
        if r.events_timed == 0:
            r.ok = False
            notes.append("no allocation event inside the timed steps")
    r.note = "; ".join(notes)


def compare(results: list[RankResult]) -> None:
    """Ratios of the mean and the median step time to pefttorch LoRA's and to HF PEFT AdaLoRA's."""
    by = {r.run: r for r in results}
    lora, peft = by.get("lora"), by.get("peft-adalora")
    for r in results:
        if lora and lora.mean_ms and r.mean_ms:
            r.mean_ratio_to_lora = r.mean_ms / lora.mean_ms
            r.median_ratio_to_lora = r.median_ms / lora.median_ms
        if peft and peft.mean_ms and r.mean_ms:
            r.mean_ratio_to_peft = r.mean_ms / peft.mean_ms
            r.median_ratio_to_peft = r.median_ms / peft.median_ms


def check_targets(results: list[RankResult]) -> list[tuple[str, bool, str]]:
    by = {r.run: r for r in results}
    out = []
    incre, ada, lora, peft = (by.get(n) for n in ("increlora", "adalora", "lora", "peft-adalora"))
    if incre and lora and incre.mean_ratio_to_lora is not None:
        out.append(("IncreLoRA mean step (events included) <= 1.05x pefttorch LoRA at the final rank",
                    incre.ok and lora.ok and incre.mean_ratio_to_lora <= 1.05, f"{incre.mean_ratio_to_lora:.3f}x"))
    if ada and peft and ada.mean_ratio_to_peft is not None:
        out.append(("pefttorch AdaLoRA mean step < HF PEFT AdaLoRA's", ada.ok and ada.mean_ratio_to_peft < 1.0,
                    f"{ada.mean_ratio_to_peft:.3f}x"))
    return out


def run_suite(runs: list[str], shape: ModelShape, dtype: torch.dtype, device: torch.device, steps: int,
              warmup: int, target: int = 8, dropout: float = 0.0, progress=None) -> tuple[list[RankResult], Plan]:
    """Every run in turn (each one's memory released before the next), then the ratios."""
    p = plan(warmup, steps)
    modules = count_modules(shape)
    results = []
    for run in runs:
        if progress:
            progress(run)
        try:
            results.append(run_one(run, shape, dtype, device, p, target, dropout, modules))
        except torch.OutOfMemoryError as err:
            results.append(RankResult(run, ok=False, note=f"out of memory: {err}"))
        release(device)
    compare(results)
    return results, p


def as_dicts(results: list[RankResult]) -> list[dict]:
    return [asdict(r) for r in results]


def print_table(meta: dict, model_label: str, target: int, p: Plan, rows: list[dict], targets: list,
                console=None) -> None:
    """One line per run: median and mean step time, their ratios to LoRA and to HF PEFT AdaLoRA, events,
    ranks, peak memory."""
    from rich.console import Console
    from rich.table import Table

    from .report import print_targets

    console = console or Console()
    modules = next((r["modules"] for r in rows if r["modules"]), None)
    table = Table(title=f"rank allocation, training step, {model_label}, {meta['dtype']} on {meta['device']}, "
                        f"target rank {target} on {modules} modules (all-linear); {p.steps} timed steps after "
                        f"{p.warmup}, an event every {p.interval}, the budget from timed step {p.end - p.start} "
                        f"(torch {meta['torch']}, peft {meta.get('peft') or 'absent'})", title_justify="left")
    for col in ("run", "median ms", "mean ms", "mean/lora", "median/lora", "mean/peft", "events",
                "event/quiet ms", "total rank", "peak GiB", "ok"):
        table.add_column(col, justify="left" if col in ("run", "ok") else "right", no_wrap=col != "ok")

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    for row in rows:
        events = str(row["events_timed"]) + (f" (+{len(row['events']) - row['events_timed']} before)"
                                             if len(row["events"]) > row["events_timed"] else "")
        table.add_row(row["run"], fmt(row["median_ms"], ".1f"), fmt(row["mean_ms"], ".1f"),
                      fmt(row["mean_ratio_to_lora"], ".3f"), fmt(row["median_ratio_to_lora"], ".3f"),
                      fmt(row["mean_ratio_to_peft"], ".3f"), events if row["run"] != "lora" else "-",
                      f"{fmt(row['event_mean_ms'], '.1f')}/{fmt(row['quiet_mean_ms'], '.1f')}",
                      f"{fmt(row['initial_rank'], 'd')}->{fmt(row['final_rank'], 'd')}", fmt(row["peak_gib"], ".2f"),
                      "yes" if row["ok"] else f"[red]no: {row['note']}[/red]")
    console.print(table)
    for row in rows:
        if row["ok"] and row["note"]:
            console.print(f"{row['run']}: {row['note']}")
    print_targets(targets, console)


def plot(path: Path, meta: dict, rows: list[dict], _impls=None) -> None:
    """Left: mean and median step time relative to pefttorch LoRA. Right: each timed step's time, events
    marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import save_figure

    runs = [r for r in rows if r.get("mean_ms")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r["run"] for r in runs]
    xs = range(len(runs))
    ax = axes[0]
    if all(r.get("mean_ratio_to_lora") is not None for r in runs):
        ax.bar([x - 0.2 for x in xs], [r["mean_ratio_to_lora"] for r in runs], 0.4, label="mean (events included)")
        ax.bar([x + 0.2 for x in xs], [r["median_ratio_to_lora"] for r in runs], 0.4, label="median")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(1.05, color="red", linewidth=0.8, linestyle="--", label="target 1.05x (IncreLoRA)")
        ax.set_ylabel("step time / pefttorch LoRA")
        ax.legend(fontsize=8)
    else:  # no lora run: the mean step time itself
        ax.bar(list(xs), [r["mean_ms"] for r in runs])
        ax.set_ylabel("mean step ms")
    ax.set_xticks(list(xs), names, rotation=15)
    ax.grid(axis="y", alpha=0.3)
    ax = axes[1]
    for k, r in enumerate(runs):
        ax.plot(range(1, len(r["step_ms"]) + 1), r["step_ms"], marker=".", color=f"C{k}", label=r["run"])
        for e in r["events"]:
            if e["timed_step"] is not None:
                ax.plot(e["timed_step"], r["step_ms"][e["timed_step"] - 1], "o", mfc="none", color=f"C{k}", ms=9)
    ax.set_xlabel("timed step (circles: allocation events)")
    ax.set_ylabel("step ms")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle(f"rank allocation, training step on {meta['device']} ({meta['dtype']}), torch {meta['torch']}, "
                 f"commit {meta.get('commit')}", fontsize=9)
    save_figure(fig, path)
