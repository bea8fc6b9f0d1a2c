"""The sparse-activation MLP benchmark (DEFT inference): pefttorch.functional.sparse_mlp against the dense
MLP in plain PyTorch (the bound to beat: the F.linear chain HF runs) and the masked reference, at decode
sizes (a few tokens).

Density: for each MLP, token count and target density, the threshold is the quantile of the activations
that leaves that share of the neurons active for at least one token: the neurons whose up and down rows
the kernels read, so what their cost follows. The achieved density (and the mean share per token) is
reported with each row.

Every implementation of a row shares one set of weights, one input and one threshold, and is checked
before it is timed (a mismatch is flagged, never shown as a win): against a float64 oracle computed with
the implementation's own mask, which is read back by running it with the identity as the down projection,
and which may differ from the exact mask only at activations within rounding of the threshold.

Decode reads every weight once per call, so a layer whose weights stay in the cache between calls would
be timed faster than it runs in a model: the timed calls cycle through enough copies of the weights to
exceed twice the last-level cache (the GPU's L2).
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import functional, reference
from ..testing import check_accuracy
from .timing import time_ms

IMPLS = ("dense", "reference", "pefttorch")
IMPL_HELP = {
    "dense": "the dense MLP in plain PyTorch (F.linear chain, what HF runs), the bound to beat",
    "reference": "pefttorch.reference.sparse_mlp: the masked MLP, computed densely",
    "pefttorch": "pefttorch.functional.sparse_mlp: kernels that skip the inactive neurons",
}
TOKENS = (1, 4, 16)
DENSITIES = (0.05, 0.1, 0.25, 0.5, 1.0)
ACTIVATIONS = tuple(reference.ACTIVATIONS)


@dataclass(frozen=True)
class MLPShape:
    hidden: int
    inter: int
    out: int
    activation: str
    gated: bool  # Llama-style: act(x W_gate^T) * (x W_up^T)
    bias: bool  # BERT-style: biases on every projection

    @property
    def label(self) -> str:
        return (f"{self.hidden}->{self.inter}->{self.out} {self.activation}" + (" gated" if self.gated else "")
                + (" bias" if self.bias else ""))

    @classmethod
    def parse(cls, text: str) -> MLPShape:
        """'4096x11008:silu:gated', '1024x4096:gelu:bias', '512x2048x256:relu' (HIDDENxINTER[xOUT]:ACTIVATION
        [:gated][:bias]; OUT defaults to HIDDEN)."""
        m = re.fullmatch(rf"(\d+)x(\d+)(?:x(\d+))?:({'|'.join(ACTIVATIONS)})((?::(?:gated|bias))*)", text.strip())
        if not m:
            raise ValueError(f"bad MLP shape {text!r}: expected HIDDENxINTER[xOUT]:ACTIVATION[:gated][:bias] with "
                             f"ACTIVATION one of {', '.join(ACTIVATIONS)}, e.g. 4096x11008:silu:gated")
        hidden, inter, out, act, flags = m.groups()
        flags = flags.split(":")[1:]
        if min(int(hidden), int(inter), int(out or hidden)) < 1:
            raise ValueError(f"bad MLP shape {text!r}: the sizes must be >= 1")
        return cls(int(hidden), int(inter), int(out or hidden), act, "gated" in flags, "bias" in flags)


LLAMA = MLPShape(4096, 11008, 4096, "silu", gated=True, bias=False)  # Llama-2 7B
BERT = MLPShape(1024, 4096, 1024, "gelu", gated=False, bias=True)  # BERT-large
CPU_GATED = MLPShape(1024, 2752, 1024, "silu", gated=True, bias=False)
CPU_BERT = MLPShape(384, 1536, 384, "gelu", gated=False, bias=True)  # MiniLM-L12


def default_grid(device: torch.device, quick: bool) -> tuple[list[MLPShape], tuple[int, ...], tuple[float, ...]]:
    """(shapes, token counts, target densities): Llama and BERT MLPs on a GPU, smaller ones on the CPU;
    quick: fewer of each (a few seconds on a CPU)."""
    if device.type == "cuda":
        return ([LLAMA, BERT], (1, 16), (0.1, 0.5, 1.0)) if quick else ([LLAMA, BERT], TOKENS, DENSITIES)
    return ([CPU_GATED], (1, 16), (0.1, 0.5)) if quick else ([CPU_GATED, CPU_BERT], TOKENS, DENSITIES)


@dataclass
class Row:
    shape: str
    hidden: int
    inter: int
    out: int
    activation: str
    gated: bool
    bias: bool
    tokens: int
    impl: str
    target_density: float | None = None  # None for the dense MLP, which computes every neuron
    density: float | None = None  # achieved: share of the neurons active for at least one token
    token_density: float | None = None  # mean over the tokens of the share of neurons active for it
    threshold: float | None = None
    ms: float | None = None
    ok: bool = True
    note: str = ""
    speedup_vs_dense: float | None = None  # dense ms / ms
    tokens_per_s: float | None = None
    weight_copies: int = 1  # weight copies the timed calls cycle through (see the module's doc)


# ------------------------------------------------------------------------------------------------
# The implementations: call(w, x, threshold) on a weight set w (see make_weights)


def _dense(w: dict, x: torch.Tensor, shape: MLPShape, threshold: float) -> torch.Tensor:
    act = reference.ACTIVATIONS[shape.activation]
    h = act(F.linear(x, w["w_in"], w["b_in"]))
    if w["w_up"] is not None:
        h = h * F.linear(x, w["w_up"], w["b_up"])
    return F.linear(h, w["w_down"], w["b_down"])


def _reference(w: dict, x: torch.Tensor, shape: MLPShape, threshold: float) -> torch.Tensor:
    return reference.sparse_mlp(x, w["w_in"], w["b_in"], w["w_up"], w["b_up"], w["w_down_t"], w["b_down"],
                                shape.activation, threshold)


def _pefttorch(w: dict, x: torch.Tensor, shape: MLPShape, threshold: float) -> torch.Tensor:
    return functional.sparse_mlp(x, w["w_in"], w["w_down_t"], b_in=w["b_in"], w_up=w["w_up"], b_up=w["b_up"],
                                 b_down=w["b_down"], activation=shape.activation, threshold=threshold)


CALLS: dict[str, Callable[[dict, torch.Tensor, MLPShape, float], torch.Tensor]] = {
    "dense": _dense, "reference": _reference, "pefttorch": _pefttorch}


def make_weights(shape: MLPShape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict:
    """Random weights at nn.Linear's scale; the down projection both as nn.Linear stores it (w_down, for the
    dense MLP) and transposed (w_down_t, stored so once, outside the timed calls, as pefttorch wants it)."""
    gen = torch.Generator(device="cpu").manual_seed(seed + shape.hidden * 31 + shape.inter)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=gen) * scale).to(device=device, dtype=dtype)

    w = {
        "w_in": randn(shape.inter, shape.hidden, scale=shape.hidden**-0.5),
        "b_in": randn(shape.inter, scale=0.1) if shape.bias else None,
        "w_up": randn(shape.inter, shape.hidden, scale=shape.hidden**-0.5) if shape.gated else None,
        "b_up": randn(shape.inter, scale=0.1) if shape.gated and shape.bias else None,
        "w_down": randn(shape.out, shape.inter, scale=shape.inter**-0.5),
        "b_down": randn(shape.out, scale=0.1) if shape.bias else None,
    }
    w["w_down_t"] = w["w_down"].t().contiguous()
    return w


def _exact(w: dict, x: torch.Tensor, shape: MLPShape) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, h) in float64 from the same (rounded) inputs: the gate activation and the unmasked hidden."""
    d = {k: None if w[k] is None else w[k].double() for k in ("w_in", "b_in", "w_up", "b_up")}
    g = reference.ACTIVATIONS[shape.activation](F.linear(x.double(), d["w_in"], d["b_in"]))
    h = g * F.linear(x.double(), d["w_up"], d["b_up"]) if d["w_up"] is not None else g
    return g, h


