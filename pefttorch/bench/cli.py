"""`pefttorch bench`: the benchmark suites, side by side with the bound and with HF PEFT.

Suites: ``lora`` (the LoRA layer over a grid of shapes), ``model`` (a training step of a Llama-style
model), ``sparse`` (DEFT's sparse-activation MLP at decode, over activation densities) and ``rank``
(IncreLoRA and AdaLoRA training steps, allocation events included, against LoRA at the final rank and HF
PEFT's AdaLoRA), ``meft`` (MEFT's reversible adapters against LoRA with and without gradient checkpointing,
step time and peak memory) and ``adapter`` (the bottleneck adapter, forward and forward+backward: pefttorch's fused op
against the unfused PyTorch module, the reference and AdapterHub's library when importable, and against the
memory-traffic floor at the measured copy bandwidth). With no suite named, a quick default set of all runs:
about a minute on a laptop CPU, a few minutes on one GPU.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from .._args import UsageError, missing_extra, positive_int, probability, writable_file
from .._args import device as device_arg

SUITES = ("lora", "model", "sparse", "rank", "meft", "adapter")
RANK_STEPS = {"cuda": 40, "cpu": 16}  # timed steps of the rank suite
RANK_STEPS_QUICK = {"cuda": 16, "cpu": 8}
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from . import adapter, lora, model, rank, sparse

    p.add_argument("suites", nargs="*", metavar="SUITE", help=f"one or more of: {', '.join(SUITES)} "
                   "(default: a quick run of all)")
    p.add_argument("--device", type=device_arg, default=None, help="cuda, cuda:N or cpu (default: cuda if present)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--quick", action="store_true", help="fewer shapes and steps")
    p.add_argument("--shapes", default=None,
                   help="lora: comma-separated TOKENSxINxOUTrRANK[pDROPOUT], e.g. 8192x4096x4096r16p0.1; sparse: "
                   "comma-separated HIDDENxINTER[xOUT]:ACTIVATION[:gated][:bias], e.g. 4096x11008:silu:gated; adapter: "
                   "comma-separated TOKENSxD:BOTTLENECK[:ACTIVATION] (activation relu, gelu, gelu_tanh or silu; "
                   "default relu), e.g. 8192x4096:256:relu")
    p.add_argument("--impls", default=None, help="lora: implementations to run (default: all)")
    p.add_argument("--runs", default=None, help="model, rank, meft: comma-separated runs to make (default: all of "
                   "the suite's; with several suites, each makes the ones named that are its own)")
    p.add_argument("--repeat", type=positive_int, default=None,
                   help="lora, sparse, adapter: timed calls per measurement on a GPU; on the CPU, where "
                   "torch.utils.benchmark picks the call count, it sets the minimum time measured: REPEAT/100 s (at "
                   "least 0.2 s) (default 50; sparse and adapter quick 20)")
    p.add_argument("--tokens", default=None,
                   help=f"sparse: comma-separated token counts (default {','.join(map(str, sparse.TOKENS))})")
    p.add_argument("--densities", default=None, help="sparse: comma-separated target densities in (0, 1] "
                   f"(default {','.join(f'{d:g}' for d in sparse.DENSITIES)})")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="model, meft: timed steps (default 10, quick 4); rank: timed steps, allocation events "
                   f"included (default {RANK_STEPS['cuda']} on a GPU, {RANK_STEPS['cpu']} on the CPU; quick "
                   f"{RANK_STEPS_QUICK['cuda']}, {RANK_STEPS_QUICK['cpu']})")
    p.add_argument("--r", type=positive_int, default=None,
                   help="model, meft: LoRA rank (default 16); rank: the target rank, average per module at the end "
                   "(default 8; 2 or more for increlora, which starts at 1)")
    # the suites' own defaults are put in where read (None here), so that one given to no suite that reads it is told
    # from one not given, and refused
    p.add_argument("--dropout", type=probability, default=None, help="model, meft: LoRA dropout (0: losses are "
                   "cross-checked), MEFT's adapter dropout; rank: the adapters' dropout (default 0)")
    p.add_argument("--bottleneck", type=positive_int, default=None,
                   help=f"meft: the MEFT adapters' bottleneck (default {model.MEFT_BOTTLENECK})")
    p.add_argument("--stream-dtype", default=None, choices=("float32", "float64"), help="meft: dtype of MEFT's two "
                   "streams (default float64: with float32 a bf16 model's reconstruction fails within a few layers)")
    p.add_argument("--small-model", action="store_true", default=None,
                   help="model, rank, meft: the CPU-sized model even on a GPU")
    p.add_argument("--json", type=Path, default=Path("build/bench/bench.json"),
                   help="results file (default build/bench/bench.json)")
    p.add_argument("--plot", type=Path, default=None,
                   help="plot file, its format from the suffix (.png without one; .svg, .pdf, ...); with several "
                   "suites, one per suite: <stem>-<suite><suffix> (default: next to the JSON, <stem>-<suite>.png)")
    p.add_argument("--compare", type=Path, default=None, help="an earlier results JSON: print the change per row")
    p.epilog = ("lora implementations:\n" + "\n".join(f"  {k:18} {v}" for k, v in lora.IMPL_HELP.items())
                + "\nmodel and meft runs:\n" + "\n".join(f"  {k:18} {v}" for k, v in model.RUN_HELP.items())
                + "\nsparse implementations:\n" + "\n".join(f"  {k:18} {v}" for k, v in sparse.IMPL_HELP.items())
                + "\nrank runs (all-linear, lora_alpha = 2 x target rank; several allocation events fall inside the "
                "timed steps,\nthe final budget ~3/4 through them; mean and median step time):\n"
                + "\n".join(f"  {k:18} {v}" for k, v in rank.RUN_HELP.items())
                + "\nadapter implementations (y = x + scale * up(act(down(x))); all run, adapters only if it "
                "imports):\n"
                + "\n".join(f"  {k:18} {v}" for k, v in adapter.IMPL_HELP.items()))
    p.formatter_class = argparse.RawDescriptionHelpFormatter


def run(args: argparse.Namespace) -> int:
    import warnings

    unknown = set(args.suites) - set(SUITES)
    if unknown:
        raise UsageError(f"unknown suite(s) {sorted(unknown)}; suites: {', '.join(SUITES)}")
    suites = list(dict.fromkeys(args.suites)) or list(SUITES)
    # the [bench] extra's (the plain `pip install .` has none of them); the training suites build a transformers model
    needed = ("rich", "tqdm", "matplotlib") + (("transformers",) if {"model", "meft", "rank"} & set(suites) else ())
    missing = missing_extra("bench", needed)
    if missing:
        print(missing)
        return 2

    from rich.console import Console

    from . import report

    # HF PEFT still calls transformers APIs that transformers 5 deprecates: not the user's concern here
    warnings.filterwarnings("ignore", message=".*deprecated and will be removed in v6", category=FutureWarning)

    console = Console()
    if console.width < 140:  # piped output defaults to 80 columns, too narrow for the tables
        console.width = 140
    quick = args.quick or not args.suites
    # Everything a value can be wrong in is checked before the first suite runs: found wanting after it (or after an
    # earlier suite), the results measured so far were lost.
    earlier = _read_compare(args.compare) if args.compare else None
    writable_file(args.json, "--json")
    _check_plots(args, suites)
    device = args.device  # checked by argparse: it exists here
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cpu":
            console.print("no CUDA device: running on the CPU" + ("" if args.shapes else " with CPU-sized shapes"))
    _check_suite_options(args, suites)
    inputs = {suite: _INPUTS[suite](args, device, quick) for suite in suites}
    skipped = [s for s in suites if inputs[s] is None]  # --runs named none of their runs
    if skipped and len(skipped) == len(suites):
        raise UsageError("--runs names none of the " + "; ".join(f"{s} suite's runs ({', '.join(_suite_runs(s))})"
                                                                 for s in skipped))
    for suite in skipped:
        console.print(f"{suite}: --runs names none of its runs, skipped")
        suites.remove(suite)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    peft_missing = _peft_missing()
    if peft_missing:
        console.print(peft_missing)

    meta = report.metadata(device, dtype)
    # what the timings were taken with; `complete` false until every suite ran (a run cut short by Ctrl-C or an
    # error leaves a file that says so, and that --compare names as such)
    meta.update(quick=quick, repeat=args.repeat, suites=suites, complete=False)
    results, ok = {}, True
    # written before the first suite too: cut short in it, the previous run's file, still marked complete, was left
    # at --json, and a later --compare took it for this run's
    _write_json(args.json, {"meta": meta, "suites": results})
    runners = {"lora": _run_lora, "model": _run_model, "sparse": _run_sparse, "rank": _run_rank,
               "meft": _run_meft, "adapter": _run_adapter}
    for suite in suites:
        rows, targets, suite_ok, extra = runners[suite](args, inputs[suite], device, dtype, quick,
                                                        peft_missing is not None, console)
        ok &= suite_ok
        results[suite] = {"rows": rows, "targets": [{"target": t, "met": m, "measured": v} for t, m, v in targets],
                          **extra}
        # written after every suite, before its plot: what was measured is kept whatever fails later
        meta["complete"] = suite == suites[-1]
        _write_json(args.json, {"meta": meta, "suites": results})
        plot_path = _plot_path(args, suite, len(suites))
        _plotter(suite)(plot_path, meta, rows, extra.get("impls"))
        console.print(f"plot: {plot_path}")
    console.print(f"results: {args.json}")
    if earlier is not None:
        compare(console, earlier, results, meta)
    return 0 if ok else 1


def _write_json(path: Path, data: dict) -> None:
    """Whole or not at all: written beside and renamed over, so an interrupt mid-write leaves the previous file."""
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(data, indent=1))
    part.replace(path)


# Options that only some suites read (each of them None when not given): given to a run of none of those, they were
# silently ignored. Every suite reads the others: --device, --dtype, --quick, --json, --plot and --compare.
_TRAINING = ("model", "meft", "rank")
_SUITE_OPTIONS = {"shapes": ("lora", "sparse", "adapter"), "impls": ("lora",), "runs": _TRAINING,
                  "repeat": ("lora", "sparse", "adapter"), "tokens": ("sparse",), "densities": ("sparse",),
                  "steps": _TRAINING, "r": _TRAINING, "dropout": _TRAINING, "bottleneck": ("meft",),
                  "stream_dtype": ("meft",), "small_model": _TRAINING}


def _check_suite_options(args: argparse.Namespace, suites: list[str]) -> None:
    for option, readers in _SUITE_OPTIONS.items():
        if getattr(args, option) is not None and not set(readers) & set(suites):
            raise UsageError(f"--{option.replace('_', '-')} applies to the {', '.join(readers)} suite(s); none of "
                             "them is selected")


def script_main(suite: str, argv: list[str] | None = None) -> int:
    """bench/bench_<suite>.py: `pefttorch bench <suite>` with the same options; another suite named on its command
    line is refused (it was run too, as `pefttorch bench lora sparse` runs both)."""
    import sys

    parser = argparse.ArgumentParser(prog=f"bench_{suite}.py", description=f"pefttorch bench {suite}: " + __doc__)
    add_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.suites:
        parser.error(f"this script runs the {suite} suite; for {' '.join(args.suites)}, use pefttorch bench")
    args.suites = [suite]
    try:
        return run(args)
    except UsageError as err:
        parser.error(str(err))


def _peft_missing() -> str | None:
    try:
        import peft  # noqa: F401
    except ImportError:
        return "HF PEFT is not installed (pip install peft): its columns are skipped"
    return None


def _plotter(suite: str):
    from . import adapter, rank, report, sparse

    return {"lora": report.plot, "model": report.plot_model, "sparse": sparse.plot, "rank": rank.plot,
            "meft": report.plot_model, "adapter": adapter.plot}[suite]


def _plot_path(args, suite: str, n_suites: int) -> Path:
    if args.plot is not None:
        plot = args.plot if args.plot.suffix else args.plot.with_suffix(".png")  # what matplotlib writes
        return plot if n_suites == 1 else plot.with_name(f"{plot.stem}-{suite}{plot.suffix}")
    return args.json.with_name(f"{args.json.stem}-{suite}.png")


def _check_plots(args, suites: list[str]) -> None:
    """Each suite's plot can be written, in a format matplotlib knows, and is not the results file: found wanting at
    the save, after the suite had run, the later suites never ran."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    for suite in suites:
        path = _plot_path(args, suite, len(suites))
        if path.suffix[1:].lower() not in formats:  # matplotlib takes the format from the suffix, in any case
            raise UsageError(f"--plot {path}: matplotlib cannot write {path.suffix!r} files; use one of "
                             + ", ".join(f".{f}" for f in sorted(formats)))
        if path.resolve() == args.json.resolve():
            raise UsageError(f"--plot {path}: the same file as --json")
        writable_file(path, "--plot")


