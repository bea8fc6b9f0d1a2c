#!/usr/bin/env python
"""How well MEFT's reversible backward reconstructs each layer's input, per variant and stream dtype.

Builds a Llama-style model (random weights, hidden 64, 24 layers by default) in the given dtype, runs one
forward and backward with MeftConfig(debug_reconstruction=True) and prints, per variant and stream dtype,
the relative error of every layer's reconstructed input (bottom layer first) as a Markdown table.

    python bench/meft_reconstruction.py --dtype bfloat16 --out bench/results/meft-reconstruction-cpu.md
"""

from __future__ import annotations

import argparse
import contextlib
import warnings
from pathlib import Path

import torch
import transformers

import pefttorch
from pefttorch._args import UsageError, positive_int, writable_file
from pefttorch._args import device as device_arg
from pefttorch.bench import report
from pefttorch.nn import reversible


def errors(variant: str, dtype: torch.dtype, stream_dtype: torch.dtype, args) -> list[float]:
    torch.manual_seed(0)
    device = args.device
    # grouped-query attention, two query heads per key/value head, when the head count is even; with an odd count
    # (5 // 2 = 2 does not divide 5: SDPA refuses it) one key/value head per query head
    kv_heads = args.heads // 2 if args.heads % 2 == 0 else args.heads
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                   num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                   num_key_value_heads=kv_heads,
                                   max_position_embeddings=max(128, args.tokens), pad_token_id=0)
    with torch.device(device):  # built where it runs: a GPU-sized model initialises slowly on the CPU
        model = transformers.LlamaForCausalLM(cfg).to(dtype=dtype)
    model = pefttorch.get_peft_model(model, pefttorch.MeftConfig(variant=variant, stream_dtype=stream_dtype,
                                                                 debug_reconstruction=True))
    ids = torch.randint(1, 95, (args.batch, args.tokens), device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning is what this script measures
        model(input_ids=ids, labels=ids).loss.backward()
    return model.reconstruction_errors()


@contextlib.contextmanager
def _guard(on: bool):
    """The cast guard as it is (on), or turned off for every layer."""
    real = reversible.guard_bounds
    if not on:
        reversible.guard_bounds = lambda layers, *_: [None] * len(layers)
    try:
        yield
    finally:
        reversible.guard_bounds = real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32", "float64"))
    parser.add_argument("--layers", type=positive_int, default=24)
    parser.add_argument("--hidden", type=positive_int, default=64)
    parser.add_argument("--heads", type=positive_int, default=4)
    parser.add_argument("--tokens", type=positive_int, default=32, help="per sequence (no padding)")
    parser.add_argument("--batch", type=positive_int, default=2)
    parser.add_argument("--variants", default="meft1,meft2,meft3")
    parser.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="write the Markdown here too")
    parser.add_argument("--no-guard", action="store_true",
                        help="also the float64 streams without the cast guard (pefttorch.nn.reversible), to compare")
    args = parser.parse_args()
    unknown = set(args.variants.split(",")) - {"meft1", "meft2", "meft3"}
    if unknown:
        parser.error(f"--variants: unknown {sorted(unknown)}; known: meft1, meft2, meft3")
    if args.hidden % args.heads or args.hidden // args.heads % 2:  # rotary rotates halves of each head
        parser.error(f"--hidden {args.hidden} must split into --heads {args.heads} heads of an even size")
    if args.out is not None:
        try:
            writable_file(args.out, "--out")  # before the run, not after it
        except UsageError as err:
            parser.error(str(err))
    dtype = getattr(torch, args.dtype)
    meta = report.metadata(args.device, dtype)  # the commit of this checkout, wherever the script is run from
    commit, device = meta["commit"], meta["device"]
    lines = [
        f"# MEFT reconstruction error per layer ({args.dtype} Llama-style model, hidden {args.hidden}, "
        f"{args.layers} layers, {args.heads} heads, {args.batch} x {args.tokens} tokens)",
        "",
        f"Device {device}, torch {torch.__version__}, pefttorch {pefttorch.__version__}, commit {commit}. "
        "`python bench/meft_reconstruction.py` prints this table.",
        "",
        "Relative error (max abs error / max abs value) of each reversible layer's input as backward "
        "reconstructs it, layer 0 (bottom) first. Backward starts from the top layer, so errors grow "
        "downwards: each coupling divides by lam or beta.",
        "",
        "| variant | streams | " + " | ".join(str(i) for i in range(args.layers)) + " |",
        "|---|---|" + "---|" * args.layers,
    ]
    runs = [(torch.float32, True), (torch.float64, True)] + ([(torch.float64, False)] if args.no_guard else [])
    for variant in args.variants.split(","):
        for stream, guard in runs:
            with _guard(guard):
                errs = errors(variant, dtype, stream, args)
            note = "" if guard else ", no guard"
            lines.append(f"| {variant} | {str(stream).removeprefix('torch.')}{note} | "
                         + " | ".join(f"{e:.0e}" for e in errs) + " |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
