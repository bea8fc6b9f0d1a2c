"""The LoRA layer benchmark: pefttorch against the frozen base layer (the floor), HF PEFT and plain PyTorch.

Every implementation of a row shares one set of weights and one input, is checked against the
reference before it is timed (a mismatch is flagged, never shown as a win), and is timed side by side
with the others in the same process.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops, reference
from ..nn import LoRALinear
from ..testing import check_accuracy
from .timing import peak_memory_bytes, time_ms

MODES = ("fwd", "fwd+bwd")
IMPLS = ("base", "torch", "peft", "peft-model-dtype", "pefttorch")
IMPL_HELP = {
    "base": "frozen nn.Linear, the floor a LoRA layer can reach",
    "torch": "unfused PyTorch: three GEMMs and torch dropout",
    "peft": "HF PEFT LoRA with its defaults (adapter weights in fp32 for 16-bit models)",
    "peft-model-dtype": "HF PEFT LoRA with adapter weights in the model dtype (autocast_adapter_dtype=False)",
    "pefttorch": "pefttorch.nn.LoRALinear (fused kernels)",
}


@dataclass(frozen=True)
class Shape:
    tokens: int
    in_features: int
    out_features: int
    r: int
    dropout: float

    @property
    def label(self) -> str:
        return f"{self.tokens}x{self.in_features}->{self.out_features} r{self.r} p{self.dropout:g}"

    @classmethod
    def parse(cls, text: str) -> Shape:
        """'8192x4096x4096r16p0.1' (tokens x in x out, rank, dropout; 'p...' optional)."""
        m = re.fullmatch(r"(\d+)x(\d+)x(\d+)r(\d+)(?:p([\d.]+))?", text.strip())
        if not m:
            raise ValueError(f"bad shape {text!r}: expected TOKENSxINxOUTrRANK[pDROPOUT], e.g. 8192x4096x4096r16p0.1")
        t, i, o, r, p = m.groups()
        shape = cls(int(t), int(i), int(o), int(r), float(p or 0.0))
        if min(shape.tokens, shape.in_features, shape.out_features, shape.r) < 1 or shape.dropout >= 1:
            raise ValueError(f"bad shape {text!r}: tokens, in, out and rank must be >= 1, dropout below 1")
        return shape


def default_shapes(device: torch.device, quick: bool) -> list[Shape]:
    if device.type == "cuda":
        if quick:
            return [Shape(8192, 4096, 4096, 16, p) for p in (0.0, 0.1)]
        grid = itertools.product((1024, 8192), ((4096, 4096), (4096, 11008)), (16, 64), (0.0, 0.1))
        return [Shape(t, i, o, r, p) for t, (i, o), r, p in grid]
    # CPU: the same structure at sizes a laptop runs in about a minute.
    if quick:
        return [Shape(256, 512, 512, 16, p) for p in (0.0, 0.1)]
    return [Shape(t, 1024, o, 16, p) for t in (256, 1024) for o in (1024, 2816) for p in (0.0, 0.1)]


@dataclass
class Row:
    shape: str
    tokens: int
    in_features: int
    out_features: int
    r: int
    dropout: float
    impl: str
    mode: str
    ms: float | None = None
    peak_mib: float | None = None
    ok: bool = True
    note: str = ""
    ratio_to_base: float | None = None
    speedup_vs_peft: float | None = None
    tokens_per_s: float | None = None


@dataclass
class Layer:
    """One implementation built on the shared weights: call() runs forward, grads() are what backward
    must produce, eval_call() runs it with dropout off (for the accuracy check)."""

    call: Callable[[torch.Tensor], torch.Tensor]
    grad_inputs: list[torch.Tensor]
    eval_call: Callable[[torch.Tensor], torch.Tensor]
    keep: list = field(default_factory=list)  # modules kept alive


def _peft_available() -> str | None:
    try:
        import peft  # noqa: F401
    except ImportError:
        return "HF PEFT is not installed (pip install peft): its rows are skipped"
    return None


class _Wrap(nn.Module):
    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def _in_eval_mode(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """module's forward with dropout off (eval mode), leaving it in train mode afterwards."""

    def call(x):
        module.eval()
        try:
            return module(x)
        finally:
            module.train()

    return call


