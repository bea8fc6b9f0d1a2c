"""Whole-model training step, measured one run after another in the same process.

The ``model`` suite: full fine-tuning (the bound), HF PEFT LoRA, HF PEFT LoRA after pefttorch.accelerate, and
pefttorch LoRA; also pefttorch LoRA and full fine-tuning with ``pefttorch.fuse_norms`` and ``pefttorch.fuse_rotary``
(fused RMSNorms and RoPE), so that what the fused kernels save is shown on both sides and not counted as LoRA's.
The ``meft`` suite: full fine-tuning,
pefttorch LoRA with and without gradient checkpointing, HF PEFT LoRA with gradient checkpointing, and MEFT's
reversible adapters (meft1, meft2, meft3), whose point is the memory that checkpointing saves without its
recomputation of every layer.

All LoRA runs start from the same adapter weights (HF PEFT's initialisation, copied by name: the layouts
are the same), so their losses must agree step by step; a run that drifts is flagged. A MEFT run is flagged
when its backward reconstructs the stack's input worse than MEFT's own warning threshold: its gradients are then
wrong, and its time is no win.
"""

from __future__ import annotations

import gc
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from .timing import LiveTensorBytes, sync

RUNS = ("full", "peft", "peft+accelerate", "pefttorch", "pefttorch+fused", "full+fused")  # the model suite
MEFT_VARIANTS = ("meft1", "meft2", "meft3")
MEFT_RUNS = ("full", "pefttorch", "pefttorch+gc", "peft+gc", *MEFT_VARIANTS)  # the meft suite
MEFT_BOTTLENECK = 64  # MEFT1/2 then train about as many parameters as LoRA r=16 on all linear layers
# The suite's streams: with float32 streams a bf16 model's reconstruction is off by O(1) within four layers, which
# makes any time or memory it shows meaningless; float64 keeps it to rounding there (bench/results/meft-cpu.md)
MEFT_STREAMS = torch.float64
RUN_HELP = {
    "full": "full fine-tuning, every weight trained (the bound)",
    "peft": "HF PEFT LoRA, its defaults (fp32 adapter weights in a bf16 model)",
    "peft+accelerate": "the same HF PEFT model after pefttorch.accelerate(model)",
    "pefttorch": "pefttorch.get_peft_model with the same LoraConfig",
    "pefttorch+fused": "the same, after pefttorch.fuse_norms(model) and fuse_rotary(model) (fused RMSNorm and RoPE)",
    "full+fused": "full fine-tuning after pefttorch.fuse_norms(model) and fuse_rotary(model)",
    "pefttorch+gc": "the same, with gradient checkpointing (transformers' default, non-reentrant)",
    "peft+gc": "HF PEFT LoRA with gradient checkpointing",
    **{v: f"MEFT reversible adapters, MeftConfig(variant='{v}', bottleneck {MEFT_BOTTLENECK}, "
          f"{str(MEFT_STREAMS).removeprefix('torch.')} streams)" for v in MEFT_VARIANTS},
}


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    mlp: int
    vocab: int
    heads: int
    batch: int
    seq: int

    @property
    def label(self) -> str:
        return f"llama h{self.hidden} L{self.layers} mlp{self.mlp} v{self.vocab}, {self.batch}x{self.seq} tokens"


GPU_SHAPE = ModelShape(hidden=2048, layers=16, mlp=5632, vocab=32000, heads=16, batch=8, seq=1024)
CPU_SHAPE = ModelShape(hidden=256, layers=4, mlp=688, vocab=4000, heads=4, batch=2, seq=128)


@dataclass
class RunResult:
    run: str
    step_ms: float | None = None
    tokens_per_s: float | None = None
    peak_gib: float | None = None
    trainable: int | None = None
    losses: list | None = None
    ok: bool = True
    note: str = ""
    ratio_to_full: float | None = None
    ratio_to_peft: float | None = None
    ratio_to_lora: float | None = None  # to pefttorch LoRA without checkpointing
    reconstruction_error: float | None = None  # MEFT: of the stack's input, relative, in the last backward


def build_model(shape: ModelShape, dtype: torch.dtype, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.mlp,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.heads, max_position_embeddings=max(2048, shape.seq))
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def _lora_config_kwargs(r: int, dropout: float) -> dict:
    return dict(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules="all-linear")


@dataclass(frozen=True)
class MeftOptions:
    bottleneck: int = MEFT_BOTTLENECK
    stream_dtype: torch.dtype = MEFT_STREAMS


