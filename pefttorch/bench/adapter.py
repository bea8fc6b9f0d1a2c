"""The bottleneck adapter benchmark: pefttorch's fused op against the unfused PyTorch module (the baseline),
the pure-PyTorch reference and, when it can be imported, AdapterHub's ``adapters`` library, forward and
forward+backward, at BERT-base and Llama-style widths.

The adapter is the sequential one (Houlsby, Pfeiffer): ``y = x + scale * (act(x W_down^T + b_down) W_up^T +
b_up)``, with gradients for x and for all four adapter tensors, as in training.

Every implementation of a row shares one set of inputs and weights (all random, the up projection too: the
near-identity initialisation, W_up = 0, would let an implementation that drops the bottleneck pass), and is
checked before it is timed: y, dx, dW_down, db_down, dW_up and db_up against a float64 oracle, each within 3x
the error of the plain computation in the run's dtype (pefttorch.testing.check_accuracy). A mismatch is
flagged in the row, never shown as a win.

The memory-traffic floor. T tokens, width d, bottleneck m, e bytes per element; the weights W = 2 d m + m + d
elements. The adapter's hidden (T x m) is m/d of x's size and is left out: an implementation may keep it on
chip or recompute it.

    forward:           read x, write y                              e * (2 T d + W)
    forward+backward:  read x and dy, write y and dx                e * (4 T d + 2 W)
                       (the weights read once, their gradients written once)

The floor's time is these bytes at the bandwidth of a device-to-device copy of a tensor much larger than the
cache, measured in the same run (read once and written once: 2 bytes moved per byte copied), not a data-sheet
figure. It is a bound no implementation reaches exactly: backward runs after the forward pass has left x in
memory, so an implementation that stores x (rather than recomputing the layer that made it) reads x once more
for dW_down, 5 T d instead of 4 T d elements, 1.25x the floor at large T. The target of 1.3x is a GPU target;
on the CPU the ratio is printed but not counted.

Repeated calls on the same tensors would find them in the cache (at d = 768, 8192 tokens in bf16, x and dy
are 12 MiB each, an H100's L2 50 MiB), faster than a layer in a model runs: the timed calls cycle through
enough copies of the inputs and weights that one round of calls moves more than twice the last-level cache.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import functional, reference
from ..testing import check_accuracy
from .sparse import cache_bytes
from .timing import peak_memory_bytes, time_ms

MODES = ("fwd", "fwd+bwd")
IMPLS = ("torch", "reference", "pefttorch", "adapters")
IMPL_HELP = {
    "torch": "unfused PyTorch: F.linear, activation, F.linear, scale, residual add (a plain nn.Module), the "
             "baseline",
    "reference": "pefttorch.reference.bottleneck_adapter (pure PyTorch, the test oracle)",
    "pefttorch": "pefttorch.functional.bottleneck_adapter (fused op)",
    "adapters": "AdapterHub's adapters library (its bottleneck Adapter module), when it can be imported",
}
ACTIVATIONS = tuple(reference.ACTIVATIONS)
SCALE = 2.0  # not 1: an implementation that drops the scale must show it
FLOOR_TARGET = 1.3  # pefttorch's time / the traffic floor's, at most (on a GPU)
GRAD_NAMES = ("dx", "dW_down", "db_down", "dW_up", "db_up")


@dataclass(frozen=True)
class AdapterShape:
    tokens: int
    d: int
    bottleneck: int
    activation: str = "relu"

    @property
    def label(self) -> str:
        return f"{self.tokens}x{self.d}:{self.bottleneck} {self.activation}"

    @classmethod
    def parse(cls, text: str) -> AdapterShape:
        """'8192x4096:256:relu', '512x384:24' (TOKENSxD:BOTTLENECK[:ACTIVATION]; the activation defaults to
        relu, AdapterHub's default)."""
        m = re.fullmatch(r"(\d+)x(\d+):(\d+)(?::(\w+))?", text.strip())
        if not m:
            raise ValueError(f"bad adapter shape {text!r}: expected TOKENSxD:BOTTLENECK[:ACTIVATION], e.g. "
                             "8192x4096:256:relu")
        tokens, d, bottleneck, act = m.groups()
        act = act or "relu"
        if act not in ACTIVATIONS:
            raise ValueError(f"bad adapter shape {text!r}: unknown activation {act!r}; known: "
                             f"{', '.join(ACTIVATIONS)}")
        if min(int(tokens), int(d), int(bottleneck)) < 1:
            raise ValueError(f"bad adapter shape {text!r}: tokens, d and bottleneck must be >= 1")
        return cls(int(tokens), int(d), int(bottleneck), act)


def default_grid(device: torch.device, quick: bool) -> list[AdapterShape]:
    """BERT-base (d = 768) and Llama-style (2048, 4096) widths at bottleneck 64 and d/16, 8192 tokens, on a GPU;
    d = 256 and 384 at 512 tokens on the CPU. quick: three shapes on a GPU, two on the CPU (a few seconds)."""
    if device.type == "cuda":
        if quick:
            return [AdapterShape(8192, 768, 64), AdapterShape(8192, 4096, 64), AdapterShape(8192, 4096, 256)]
        grid = [AdapterShape(8192, d, m) for d in (768, 2048, 4096) for m in dict.fromkeys((64, d // 16))]
        return grid + [AdapterShape(8192, 4096, 256, "silu")]  # one smooth activation: the backward differs
    if quick:
        return [AdapterShape(512, 256, 16), AdapterShape(512, 384, 64)]
    return [AdapterShape(512, d, m) for d in (256, 384) for m in dict.fromkeys((64, d // 16))] + [
        AdapterShape(512, 384, 24, "gelu")]


@dataclass
class Row:
    shape: str
    tokens: int
    d: int
    bottleneck: int
    activation: str
    impl: str
    mode: str
    ms: float | None = None
    peak_mib: float | None = None  # CUDA only
    ok: bool = True
    note: str = ""
    ratio_to_torch: float | None = None  # ms / the torch baseline's ms
    floor_bytes: int = 0  # the memory-traffic floor of this mode (see the module's doc)
    floor_ms: float | None = None  # floor_bytes at the measured copy bandwidth
    ratio_to_floor: float | None = None  # ms / floor_ms
    effective_gbps: float | None = None  # floor_bytes / ms
    tokens_per_s: float | None = None
    copies: int = 1  # input and weight sets the timed calls cycle through


@dataclass
class Bandwidth:
    """A device-to-device copy of `copy_bytes`: bytes read plus bytes written per second."""

    bytes_per_s: float
    copy_bytes: int
    ms: float

    @property
    def gbps(self) -> float:
        return self.bytes_per_s / 1e9


def copy_bandwidth(device: torch.device, copy_bytes: int | None = None, repeat: int = 20) -> Bandwidth:
    """Measures the bandwidth the floor is timed at: dst.copy_(src) of a float32 tensor larger than the cache
    (1 GiB on a GPU, where the L2 is tens of MiB; twice the last-level cache, within 256 MiB to 1 GiB, on a
    CPU, so that the measurement stays short)."""
    if copy_bytes is None:
        copy_bytes = 1 << 30 if device.type == "cuda" else min(max(256 << 20, 2 * cache_bytes(device)), 1 << 30)
    n = copy_bytes // 4
    src = torch.ones(n, device=device)  # written once here, so that no page is first touched inside the timing
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, repeat=repeat, warmup=3)
    return Bandwidth(2 * 4 * n / (ms * 1e-3), 4 * n, ms)


def floor_bytes(shape: AdapterShape, mode: str, dtype: torch.dtype) -> int:
    """The memory-traffic floor of one call (see the module's doc)."""
    e = torch.empty((), dtype=dtype).element_size()
    t, d, m = shape.tokens, shape.d, shape.bottleneck
    weights = 2 * d * m + m + d
    if mode == "fwd":
        return e * (2 * t * d + weights)
    return e * (4 * t * d + 2 * weights)


# ------------------------------------------------------------------------------------------------
# The implementations: build(impl, shape, w) -> Layer on a set w of inputs and weights (see make_set)


@dataclass
class Layer:
    """One implementation on one set: call(x) -> y, and params, the adapter tensors in the order w_down,
    b_down, w_up, b_up as this implementation holds them (whose gradients backward must produce)."""

    call: Callable[[torch.Tensor], torch.Tensor]
    params: list[torch.Tensor]
    keep: list = field(default_factory=list)  # modules kept alive


def adapters_status() -> str | None:
    """None if AdapterHub's `adapters` library can be used here, else why not (one line). Any error counts: its
    releases pin a transformers version, and an import against another one fails in many ways."""
    try:
        import adapters  # noqa: F401
        from adapters.methods.modeling import Adapter  # noqa: F401
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else ""
        return f"AdapterHub adapters cannot be imported ({type(err).__name__}: {first}): its rows are skipped"
    return None


# transformers' activation names (what AdapterHub passes to get_activation) for ours
_HF_ACTIVATION = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "silu"}


def build(impl: str, shape: AdapterShape, w: dict) -> Layer:
    """Builds `impl` on the weights of set w (w_down, b_down, w_up, b_up; leaves that require grad)."""
    wd, bd, wu, bu = (w[k] for k in ("w_down", "b_down", "w_up", "b_up"))
    act = reference.ACTIVATIONS[shape.activation]
    if impl == "torch":
        # what a plain nn.Module (and AdapterHub's Adapter.forward) does: each step its own kernel and tensor
        def torch_adapter(x):
            up = F.linear(act(F.linear(x, wd, bd)), wu, bu)
            return x + up * SCALE

        return Layer(torch_adapter, [wd, bd, wu, bu])
    if impl == "reference":
        return Layer(lambda x: reference.bottleneck_adapter(x, wd, bd, wu, bu, None, True, shape.activation, SCALE),
                     [wd, bd, wu, bu])
    if impl == "pefttorch":
        # residual=x: the sequential adapter, x's two gradients formed in one buffer
        return Layer(lambda x: functional.bottleneck_adapter(x, wd, wu, bd, bu, residual=x,
                                                             activation=shape.activation, scale=SCALE),
                     [wd, bd, wu, bu])
    if impl == "adapters":
        import adapters
        from adapters.methods.modeling import Adapter

        config = adapters.BnConfig(mh_adapter=False, output_adapter=True, reduction_factor=shape.d / shape.bottleneck,
                                   non_linearity=_HF_ACTIVATION[shape.activation], scaling=SCALE)
        module = Adapter("bench", shape.d, shape.bottleneck, config).to(device=wd.device, dtype=wd.dtype)
        down, up = module.adapter_down[0], module.adapter_up
        with torch.no_grad():
            for p, src in ((down.weight, wd), (down.bias, bd), (up.weight, wu), (up.bias, bu)):
                p.copy_(src)
        module.train()
        return Layer(lambda x: module(x, residual_input=x)[0], [down.weight, down.bias, up.weight, up.bias],
                     [module])
    raise ValueError(f"unknown implementation {impl!r}; known: {', '.join(IMPLS)}")


def make_set(shape: AdapterShape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict:
    """x, dy and the adapter's weights, random at nn.Linear's scale: the up projection too (a trained adapter,
    not a freshly initialised one), so that the bottleneck's share of y is of the order of x's."""
    gen = torch.Generator(device="cpu").manual_seed(seed + shape.d * 31 + shape.bottleneck)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=gen) * scale).to(device=device, dtype=dtype).requires_grad_()

    w = {
        "x": randn(shape.tokens, shape.d),
        "w_down": randn(shape.bottleneck, shape.d, scale=shape.d**-0.5),
        "b_down": randn(shape.bottleneck, scale=0.1),
        "w_up": randn(shape.d, shape.bottleneck, scale=shape.bottleneck**-0.5),
        "b_up": randn(shape.d, scale=0.1),
    }
    w["dy"] = randn(shape.tokens, shape.d).detach()
    return w


def clone_set(w: dict) -> dict:
    return {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in w.items()}


def copies_needed(shape: AdapterShape, dtype: torch.dtype, device: torch.device, limit_bytes: int = 1 << 30) -> int:
    """Sets to cycle through: one round of forward+backward calls moves more than twice the cache; at most 64
    sets and limit_bytes of them in all."""
    per_call = floor_bytes(shape, "fwd+bwd", dtype)
    per_set = floor_bytes(shape, "fwd", dtype)  # x and dy, the weights
    wanted = math.ceil(2 * cache_bytes(device) / per_call)
    return max(1, min(wanted, 64, limit_bytes // per_set))


# ------------------------------------------------------------------------------------------------
# Accuracy


def accuracy_note(layer: Layer, w: dict, shape: AdapterShape) -> str:
    """'' if the layer's y and gradients (x and the four adapter tensors) on set w match the float64 oracle
    within 3x the plain computation's error in the same dtype, else which one does not, and by how much."""
    x, dy = w["x"], w["dy"]
    y = layer.call(x)
    want = [x, *layer.params]
    # allow_unused: an implementation that ignores a tensor gets a zero gradient, and fails the check
    grads = torch.autograd.grad(y, want, dy, allow_unused=True)
    got = [y, *(torch.zeros_like(t) if g is None else g for t, g in zip(want, grads, strict=True))]

    def ref(cast):  # the definition, in `cast`; the run's dtype gives the plain computation's error
        leaves = [w[k].detach().to(cast).requires_grad_() for k in ("x", "w_down", "b_down", "w_up", "b_up")]
        out = reference.bottleneck_adapter(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], None, True,
                                           shape.activation, SCALE)
        return [out.detach(), *torch.autograd.grad(out, leaves, dy.to(cast))]

    plain, oracle = ref(x.dtype), ref(torch.float64)
    for name, out, base, orc in zip(("y", *GRAD_NAMES), got, plain, oracle, strict=True):
        acc = check_accuracy(out.detach(), base, orc)
        if not acc.ok:
            return f"{name}: {acc}"
    return ""


# ------------------------------------------------------------------------------------------------
# Running


def run_shape(shape: AdapterShape, impls: list[str] | tuple[str, ...], dtype: torch.dtype, device: torch.device,
              bandwidth: Bandwidth, repeat: int = 50, copies: int | None = None,
              progress: Callable[[str], None] | None = None) -> list[Row]:
    """Checks and times every implementation on one shape, forward and forward+backward."""
    copies = copies_needed(shape, dtype, device) if copies is None else copies
    first = make_set(shape, dtype, device)
    sets = [first] + [clone_set(first) for _ in range(copies - 1)]
    rows: list[Row] = []
    for impl in impls:
        if progress:
            progress(f"{shape.label} {impl}")
        try:
            layers = [build(impl, shape, w) for w in sets]
            note = accuracy_note(layers[0], first, shape)
        except Exception as err:  # a broken implementation is a flagged row, not a crashed benchmark
            layers, note = None, f"failed: {type(err).__name__}: {err}"

        def fwd(layer, w):
            return layer.call(w["x"])

        def fwd_bwd(layer, w):
            return torch.autograd.grad(layer.call(w["x"]), [w["x"], *layer.params], w["dy"])

        for mode, step in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            row = Row(shape.label, shape.tokens, shape.d, shape.bottleneck, shape.activation, impl, mode,
                      ok=not note, note=note, floor_bytes=floor_bytes(shape, mode, dtype), copies=copies)
            row.floor_ms = row.floor_bytes / bandwidth.bytes_per_s * 1e3
            if layers is None:
                rows.append(row)
                continue
            nxt = itertools.cycle([functools.partial(step, layer, w) for layer, w in zip(layers, sets, strict=True)]
                                  ).__next__
            try:
                row.ms = time_ms(lambda nxt=nxt: nxt()(), device, repeat=repeat)
                peak = peak_memory_bytes(functools.partial(step, layers[0], first), device)
            except Exception as err:
                row.ok, row.note = False, f"failed: {type(err).__name__}: {err}"
            else:
                row.peak_mib = None if peak is None else peak / 2**20
                row.ratio_to_floor = row.ms / row.floor_ms
                row.effective_gbps = row.floor_bytes / (row.ms * 1e-3) / 1e9
                row.tokens_per_s = shape.tokens / (row.ms * 1e-3)
            rows.append(row)
        del layers
    _fill_ratios(rows)
    return rows


def _fill_ratios(rows: list[Row]) -> None:
    by = {(r.shape, r.mode, r.impl): r for r in rows}
    for r in rows:
        base = by.get((r.shape, r.mode, "torch"))
        if base and base.ms and r.ms:
            r.ratio_to_torch = r.ms / base.ms


def check_targets(rows: list[dict], device: torch.device) -> list[tuple[str, bool, str]]:
    """The issue's targets, where the run has the rows they speak of: (target, met, measured). pefttorch
    faster than torch (and than adapters, when it ran) at every shape and mode; on a GPU, pefttorch within
    1.3x of the traffic floor at every shape and mode (on the CPU see floor_note)."""
    out = []
    by = {(r["shape"], r["mode"], r["impl"]): r for r in rows}
    ours = [r for r in rows if r["impl"] == "pefttorch"]
    for rival in ("torch", "adapters"):
        pairs = [(r, by.get((r["shape"], r["mode"], rival))) for r in ours]
        pairs = [(r, o) for r, o in pairs if o is not None and o["ms"] is not None]
        if not pairs:
            continue
        slow = [f"{r['shape']} {r['mode']}" for r, o in pairs
                if not (r["ok"] and o["ok"] and r["ms"] is not None and r["ms"] < o["ms"])]
        worst = max((r["ms"] / o["ms"] for r, o in pairs if r["ms"] is not None), default=float("nan"))
        out.append((f"pefttorch faster than {rival} at every shape (fwd and fwd+bwd)", not slow,
                    f"slowest ratio {worst:.2f}x" + ("" if not slow else "; not at: " + "; ".join(slow))))
    if device.type == "cuda" and ours:
        far = [f"{r['shape']} {r['mode']}" for r in ours
               if not (r["ok"] and r["ratio_to_floor"] is not None and r["ratio_to_floor"] <= FLOOR_TARGET)]
        worst = max((r["ratio_to_floor"] for r in ours if r["ratio_to_floor"] is not None), default=float("nan"))
        out.append((f"pefttorch within {FLOOR_TARGET:g}x of the memory-traffic floor at every shape", not far,
                    f"worst {worst:.2f}x" + ("" if not far else "; not at: " + "; ".join(far))))
    return out


def floor_note(rows: list[dict], device: torch.device) -> str | None:
    """On the CPU, the floor target as information only (not counted): None on a GPU, where it is a target."""
    ours = [r for r in rows if r["impl"] == "pefttorch" and r["ratio_to_floor"] is not None]
    if device.type == "cuda" or not ours:
        return None
    within = sum(r["ok"] and r["ratio_to_floor"] <= FLOOR_TARGET for r in ours)
    worst = max(r["ratio_to_floor"] for r in ours)
    return (f"traffic floor (a GPU target, not counted on the CPU): pefttorch within {FLOOR_TARGET:g}x at "
            f"{within} of {len(ours)} rows, worst {worst:.2f}x")


def as_dicts(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]


# ------------------------------------------------------------------------------------------------
# Output


def _fmt(row: dict | None) -> str:
    if row is None:
        return "-"
    if row.get("ms") is None:
        return "[red]FAILED[/red]" if not row.get("ok", True) else "-"
    text = f"{row['ms']:.3f}"
    if row["impl"] != "torch" and row.get("ratio_to_torch") is not None:
        text += f" {row['ratio_to_torch']:.2f}x"
    if row.get("ratio_to_floor") is not None:
        text += f" {row['ratio_to_floor']:.1f}F"
    return text if row.get("ok", True) else f"[red]MISMATCH[/red] {text}"


def print_table(meta: dict, rows: list[dict], impls: list[str], bandwidth: Bandwidth, console=None) -> None:
    """One line per shape and mode: each implementation's ms, ratio to torch and ratio to the floor; the
    floor's time, pefttorch's effective bandwidth (floor bytes / time) and, on a GPU, peak memory; then the
    mismatches."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"bottleneck adapter (sequential, scale {SCALE:g}), {meta['dtype']} on {meta['device']} "
                        f"(torch {meta['torch']}, pefttorch {meta['pefttorch']}); each cell: ms (median), x = ratio "
                        f"to torch, F = ratio to the memory-traffic floor, timed at the measured copy bandwidth "
                        f"{bandwidth.gbps:.1f} GB/s of a {bandwidth.copy_bytes >> 20} MiB copy",
                  title_justify="left")
    cuda = any(r.get("peak_mib") is not None for r in rows)
    table.add_column("tokens x d:m act", no_wrap=True)
    table.add_column("pass", no_wrap=True)
    for impl in impls:
        table.add_column(impl, justify="right", no_wrap=True)
    for col in ("floor ms", "ours GB/s") + (("peak MiB torch/ours",) if cuda else ()):
        table.add_column(col, justify="right")
    by = {(r["shape"], r["mode"], r["impl"]): r for r in rows}
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for mode in MODES:
            some = next((by[(shape, mode, i)] for i in impls if (shape, mode, i) in by), None)
            if some is None:
                continue
            ours, base = by.get((shape, mode, "pefttorch")), by.get((shape, mode, "torch"))
            gbps = f"{ours['effective_gbps']:.1f}" if ours and ours.get("effective_gbps") else "-"
            peaks = "/".join(f"{r['peak_mib']:.0f}" if r and r.get("peak_mib") is not None else "-"
                             for r in (base, ours))
            table.add_row(shape, mode, *(_fmt(by.get((shape, mode, i))) for i in impls), f"{some['floor_ms']:.3f}",
                          gbps, *((peaks,) if cuda else ()))
    console.print(table)
    for row in rows:
        if not row.get("ok", True) and row["mode"] == "fwd":  # one line per implementation and shape
            console.print(f"[red]mismatch[/red] {row['impl']} at {row['shape']}: {row['note']}")


def plot(path: Path, meta: dict, rows: list[dict], impls: list[str] | None = None) -> None:
    """Top: time relative to the torch baseline per shape, one bar per implementation. Bottom: time relative
    to the memory-traffic floor (the 1.3x target dashed). Forward left, forward+backward right; hatched red =
    mismatch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import save_figure

    impls = list(impls or dict.fromkeys(r["impl"] for r in rows))
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    by = {(r["shape"], r["mode"], r["impl"]): r for r in rows}
    fig, axes = plt.subplots(2, 2, figsize=(max(10, 0.9 * len(shapes) * len(impls)), 8), sharex=True)
    for col, mode in enumerate(MODES):
        for row_ax, (key, shown, label) in enumerate(
                (("ratio_to_torch", [i for i in impls if i != "torch"], "time / torch"),
                 ("ratio_to_floor", impls, "time / traffic floor"))):
            ax = axes[row_ax][col]
            width = 0.8 / max(1, len(shown))
            for k, impl in enumerate(shown):
                xs, ys, bad = [], [], []
                for s, shape in enumerate(shapes):
                    r = by.get((shape, mode, impl))
                    if r and r.get(key) is not None:
                        xs.append(s + (k - (len(shown) - 1) / 2) * width)
                        ys.append(r[key])
                        bad.append(not r.get("ok", True))
                bars = ax.bar(xs, ys, width, label=impl, color=f"C{impls.index(impl)}")
                for bar, b in zip(bars, bad, strict=True):
                    if b:
                        bar.set_hatch("xx")
                        bar.set_edgecolor("red")
            ax.axhline(1.0, color="black", linewidth=0.8)
            if key == "ratio_to_floor":
                ax.axhline(FLOOR_TARGET, color="red", linewidth=0.8, linestyle="--", label=f"{FLOOR_TARGET:g}x target")
            ax.set_ylabel(f"{mode}: {label}")
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=7)
        axes[1][col].set_xticks(range(len(shapes)), shapes, rotation=30, ha="right", fontsize=8)
    fig.suptitle(f"bottleneck adapter, {meta['dtype']} on {meta['device']}, torch {meta['torch']}, commit "
                 f"{meta.get('commit')}; lower is better, hatched = mismatch", fontsize=9)
    save_figure(fig, path)