def build(impl: str, shape: Shape, w: dict, dtype: torch.dtype, device: torch.device) -> Layer:
    """Builds `impl` on the weights in w (weight, bias, lora_A, lora_B) and scaling w['scaling']."""
    scaling = w["scaling"]

    def linear() -> nn.Linear:
        lin = nn.Linear(shape.in_features, shape.out_features, device=device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(w["weight"])
            lin.bias.copy_(w["bias"])
        lin.requires_grad_(False)
        return lin

    if impl == "base":
        lin = linear()
        return Layer(lin, [], lin, [lin])
    if impl == "torch":
        a = w["lora_A"].clone().requires_grad_()
        b = w["lora_B"].clone().requires_grad_()
        W, bias = w["weight"], w["bias"]

        def torch_lora(x, p=shape.dropout):
            return F.linear(x, W, bias) + scaling * F.linear(F.linear(F.dropout(x, p), a), b)

        return Layer(torch_lora, [a, b], lambda x: torch_lora(x, 0.0))
    if impl in ("peft", "peft-model-dtype"):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=shape.r, lora_alpha=scaling * shape.r, lora_dropout=shape.dropout,
                            target_modules=["lin"])
        model = get_peft_model(_Wrap(linear()), config, autocast_adapter_dtype=(impl == "peft"))
        lora = model.base_model.model.lin
        with torch.no_grad():
            lora.lora_A["default"].weight.copy_(w["lora_A"])
            lora.lora_B["default"].weight.copy_(w["lora_B"])
        params = [lora.lora_A["default"].weight, lora.lora_B["default"].weight]
        return Layer(model.train(), params, _in_eval_mode(model), [model])
    if impl == "pefttorch":
        layer = LoRALinear.from_linear(linear(), r=shape.r, lora_alpha=scaling * shape.r,
                                       lora_dropout=shape.dropout)
        with torch.no_grad():
            layer.lora_A.copy_(w["lora_A"])
            layer.lora_B.copy_(w["lora_B"])
        return Layer(layer.train(), [layer.lora_A, layer.lora_B], _in_eval_mode(layer), [layer])
    raise ValueError(f"unknown implementation {impl!r}; known: {', '.join(IMPLS)}")


def _accuracy_note(layer: Layer, impl: str, x: torch.Tensor, w: dict, dtype: torch.dtype, shape: Shape,
                   check_tokens: int) -> str:
    """'' if the implementation matches the reference (dropout off) on the first rows of x, else why not."""
    xs = x[:check_tokens].detach().requires_grad_()
    g = torch.randn(xs.shape[0], shape.out_features, device=x.device, dtype=dtype)
    y = layer.eval_call(xs)
    want = [xs, *layer.grad_inputs]
    # allow_unused: an implementation that ignores a parameter gets a zero gradient, and fails the check
    grads = torch.autograd.grad(y, want, g, allow_unused=True)
    got = [y, *(torch.zeros_like(t) if gr is None else gr for t, gr in zip(want, grads, strict=True))]

    def ref(cast):
        leaves = [xs.detach().to(cast).requires_grad_(), w["weight"].to(cast), w["lora_A"].to(cast).requires_grad_(),
                  w["lora_B"].to(cast).requires_grad_(), w["bias"].to(cast)]
        out = reference.lora_linear(*leaves, scaling=w["scaling"])
        grads = torch.autograd.grad(out, [leaves[0], leaves[2], leaves[3]] if impl != "base" else [leaves[0]],
                                    g.to(cast))
        return [out, *grads]

    if impl == "base":  # the floor computes only the base layer: compare it with that
        base_out = F.linear(xs, w["weight"], w["bias"])
        base_64 = F.linear(xs.double(), w["weight"].double(), w["bias"].double())
        acc = check_accuracy(y, base_out, base_64)
        return "" if acc.ok else f"y: {acc}"
    plain, oracle = ref(dtype), ref(torch.float64)
    for name, out, base, orc in zip(("y", "dx", "dA", "dB"), got, plain, oracle, strict=True):
        acc = check_accuracy(out.to(dtype), base, orc)
        if not acc.ok:
            return f"{name}: {acc}"
    if impl == "pefttorch" and shape.dropout > 0:
        return _pefttorch_dropout_note(xs, w, g, shape, dtype)
    return ""


def _pefttorch_dropout_note(xs, w, g, shape: Shape, dtype) -> str:
    """pefttorch with dropout on, against the reference drawing the same mask from the same seed."""
    seed = 20240917
    leaves = [xs.detach().requires_grad_(), w["weight"], w["lora_A"].clone().requires_grad_(),
              w["lora_B"].clone().requires_grad_(), w["bias"]]
    y, _ = ops.lora_linear_forward(*leaves, w["scaling"], shape.dropout, torch.tensor(seed))
    got = [y, *torch.autograd.grad(y, [leaves[0], leaves[2], leaves[3]], g)]

    def ref(cast):
        lv = [t.detach().to(cast).requires_grad_(t.requires_grad) for t in leaves]
        out = reference.lora_linear(*lv, scaling=w["scaling"], dropout_p=shape.dropout, seed=seed)
        return [out, *torch.autograd.grad(out, [lv[0], lv[2], lv[3]], g.to(cast))]

    for name, out, base, orc in zip(("y", "dx", "dA", "dB"), got, ref(dtype), ref(torch.float64), strict=True):
        acc = check_accuracy(out, base, orc)
        if not acc.ok:
            return f"{name} with dropout: {acc}"
    return ""