def choose_threshold(g: torch.Tensor, density: float, dtype: torch.dtype) -> float:
    """The threshold that leaves round(density * neurons) neurons with |g| above it for at least one token:
    halfway between that neuron's largest |g| and the next one's, rounded to the precision the kernels
    compare in (float32 at least). 0 at density 1."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"target density must be in (0, 1], got {density}")
    m = g.abs().amax(0).sort(descending=True).values
    k = max(1, round(density * m.numel()))
    if k >= m.numel():
        return 0.0
    compare_dtype = torch.promote_types(dtype, torch.float32)
    return float(torch.tensor((m[k - 1] + m[k]).item() / 2, dtype=torch.float64).to(compare_dtype))


# ------------------------------------------------------------------------------------------------
# Accuracy

# Relative slack of the gate comparison per dtype: an activation within this of the threshold may be
# decided either way (rounding of the projection and of the activation function, several ulps).
GATE_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2**-5, torch.float16: 2**-8}


def accuracy_note(call: Callable[[dict, torch.Tensor, MLPShape, float], torch.Tensor], w: dict, x: torch.Tensor,
                  shape: MLPShape, threshold: float | None) -> str:
    """'' if `call` computes the MLP masked at `threshold` (None: the dense MLP), else why not.

    The implementation's mask is read back by running it with the identity as the down projection (its
    output is then the masked hidden). It must agree with the exact mask (|g| > threshold, float64)
    except at activations within rounding of the threshold, which a low-precision gate may decide either
    way; the output must then match a float64 oracle with that mask, within 3x the error of the plain
    computation in the same dtype (pefttorch.testing.check_accuracy).
    """
    dtype = x.dtype
    g64, h64 = _exact(w, x, shape)
    if threshold is None:
        mask = torch.ones_like(g64, dtype=torch.bool)
    else:
        probe = {**w, "w_down_t": torch.eye(shape.inter, dtype=dtype, device=x.device), "b_down": None}
        probe["w_down"] = probe["w_down_t"]
        mask = call(probe, x, shape, threshold).double() != 0
        exact = g64.abs() > threshold
        slack = GATE_RTOL[dtype] * (g64.abs().clamp(min=threshold) + 1e-3 * g64.abs().max())
        wrong = (mask != exact) & ((g64.abs() - threshold).abs() > slack)
        if wrong.any():
            t, i = (int(v) for v in wrong.nonzero()[0])
            return (f"mask: {int(wrong.sum())} of {wrong.numel()} activations decided against the threshold "
                    f"{threshold:.4g} (e.g. token {t} neuron {i}: |act| = {g64[t, i].abs().item():.4g}, "
                    f"{'kept' if mask[t, i] else 'dropped'})")
    y = call(w, x, shape, threshold if threshold is not None else 0.0)
    wd64 = w["w_down_t"].double()
    oracle = (h64 * mask) @ wd64
    act = reference.ACTIVATIONS[shape.activation]
    h = act(F.linear(x, w["w_in"], w["b_in"]))
    if w["w_up"] is not None:
        h = h * F.linear(x, w["w_up"], w["b_up"])
    plain = (h * mask) @ w["w_down_t"]
    if w["b_down"] is not None:
        oracle, plain = oracle + w["b_down"].double(), plain + w["b_down"]
    acc = check_accuracy(y, plain, oracle)
    return "" if acc.ok else f"y: {acc}"


# ------------------------------------------------------------------------------------------------
# Running


def cache_bytes(device: torch.device) -> int:
    """The cache the weights must not fit in: the GPU's L2, or the CPU's last-level cache."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 << 20)
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        m = re.fullmatch(r"(\d+)([KMG]?)", path.read_text().strip())
        if m:
            sizes.append(int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)])
    return max(sizes, default=32 << 20)