def _read_compare(path: Path) -> dict:
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"--compare {path}: cannot read it as results JSON ({err})") from None
    if not isinstance(earlier, dict) or not isinstance(earlier.get("suites"), dict):
        raise UsageError(f"--compare {path}: not a results file of pefttorch bench (no suites)")
    # what compare() reads of it, checked now: found wanting there, after the run, it was a traceback
    meta = earlier.get("meta", {})
    if not isinstance(meta, dict):
        raise UsageError(f"--compare {path}: not a results file of pefttorch bench (meta is not an object)")
    # of meta, compare() joins the suites asked for and tests complete; the rest it prints or tests for equality only,
    # which any JSON value takes
    suites = meta.get("suites", [])
    if not (isinstance(suites, list) and all(isinstance(s, str) for s in suites)):
        raise UsageError(f"--compare {path}: not a results file of pefttorch bench (meta's suites is not a list of "
                         f"names: {suites!r})"[:300])
    if not isinstance(meta.get("complete", False), bool):
        raise UsageError(f"--compare {path}: not a results file of pefttorch bench (meta's complete is not true or "
                         f"false: {meta['complete']!r})"[:300])
    for suite, data in earlier["suites"].items():
        if suite not in _ROW_KEYS:  # not a suite of this version: never compared
            continue
        rows = data.get("rows", []) if isinstance(data, dict) else None
        if not isinstance(rows, list):
            raise UsageError(f"--compare {path}: suite {suite!r} is not an object with a list of rows")
        for row in rows:
            if not (isinstance(row, dict) and all(_is_scalar(row.get(k, [])) for k in _ROW_KEYS[suite])
                    and _is_number_or_none(_row_ms(suite, row))):
                raise UsageError(f"--compare {path}: a {suite} row is not one of pefttorch bench's (each names "
                                 f"{', '.join(_ROW_KEYS[suite])} and a time {_ROW_MS.get(suite, 'ms')}): {row}"[:300])
    return earlier