def run_shape(shape: Shape, impls: list[str], dtype: torch.dtype, device: torch.device, repeat: int,
              check_tokens: int = 256, progress: Callable[[str], None] | None = None) -> list[Row]:
    """Checks and times every implementation on one shape; rows for both modes."""
    gen = torch.Generator(device="cpu").manual_seed(shape.tokens * 7919 + shape.in_features + shape.r)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=gen) * scale).to(device=device, dtype=dtype)

    w = {
        "weight": randn(shape.out_features, shape.in_features, scale=shape.in_features**-0.5),
        "bias": randn(shape.out_features, scale=0.1),
        "lora_A": randn(shape.r, shape.in_features, scale=shape.in_features**-0.5),
        # non-zero B (trained, not freshly initialised): the low-rank path shows in the output
        "lora_B": randn(shape.out_features, shape.r, scale=shape.r**-0.5),
        "scaling": 2.0,
    }
    x = randn(shape.tokens, shape.in_features).requires_grad_()
    g = randn(shape.tokens, shape.out_features)
    rows = []
    for impl in impls:
        if progress:
            progress(f"{shape.label} {impl}")
        layer = build(impl, shape, w, dtype, device)
        try:
            note = _accuracy_note(layer, impl, x, w, dtype, shape, check_tokens)
        except Exception as err:  # a broken implementation is a flagged row, not a crashed benchmark
            note = f"failed: {type(err).__name__}: {err}"
        inputs = [x, *layer.grad_inputs]

        def fwd(call=layer.call):
            return call(x)

        def fwd_bwd(call=layer.call, inputs=inputs):
            return torch.autograd.grad(call(x), inputs, g)

        for mode, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            row = Row(shape.label, shape.tokens, shape.in_features, shape.out_features, shape.r, shape.dropout,
                      impl, mode, ok=not note, note=note)
            try:
                row.ms = time_ms(fn, device, repeat=repeat)
                peak = peak_memory_bytes(fn, device)
            except Exception as err:
                row.ok, row.note = False, f"failed: {type(err).__name__}: {err}"
            else:
                row.peak_mib = None if peak is None else peak / 2**20
                row.tokens_per_s = shape.tokens / (row.ms * 1e-3)
            rows.append(row)
    _fill_ratios(rows)
    return rows


def _fill_ratios(rows: list[Row]) -> None:
    by = {(r.shape, r.mode, r.impl): r for r in rows}
    for r in rows:
        base = by.get((r.shape, r.mode, "base"))
        peft = by.get((r.shape, r.mode, "peft"))
        if base and base.ms and r.ms:
            r.ratio_to_base = r.ms / base.ms
        if peft and peft.ms and r.ms and peft.ok:
            r.speedup_vs_peft = peft.ms / r.ms


def check_targets(rows: list[Row], dtype: torch.dtype) -> list[tuple[str, bool, str]]:
    """The issue's targets, where the run has the rows they speak of: (target, met, measured)."""
    out = []
    by = {(r.shape, r.mode, r.impl): r for r in rows}
    for p in (0.0, 0.1):
        label = Shape(8192, 4096, 4096, 16, p).label
        ours, base = by.get((label, "fwd+bwd", "pefttorch")), by.get((label, "fwd+bwd", "base"))
        if ours and base and dtype == torch.bfloat16:
            ratio = ours.ms / base.ms
            out.append((f"{label} bf16 fwd+bwd <= 1.25x base", ours.ok and ratio <= 1.25, f"{ratio:.3f}x"))
            if ours.peak_mib is not None and base.peak_mib is not None:
                x_s = (8192 * 4096 + 8192 * 16) * 2 / 2**20
                allowed = base.peak_mib + x_s
                out.append((f"{label} peak memory <= base + x + S", ours.peak_mib <= allowed,
                            f"{ours.peak_mib:.0f} MiB vs {allowed:.0f} MiB"))
    ours_rows = [r for r in rows if r.impl == "pefttorch"]
    compared = [r for r in ours_rows if r.speedup_vs_peft is not None]
    if compared:
        slow = [f"{r.shape} {r.mode}" for r in compared if not (r.ok and r.speedup_vs_peft > 1.0)]
        out.append(("faster than HF PEFT at every shape", not slow,
                    "all rows" if not slow else "not at: " + "; ".join(slow)))
    return out


def as_dicts(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]