def _make(run: str, shape, dtype, device, r, dropout, adapter_state, meft: MeftOptions | None = None):
    model = build_model(shape, dtype, device)
    if run == "full":
        return model
    if run in MEFT_VARIANTS:
        import pefttorch

        meft = meft or MeftOptions()
        return pefttorch.get_peft_model(model, pefttorch.MeftConfig(
            variant=run, bottleneck=meft.bottleneck, stream_dtype=meft.stream_dtype, adapter_dropout=dropout))
    if run.endswith("+fused"):  # (run_one undoes fuse_rotary, which is global, after the run)
        import pefttorch

        model = _make(run.removesuffix("+fused"), shape, dtype, device, r, dropout, adapter_state, meft)
        for report in (pefttorch.fuse_norms(model, verbose=False), pefttorch.fuse_rotary(model, verbose=False)):
            if report.skipped or not report.switched:
                raise RuntimeError(f"not everything was switched: {report}")
        return model
    if run.endswith("+gc"):
        model = _make(run.removesuffix("+gc"), shape, dtype, device, r, dropout, adapter_state)
        model.gradient_checkpointing_enable()
        model.config.use_cache = False  # training keeps no cache; transformers would say so at every step
        return model
    if run in ("peft", "peft+accelerate"):
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(**_lora_config_kwargs(r, dropout)))
        if run == "peft+accelerate":
            import pefttorch

            report = pefttorch.accelerate(model, verbose=False)
            if report.skipped:
                raise RuntimeError(f"accelerate left layers unswitched: {report}")
    elif run == "pefttorch":
        import pefttorch

        model = pefttorch.get_peft_model(model, pefttorch.LoraConfig(**_lora_config_kwargs(r, dropout)))
    else:
        raise ValueError(f"unknown run {run!r}; known: {', '.join(RUNS)}")
    if adapter_state is not None:
        missing = model.load_state_dict(adapter_state, strict=False)
        if missing.unexpected_keys:
            raise RuntimeError(f"adapter weights do not fit {run}: {missing.unexpected_keys[:3]}")
    return model


def _run_one(run: str, shape: ModelShape, dtype: torch.dtype, device: torch.device, steps: int, warmup: int,
            r: int = 16, dropout: float = 0.0, adapter_state: dict | None = None,
            meft: MeftOptions | None = None) -> tuple[RunResult, dict | None]:
    """Times `steps` training steps after `warmup`; returns the result and (for the first LoRA run)
    its initial adapter weights, for the others to start from. Peak memory: the CUDA allocator's over the
    timed steps; on the CPU, the tensors alive during one more, untimed step (:class:`LiveTensorBytes`)."""
    import warnings

    result = RunResult(run)
    model = _make(run, shape, dtype, device, r, dropout, adapter_state, meft)
    initial = None
    if run not in ("full", "full+fused", *MEFT_VARIANTS) and adapter_state is None:
        initial = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    params = [p for p in model.parameters() if p.requires_grad]
    result.trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step(_, ids):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    batches = make_batches(shape, warmup + steps, device)
    with warnings.catch_warnings():
        # MEFT warns once of an inaccurate reconstruction: the table shows it, for every step, as a flag
        warnings.filterwarnings("ignore", message="reversible backward")
        losses, ms, result.peak_gib = time_steps(step, batches, warmup, device)
        if result.peak_gib is None:
            state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
            with LiveTensorBytes(device, [*model.parameters(), *model.buffers(), *state]) as live:
                step(0, batches[-1])
            result.peak_gib = live.peak / 2**30
    result.step_ms = median(ms)
    result.tokens_per_s = shape.batch * shape.seq / (result.step_ms * 1e-3)
    result.losses = losses
    if run in MEFT_VARIANTS:
        from ..nn.reversible import WARN_ERROR

        result.reconstruction_error = model.base_model.reconstruction_error()
        if not result.reconstruction_error <= WARN_ERROR:
            result.ok = False
            result.note = (f"reconstruction error {result.reconstruction_error:.1e} > {WARN_ERROR:g}: "
                           "gradients inaccurate")
    if not all(math.isfinite(v) for v in result.losses):
        result.ok, result.note = False, "non-finite loss"
    return result, initial


def run_one(run: str, *args, **kwargs) -> tuple[RunResult, dict | None]:
    """Times one run (see _run_one); a "+fused" run's fuse_rotary is global, so it is undone afterwards."""
    try:
        return _run_one(run, *args, **kwargs)
    finally:
        if run.endswith("+fused"):
            from ..integrations.rotary import unfuse_rotary

            unfuse_rotary()