def weight_copies(shape: MLPShape, dtype: torch.dtype, device: torch.device, limit_bytes: int = 2 << 30) -> int:
    """Copies of the weights to cycle through: what one call reads, over all copies, exceeds twice the
    cache; at most 128 copies and limit_bytes in all."""
    size = torch.empty((), dtype=dtype).element_size()
    per_call = ((1 + shape.gated) * shape.hidden + shape.out) * shape.inter * size
    per_copy = per_call + shape.out * shape.inter * size  # the down projection is kept in both layouts
    wanted = math.ceil(2 * cache_bytes(device) / per_call)
    return max(1, min(wanted, 128, limit_bytes // per_copy))


def run_shape(shape: MLPShape, tokens_list: tuple[int, ...] | list[int], densities: tuple[float, ...] | list[float],
              dtype: torch.dtype, device: torch.device, repeat: int = 50, impls: tuple[str, ...] = IMPLS,
              copies: int | None = None, progress: Callable[[str], None] | None = None) -> list[Row]:
    """Checks and times the implementations on one MLP: a dense row per token count, a reference and a
    pefttorch row per token count and target density."""
    w = make_weights(shape, dtype, device)
    copies = weight_copies(shape, dtype, device) if copies is None else copies
    sets = [w] + [{k: None if v is None else v.clone() for k, v in w.items()} for _ in range(copies - 1)]
    gen = torch.Generator(device="cpu").manual_seed(shape.hidden + 7919)
    rows: list[Row] = []
    for tokens in tokens_list:
        x = torch.randn(tokens, shape.hidden, generator=gen).to(device=device, dtype=dtype)
        g64, _ = _exact(w, x, shape)
        base = dict(shape=shape.label, hidden=shape.hidden, inter=shape.inter, out=shape.out,
                    activation=shape.activation, gated=shape.gated, bias=shape.bias, tokens=tokens,
                    weight_copies=copies)
        jobs = [("dense", None)] if "dense" in impls else []
        jobs += [(impl, d) for d in densities for impl in impls if impl != "dense"]
        for impl, density in jobs:
            row = Row(impl=impl, target_density=density, **base)
            threshold = None
            if density is not None:
                threshold = choose_threshold(g64, density, dtype)
                active = g64.abs() > threshold
                row.threshold, row.density = threshold, active.any(0).double().mean().item()
                row.token_density = active.double().mean().item()
            else:
                row.density = row.token_density = 1.0
            if progress:
                progress(f"{shape.label} {tokens} tok {impl}" + (f" d={density:g}" if density is not None else ""))
            call = CALLS[impl]
            with torch.inference_mode():
                try:
                    row.note = accuracy_note(call, w, x, shape, threshold)
                except Exception as err:  # a broken implementation is a flagged row, not a crashed benchmark
                    row.note = f"failed: {type(err).__name__}: {err}"
                row.ok = not row.note
                nxt = itertools.cycle([functools.partial(call, s, x, shape, threshold or 0.0) for s in sets]).__next__
                try:
                    row.ms = time_ms(lambda nxt=nxt: nxt()(), device, repeat=repeat)
                except Exception as err:
                    row.ok, row.note = False, f"failed: {type(err).__name__}: {err}"
                else:
                    row.tokens_per_s = tokens / (row.ms * 1e-3)
            rows.append(row)
    del sets
    _fill_speedups(rows)
    return rows


def _fill_speedups(rows: list[Row]) -> None:
    dense = {(r.shape, r.tokens): r for r in rows if r.impl == "dense"}
    for r in rows:
        d = dense.get((r.shape, r.tokens))
        if d and d.ms and r.ms:
            r.speedup_vs_dense = d.ms / r.ms


def crossover(rows: list[dict], impl: str = "pefttorch") -> list[dict]:
    """Per MLP and token count: the highest target density up to which `impl` beats the dense MLP at every
    measured density (None: not even at the lowest), and the speed-up at each density."""
    out = []
    for key in dict.fromkeys((r["shape"], r["tokens"]) for r in rows):
        ours = sorted((r for r in rows if (r["shape"], r["tokens"]) == key and r["impl"] == impl
                       and r["target_density"] is not None), key=lambda r: r["target_density"])
        if not ours:
            continue
        faster_up_to = None
        for r in ours:
            if not (r["ok"] and r["speedup_vs_dense"] and r["speedup_vs_dense"] > 1.0):
                break
            faster_up_to = r["target_density"]
        out.append({"shape": key[0], "tokens": key[1], "impl": impl, "faster_up_to": faster_up_to,
                    "speedups": {str(r["target_density"]): r["speedup_vs_dense"] for r in ours}})
    return out


# The targets for the gated Llama MLP at 1 token in bf16: (density, minimum speed-up over dense)
TARGETS = ((0.1, 3.0), (0.5, 1.3), (1.0, 1 / 1.1))


def check_targets(rows: list[dict], dtype: torch.dtype) -> list[tuple[str, bool, str]]:
    """The issue's targets, where the run has the rows they speak of: (target, met, measured)."""
    out = []
    if dtype != torch.bfloat16:
        return out
    by = {(r["shape"], r["tokens"], r["target_density"]): r for r in rows if r["impl"] == "pefttorch"}
    for density, least in TARGETS:
        r = by.get((LLAMA.label, 1, density))
        if r is None or r["speedup_vs_dense"] is None:
            continue
        what = f">= {least:g}x dense" if least >= 1 else f"no slower than {1 / least:g}x dense"
        out.append((f"{LLAMA.label}, 1 token, {density:.0%} density: {what}",
                    r["ok"] and r["speedup_vs_dense"] >= least, f"{r['speedup_vs_dense']:.2f}x"))
    return out


def as_dicts(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]


# ------------------------------------------------------------------------------------------------
# Output


def _fmt(row: dict | None) -> str:
    if row is None or row.get("ms") is None:
        return "-" if row is None or row.get("ok", True) else "[red]FAILED[/red]"
    text = f"{row['ms']:.3f}"
    if row["impl"] != "dense" and row.get("speedup_vs_dense") is not None:
        text += f" ({row['speedup_vs_dense']:.2f}x)"
    return text if row.get("ok", True) else f"[red]MISMATCH[/red] {text}"


def _tokens(n: int) -> str:
    return f"{n} token" + ("" if n == 1 else "s")


def print_table(meta: dict, rows: list[dict], console=None) -> None:
    """One line per MLP, token count and density: the time of each implementation (speed-up over the
    dense MLP), the achieved density, pefttorch's tokens/s; then the crossover and the mismatches."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    copies = sorted({r["weight_copies"] for r in rows})
    table = Table(title=f"sparse MLP (DEFT) at decode, {meta['dtype']} on {meta['device']} (torch {meta['torch']}, "
                        f"pefttorch {meta['pefttorch']}); ms, median; (x) = speed-up over dense; density: the "
                        "target, and the share of neurons achieved active for any token / per token; weights cycled "
                        f"through {'/'.join(map(str, copies))} copies (out of cache)", title_justify="left")
    table.add_column("MLP", no_wrap=True)
    for col in ("tokens", "density", "achieved any/tok", "threshold", "dense ms", "reference ms", "pefttorch ms",
                "ours tok/s"):
        table.add_column(col, justify="right", no_wrap=not col.endswith("ms"))
    by = {(r["shape"], r["tokens"], r["target_density"], r["impl"]): r for r in rows}
    keys = dict.fromkeys((r["shape"], r["tokens"], r["target_density"]) for r in rows
                         if r["target_density"] is not None)
    for shape, tokens, density in keys:
        dense = by.get((shape, tokens, None, "dense"))
        ref, ours = by.get((shape, tokens, density, "reference")), by.get((shape, tokens, density, "pefttorch"))
        some = ours or ref
        achieved = f"{some['density']:.3f} / {some['token_density']:.3f}" if some else "-"
        thr = f"{some['threshold']:.4g}" if some else "-"
        tps = f"{ours['tokens_per_s']:,.0f}" if ours and ours.get("tokens_per_s") else "-"
        table.add_row(shape, str(tokens), f"{density:g}", achieved, thr, _fmt(dense), _fmt(ref), _fmt(ours), tps)
    console.print(table)
    for c in crossover(rows):
        up_to = "not at any measured density" if c["faster_up_to"] is None else f"up to density {c['faster_up_to']:g}"
        console.print(f"pefttorch faster than dense at {c['shape']}, {_tokens(c['tokens'])}: {up_to}")
    for row in rows:
        if not row.get("ok", True):
            density = "" if row["target_density"] is None else f" density {row['target_density']:g}"
            console.print(f"[red]mismatch[/red] {row['impl']} at {row['shape']}, {_tokens(row['tokens'])}{density}: "
                          f"{row['note']}")


def plot(path: Path, meta: dict, rows: list[dict], _impls=None) -> None:
    """Speed-up over the dense MLP against the achieved density, one panel per MLP, one line per token
    count (solid: pefttorch, dashed: the masked reference); red crosses mark mismatches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4.2), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        for k, tokens in enumerate(dict.fromkeys(r["tokens"] for r in rows if r["shape"] == shape)):
            for impl, style in (("pefttorch", "-o"), ("reference", "--")):
                pts = sorted((r["density"], r["speedup_vs_dense"], r["ok"]) for r in rows
                             if r["shape"] == shape and r["tokens"] == tokens and r["impl"] == impl
                             and r["speedup_vs_dense"] is not None)
                if not pts:
                    continue
                xs, ys, oks = zip(*pts, strict=True)
                ax.plot(xs, ys, style, color=f"C{k}", markersize=4, alpha=1.0 if impl == "pefttorch" else 0.5,
                        label=f"{impl}, {_tokens(tokens)}")
                bad = [(x, y) for x, y, ok in pts if not ok]
                if bad:
                    ax.plot(*zip(*bad, strict=True), "x", color="red", markersize=9, markeredgewidth=2)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel("density (share of neurons active for any token)")
        ax.set_ylabel("speed-up over the dense MLP")
        ax.set_title(shape, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"sparse MLP at decode, {meta['dtype']} on {meta['device']}\ntorch {meta['torch']}, commit "
                 f"{meta.get('commit')}; higher is better, red x = mismatch", fontsize=9)
    from .report import save_figure

    save_figure(fig, path)