def _is_scalar(value) -> bool:
    return value is None or isinstance(value, (str, int, float))


def _is_number_or_none(value) -> bool:
    return value is None or isinstance(value, (int, float)) and not isinstance(value, bool)


def _names(spec: str, known, what: str) -> list[str]:
    """A comma-separated list of names, each one of `known`, at least one (none ran nothing, and exited 0)."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise UsageError(f"no {what} named in {spec!r}; known: {', '.join(known)}")
    unknown = set(names) - set(known)
    if unknown:
        raise UsageError(f"unknown {what} {sorted(unknown)}; known: {', '.join(known)}")
    return names


def _suite_runs(suite: str) -> tuple[str, ...]:
    from . import model, rank

    return {"model": model.RUNS, "meft": model.MEFT_RUNS, "rank": rank.RUNS}[suite]


def _runs(args, suite: str) -> list[str] | None:
    """The runs of `suite` that --runs names (all of them without --runs), None if it names none of them."""
    known = _suite_runs(suite)
    if args.runs is None:
        return list(known)
    every = {s: _suite_runs(s) for s in ("model", "meft", "rank")}
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    if not names:
        raise UsageError(f"--runs {args.runs!r} names no run")
    unknown = [n for n in names if not any(n in runs for runs in every.values())]
    if unknown:
        raise UsageError(f"unknown runs {sorted(unknown)}; known: "
                         + "; ".join(f"{s}: {', '.join(runs)}" for s, runs in every.items()))
    return [n for n in names if n in known] or None


def _shapes(args, suite: str, parse, default) -> list:
    """--shapes parsed by the suite's parser, or the suite's default grid."""
    try:
        return [parse(s) for s in args.shapes.split(",")] if args.shapes else default()
    except ValueError as err:
        raise UsageError(f"{suite}: {err}") from None


def _lora_inputs(args, device, quick) -> dict:
    from . import lora

    return {"shapes": _shapes(args, "lora", lora.Shape.parse, lambda: lora.default_shapes(device, quick)),
            "impls": _names(args.impls, lora.IMPLS, "implementations") if args.impls is not None else list(lora.IMPLS)}


def _sparse_inputs(args, device, quick) -> dict:
    from . import sparse

    default_shapes, tokens, densities = sparse.default_grid(device, quick)
    shapes = _shapes(args, "sparse", sparse.MLPShape.parse, lambda: default_shapes)
    try:
        if args.tokens:
            tokens = tuple(int(t) for t in args.tokens.split(","))
    except ValueError:  # int()'s own message named neither the option nor what it wants
        raise UsageError(f"sparse: --tokens {args.tokens!r}: expected comma-separated integers") from None
    try:
        if args.densities:
            densities = tuple(float(d) for d in args.densities.split(","))
    except ValueError:
        raise UsageError(f"sparse: --densities {args.densities!r}: expected comma-separated numbers") from None
    if not all(0.0 < d <= 1.0 for d in densities) or not all(t > 0 for t in tokens):
        raise UsageError("sparse: densities must be in (0, 1] and token counts positive")
    return {"shapes": shapes, "tokens": tokens, "densities": densities}


def _adapter_inputs(args, device, quick) -> dict:
    from . import adapter

    return {"shapes": _shapes(args, "adapter", adapter.AdapterShape.parse, lambda: adapter.default_grid(device, quick))}


def _runs_inputs(suite: str):
    def inputs(args, device, quick):
        runs = _runs(args, suite)
        return None if runs is None else {"runs": runs}
    return inputs


def _rank_inputs(args, device, quick):
    inputs = _runs_inputs("rank")(args, device, quick)
    if inputs is not None and "increlora" in inputs["runs"] and args.r == 1:
        # it would run, and then be flagged for the allocation event that cannot happen
        raise UsageError("rank: --r 1 is IncreLoRA's starting rank, so it has no rank to allocate; give --r 2 or "
                         "more (or --runs without increlora)")
    return inputs


# per suite: its inputs from the arguments (None: --runs names none of its runs), all checked before any suite runs
_INPUTS = {"lora": _lora_inputs, "sparse": _sparse_inputs, "adapter": _adapter_inputs, "rank": _rank_inputs,
           **{suite: _runs_inputs(suite) for suite in ("model", "meft")}}


def _run_lora(args, inputs, device, dtype, quick, no_peft, console):
    from tqdm import tqdm

    from . import lora, report

    shapes, impls = inputs["shapes"], inputs["impls"]
    if no_peft:
        impls = [i for i in impls if i not in ("peft", "peft-model-dtype")]
    rows: list[lora.Row] = []
    with tqdm(total=len(shapes) * len(impls), desc="lora", unit="impl") as bar:
        for shape in shapes:
            rows += lora.run_shape(shape, impls, dtype, device, args.repeat or 50,
                                   progress=lambda text: (bar.set_postfix_str(text), bar.update(0)))
            bar.update(len(impls))
    targets = lora.check_targets(rows, dtype)
    dict_rows = lora.as_dicts(rows)
    report.print_table(report.metadata(device, dtype), dict_rows, impls, targets, console)
    return dict_rows, targets, all(r.ok for r in rows), {"impls": impls}


def _run_model(args, inputs, device, dtype, quick, no_peft, console):
    return _run_training("model", args, inputs, device, dtype, quick, no_peft, console)


def _run_meft(args, inputs, device, dtype, quick, no_peft, console):
    return _run_training("meft", args, inputs, device, dtype, quick, no_peft, console)


def _run_training(suite, args, inputs, device, dtype, quick, no_peft, console):
    """The model and meft suites: training steps of the Llama-style model, one run after another."""
    from tqdm import tqdm

    from . import model, report

    shape = model.CPU_SHAPE if (device.type == "cpu" or args.small_model) else model.GPU_SHAPE
    runs = inputs["runs"]
    if no_peft:
        runs = [r for r in runs if not r.startswith("peft+") and r != "peft"]
    stream_dtype = args.stream_dtype or str(model.MEFT_STREAMS).removeprefix("torch.")
    meft = model.MeftOptions(args.bottleneck or model.MEFT_BOTTLENECK, getattr(torch, stream_dtype))
    steps = args.steps or (4 if quick else 10)
    r = 16 if args.r is None else args.r
    dropout = args.dropout or 0.0
    results, adapter_state = [], None
    for run in tqdm(runs, desc=suite, unit="run"):
        try:
            result, initial = model.run_one(run, shape, dtype, device, steps, 2 if quick else 3, r,
                                            dropout, adapter_state, meft)
        except torch.OutOfMemoryError as err:
            result, initial = model.RunResult(run, ok=False, note=f"out of memory: {err}"), None
        model.release(device)
        adapter_state = adapter_state or initial
        results.append(result)
    model.compare(results, dtype, check_losses=dropout == 0.0)
    targets = model.check_targets(results, suite)
    rows = model.as_dicts(results)
    title = f"{shape.label}, LoRA r={r} all-linear"
    if any(run in model.MEFT_VARIANTS for run in runs):
        title += f", MEFT bottleneck {meft.bottleneck} with {stream_dtype} streams"
    report.print_model_table(report.metadata(device, dtype), title, rows, targets, console)
    extra = {"model": shape.label, "r": r, "steps": steps, "peak": report.peak_label({"device_type": device.type})}
    if suite == "meft":
        extra.update(bottleneck=meft.bottleneck, stream_dtype=stream_dtype)
    return rows, targets, all(res.ok for res in results), extra


def _run_rank(args, inputs, device, dtype, quick, no_peft, console):
    from tqdm import tqdm

    from . import model, rank, report

    shape = model.CPU_SHAPE if (device.type == "cpu" or args.small_model) else model.GPU_SHAPE
    runs = inputs["runs"]
    if no_peft and "peft-adalora" in runs:
        console.print("peft-adalora is skipped: HF PEFT is not installed")
        runs.remove("peft-adalora")
    kind = "cuda" if device.type == "cuda" else "cpu"
    steps = args.steps or (RANK_STEPS_QUICK if quick else RANK_STEPS)[kind]
    target = 8 if args.r is None else args.r
    dropout = args.dropout or 0.0
    with tqdm(total=len(runs), desc="rank", unit="run") as bar:
        def progress(run):
            bar.set_postfix_str(run)
            if run != runs[0]:
                bar.update(1)

        results, plan = rank.run_suite(runs, shape, dtype, device, steps, 2 if quick else 3, target, dropout,
                                       progress)
        bar.update(1)
    targets = rank.check_targets(results)
    rows = rank.as_dicts(results)
    rank.print_table(report.metadata(device, dtype), shape.label, target, plan, rows, targets, console)
    return rows, targets, all(res.ok for res in results), {
        "model": shape.label, "target_r": target, "steps": steps, "plan": asdict(plan),
        "budget_at_timed_step": plan.end - plan.start}


def _run_sparse(args, inputs, device, dtype, quick, no_peft, console):
    from tqdm import tqdm

    from . import report, sparse

    shapes, tokens, densities = inputs["shapes"], inputs["tokens"], inputs["densities"]
    repeat = args.repeat or (20 if quick else 50)
    rows: list[sparse.Row] = []
    per_shape = len(tokens) * (1 + 2 * len(densities))
    with tqdm(total=len(shapes) * per_shape, desc="sparse", unit="row") as bar:
        for shape in shapes:
            rows += sparse.run_shape(shape, tokens, densities, dtype, device, repeat,
                                     progress=lambda text: (bar.set_postfix_str(text), bar.update(1)))
            if device.type == "cuda":  # the next MLP's weight copies start from a clean slate
                torch.cuda.empty_cache()
    dict_rows = sparse.as_dicts(rows)
    sparse.print_table(report.metadata(device, dtype), dict_rows, console)
    targets = sparse.check_targets(dict_rows, dtype)
    report.print_targets(targets, console)
    return dict_rows, targets, all(r.ok for r in rows), {
        "impls": list(sparse.IMPLS), "tokens": list(tokens), "densities": list(densities),
        "crossover": sparse.crossover(dict_rows)}


def _run_adapter(args, inputs, device, dtype, quick, no_peft, console):
    from tqdm import tqdm

    from . import adapter, report

    shapes = inputs["shapes"]
    impls = list(adapter.IMPLS)
    missing = adapter.adapters_status()
    if missing:
        console.print(missing)
        impls.remove("adapters")
    bandwidth = adapter.copy_bandwidth(device)
    repeat = args.repeat or (20 if quick else 50)
    rows: list[adapter.Row] = []
    with tqdm(total=len(shapes) * len(impls), desc="adapter", unit="impl") as bar:
        for shape in shapes:
            rows += adapter.run_shape(shape, impls, dtype, device, bandwidth, repeat,
                                      progress=lambda text: (bar.set_postfix_str(text), bar.update(0)))
            bar.update(len(impls))
            if device.type == "cuda":  # the next shape's input copies start from a clean slate
                torch.cuda.empty_cache()
    dict_rows = adapter.as_dicts(rows)
    adapter.print_table(report.metadata(device, dtype), dict_rows, impls, bandwidth, console)
    targets = adapter.check_targets(dict_rows, device)
    report.print_targets(targets, console)
    note = adapter.floor_note(dict_rows, device)
    if note:
        console.print(note)
    return dict_rows, targets, all(r.ok for r in rows), {
        "impls": impls, "bandwidth": {**asdict(bandwidth), "gbps": bandwidth.gbps}, "adapters_missing": missing,
        "scale": adapter.SCALE}


# what --compare matches rows by, per suite, and the time it compares
_ROW_KEYS = {"lora": ("shape", "mode", "impl"), "adapter": ("shape", "mode", "impl"),
             "sparse": ("shape", "tokens", "target_density", "impl"), "model": ("run",), "meft": ("run",),
             "rank": ("run",)}
_ROW_MS = {"model": "step_ms", "meft": "step_ms", "rank": "mean_ms"}  # the others': "ms"


def _row_key(suite: str, row: dict) -> tuple:
    return tuple(row[k] for k in _ROW_KEYS[suite])


def _row_ms(suite: str, row: dict):
    return row.get(_ROW_MS.get(suite, "ms"))


def _differ(key: str, old: dict, now: dict) -> bool:
    if key == "device" and "cpu" in (old.get(key), now.get(key)):
        # older results named the CPU just "cpu", newer ones its model: then the kind of device is what can be said
        return (old.get("device_type") or old.get(key)) != (now.get("device_type") or now.get(key))
    return old.get(key) != now.get(key)


def compare(console, old: dict, results: dict, meta_now: dict | None = None) -> None:
    """The change of each row's time against an earlier run (same suite and row); a row of one run only is said to be
    new or gone. Rows are matched by shape and implementation (or run); what they do not name (the device, the dtype,
    the training suites' model) is compared once, and a difference said, since the times are then not of the same
    thing."""
    meta = old.get("meta", {})
    console.print(f"change against commit {meta.get('commit')} of {meta.get('date')} on {meta.get('device')}:")
    if meta.get("complete") is False:
        had, asked = ", ".join(old.get("suites", {})) or "no suite", ", ".join(meta.get("suites", []))
        console.print(f"[yellow]  note: the earlier run was cut short: it has results for {had} of {asked}[/yellow]")
    for key in ("device", "dtype"):
        if meta_now is not None and _differ(key, meta, meta_now):
            console.print(f"[yellow]  note: the earlier run's {key} was {meta.get(key)}, this one's "
                          f"{meta_now.get(key)}: the rows below compare different things[/yellow]")
    for suite, data in results.items():
        earlier = old.get("suites", {}).get(suite, {})
        if not earlier:
            console.print(f"[yellow]  note: the earlier run has no {suite} results: nothing to compare[/yellow]")
            continue
        for key in ("model", "r", "target_r", "bottleneck", "stream_dtype"):
            if key in data and key in earlier and data[key] != earlier[key]:
                console.print(f"[yellow]  note: {suite}: the earlier run's {key} was {earlier[key]}, this one's "
                              f"{data[key]}[/yellow]")
        before = {_row_key(suite, r): r for r in earlier.get("rows", [])}
        # a row on one side only, or without a time on one, is said too: left out, a row new in this run (another
        # shape, implementation or run) or one gone from it could not be told from one that did not change. (A row
        # given twice, --shapes naming a shape twice, is compared each time.)
        matched = set()
        for row in data["rows"]:
            key = _row_key(suite, row)
            o = before.get(key)
            matched.add(key)
            new_ms, old_ms = _row_ms(suite, row), _row_ms(suite, o) if o else None
            if o is None:
                console.print(f"[yellow]  note: {suite} {_row_label(suite, row)} is new: the earlier run has no "
                              f"figure for it (now {_ms_text(new_ms)})[/yellow]")
            elif new_ms and old_ms:
                console.print(f"  {suite:6} {_row_label(suite, row):52} {old_ms:9.3f} -> {new_ms:9.3f} ms "
                              f"({(new_ms / old_ms - 1) * 100:+.1f}%)")
            else:  # a run that failed (or ran out of memory) on one side
                console.print(f"[yellow]  note: {suite} {_row_label(suite, row)}: no change to give (earlier "
                              f"{_ms_text(old_ms)}, now {_ms_text(new_ms)})[/yellow]")
        for o in (o for key, o in before.items() if key not in matched):  # the earlier run's rows this one has not
            console.print(f"[yellow]  note: {suite} {_row_label(suite, o)} is gone: this run has no figure for it "
                          f"(earlier {_ms_text(_row_ms(suite, o))})[/yellow]")


def _row_label(suite: str, row: dict) -> str:
    return " ".join(str(k) for k in _row_key(suite, row) if k is not None)


def _ms_text(ms) -> str:
    return f"{ms:.3f} ms" if ms else "no time"