def make_batches(shape: ModelShape, n: int, device: torch.device) -> list[torch.Tensor]:
    """n batches of random token ids, the same ones for every run (a fixed seed)."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    return [torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=gen).to(device) for _ in range(n)]


def time_steps(step: Callable[[int, torch.Tensor], torch.Tensor], batches: list[torch.Tensor], warmup: int,
               device: torch.device, after: Callable[[int], object] | None = None,
               first_step: int = 1) -> tuple[list[float], list[float], float | None]:
    """Runs ``step(global_step, ids)`` (returning the detached loss) on every batch, global steps counted from
    `first_step`, and times each one after the first `warmup`: CUDA events around each step (no
    synchronisation between steps, as in training), perf_counter on the CPU. ``after(global_step)``, if
    given, runs after each step, outside the timing. Returns (losses, ms of each timed step, peak GiB
    allocated on CUDA since the first step, None on the CPU)."""
    import time

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    losses, times = [], []
    for i, ids in enumerate(batches):
        global_step = first_step + i
        if i == warmup:
            sync(device)
        if i < warmup:
            losses.append(step(global_step, ids))
        elif cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            losses.append(step(global_step, ids))
            end.record()
            times.append((start, end))
        else:
            t0 = time.perf_counter()
            losses.append(step(global_step, ids))
            times.append(time.perf_counter() - t0)
        if after is not None:
            after(global_step)
    sync(device)
    ms = [s.elapsed_time(e) for s, e in times] if cuda else [t * 1e3 for t in times]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    return [float(v) for v in losses], ms, peak


def median(values: list[float]) -> float:
    """The median, of an even count the mean of the two middle values (the upper one taken before made the "median"
    of two steps the slower one, above their mean; the default step counts are even)."""
    return statistics.median(values)


def release(device: torch.device) -> None:
    """Frees what the previous run left, so each run's peak memory is its own (call between runs)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def compare(results: list[RunResult], dtype: torch.dtype, check_losses: bool = True) -> None:
    """Ratios, and (without dropout, whose masks differ between libraries) the LoRA runs' losses checked
    against HF PEFT's (its plain run, else its checkpointed one): they start from the same weights and see the
    same batches, and checkpointing changes no value."""
    by = {r.run: r for r in results}
    full, peft, lora = by.get("full"), by.get("peft"), by.get("pefttorch")
    ref = peft or by.get("peft+gc")
    tol = 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
    for r in results:
        if full and full.step_ms and r.step_ms:
            r.ratio_to_full = r.step_ms / full.step_ms
        if peft and peft.step_ms and r.step_ms:
            r.ratio_to_peft = r.step_ms / peft.step_ms
        if lora and lora.step_ms and r.step_ms:
            r.ratio_to_lora = r.step_ms / lora.step_ms
        lora_run = r.run not in ("full", "full+fused", *MEFT_VARIANTS)
        if check_losses and lora_run and ref and r is not ref and ref.losses and r.losses:
            worst = max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(r.losses, ref.losses, strict=True))
            if worst > tol:
                r.ok = False
                r.note = f"losses differ from {ref.run}'s by up to {worst:.2%} (tolerance {tol:.0%})"


MEFT_STEP_TARGET = 1.25  # x pefttorch LoRA without checkpointing (checkpointing costs about 1.38x)


def check_targets(results: list[RunResult], suite: str = "model") -> list[tuple[str, bool, str]]:
    by = {r.run: r for r in results}
    out = []
    ours, full, peft = by.get("pefttorch"), by.get("full"), by.get("peft")
    if suite == "meft":
        gc = by.get("peft+gc")
        for v in MEFT_VARIANTS:
            m = by.get(v)
            if m is None or m.step_ms is None:
                continue
            if gc and gc.peak_gib and m.peak_gib is not None:
                out.append((f"{v} peak memory <= HF PEFT LoRA + checkpointing's", m.ok and m.peak_gib <= gc.peak_gib,
                            f"{m.peak_gib / gc.peak_gib:.3f}x"))
            if ours and ours.step_ms:
                met = m.ok and m.ratio_to_lora <= MEFT_STEP_TARGET
                out.append((f"{v} step <= {MEFT_STEP_TARGET}x pefttorch LoRA", met, f"{m.ratio_to_lora:.3f}x"))
        return out
    if ours and full and ours.step_ms and full.step_ms:
        out.append(("pefttorch LoRA step <= 0.80x full fine-tuning", ours.ok and ours.ratio_to_full <= 0.80,
                    f"{ours.ratio_to_full:.3f}x"))
    # The same target with fused norms and RoPE; and, so that their share is not read as LoRA's, against full
    # fine-tuning with the same kernels
    fused, full_fused = by.get("pefttorch+fused"), by.get("full+fused")
    for bound, label in ((full, "full fine-tuning"), (full_fused, "full fine-tuning + fused norms/RoPE")):
        if fused and bound and fused.step_ms and bound.step_ms:
            ratio = fused.step_ms / bound.step_ms
            out.append((f"pefttorch LoRA + fused norms/RoPE step <= 0.80x {label}", fused.ok and ratio <= 0.80,
                        f"{ratio:.3f}x"))
    if ours and peft and ours.peak_gib is not None and peft.peak_gib is not None:
        ratio = ours.peak_gib / peft.peak_gib
        out.append(("pefttorch peak memory <= 0.80x HF PEFT's", ratio <= 0.80, f"{ratio:.3f}x"))
    return out


def as_dicts(results: list[RunResult]) -> list[dict]:
    return [asdict(r) for r in results]
