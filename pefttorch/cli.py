"""The `pefttorch` command (also `python -m pefttorch`): bench, demo, info."""

from __future__ import annotations

import argparse
import platform
import re
import sys

import torch

from ._args import UsageError


def info(_args: argparse.Namespace | None = None) -> int:
    """What this installation has: the build, the ops per device, the GPU, the peers' versions."""
    import pefttorch

    b = pefttorch.build_info()
    print(f"pefttorch {b['version']}: built against torch {b['torch_version']}, CUDA kernels "
          + (f"yes (CUDA {b['cuda_version']}, targets {';'.join(b['cuda_archs'])})" if b["cuda"] else "no"))
    versions = [f"torch {torch.__version__}" + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else "")]
    for name in ("transformers", "peft"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            versions.append(f"{name} not installed")
    versions.append(f"python {platform.python_version()}")
    print(", ".join(versions))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus:
        for i in range(gpus):
            p = torch.cuda.get_device_properties(i)
            print(f"cuda:{i} {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                  f"{p.total_memory / 2**30:.1f} GiB")
    else:
        print("no CUDA device visible")
    print("ops (devices with kernels):")
    for op in b["ops"]:
        keys = [k.lower() for k in ("CPU", "CUDA")
                if torch._C._dispatch_has_kernel_for_dispatch_key(f"pefttorch::{op}", k)]
        print(f"  pefttorch::{op:28} {' '.join(keys)}")
    warnings = []
    if gpus and not b["cuda"]:
        warnings.append("a GPU is present but pefttorch was built without CUDA kernels: its ops will fail on the "
                        "GPU. Rebuild where nvcc is found (or with PEFTTORCH_CUDA=1)")
    if gpus and b["cuda"]:
        for i in range(gpus):
            major, minor = torch.cuda.get_device_capability(i)
            if not runs_on(b["cuda_archs"], major, minor):
                warnings.append(f"cuda:{i} is sm_{major}{minor}, which the build does not target "
                                f"({';'.join(b['cuda_archs'])}): set TORCH_CUDA_ARCH_LIST and rebuild")
    for w in warnings:
        print(f"warning: {w}")
    return 0


def runs_on(archs: list[str], major: int, minor: int) -> bool:
    """Whether a build for `archs` (TORCH_CUDA_ARCH_LIST entries: "8.6", "9.0a", "8.0+PTX") has code a GPU of
    compute capability major.minor runs: machine code for X.Y runs on X.y with y >= Y (an "a" target, using
    that GPU's own instructions, on X.Y alone), and PTX for X.Y is compiled by the driver for any GPU >= X.Y."""
    for arch in archs:
        parsed = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", arch.strip())
        if parsed is None:  # a name torch expands ("Hopper", "native"): no telling, so no warning
            return True
        x, y, kind, ptx = int(parsed[1]), int(parsed[2]), parsed[3], bool(parsed[4])
        if kind == "a":  # the GPU's own instructions, in machine code and PTX alike: that GPU alone
            fits = (x, y) == (major, minor)
        elif ptx and not kind:
            fits = (major, minor) >= (x, y)
        else:  # machine code, or family ("f") code
            fits = x == major and minor >= y
        if fits:
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pefttorch", description="pefttorch: fused kernels for PEFT.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    from .bench import cli as bench_cli

    bench = sub.add_parser("bench", help="benchmarks against the bound and HF PEFT on this machine",
                           description=bench_cli.__doc__)
    bench_cli.add_arguments(bench)
    bench.set_defaults(func=bench_cli.run)

    from . import demo as demo_mod

    demo = sub.add_parser("demo", help="LoRA fine-tuning of the real pretrained MiniLM, a few minutes on a CPU",
                          description=demo_mod.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo_mod.add_arguments(demo)
    demo.set_defaults(func=demo_mod.run)

    sub.add_parser("info", help="build, ops per device, GPU and versions").set_defaults(func=info)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as err:  # a value argparse could not judge alone: reported as it reports its own
        sub.choices[args.command].error(str(err))
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback (a results file so far says it is incomplete)
        print(f"pefttorch {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
