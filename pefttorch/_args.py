"""Argument checks shared by the `pefttorch` command and the scripts under bench/: a bad value is a one-line error
before any work starts, not a traceback from deep inside a run (or after it, with the results lost)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (a 0 was silently taken as "the default" where code read `value or ...`)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def probability(text: str) -> float:
    """An argparse type: a dropout probability, in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def device(text: str) -> torch.device:
    """An argparse type: a torch device that exists here (cuda only where a CUDA device is visible)."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (cpu, cuda or cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: only cpu and cuda are supported")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is available")
        if dev.index is not None and dev.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: there are {count} CUDA device(s)")
    return dev


def writable_dir(path: Path, what: str) -> None:
    """Creates `path` (a directory) if needed and checks it can be written, before a run whose results go there;
    exits with a one-line error otherwise."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SystemExit(f"{what} {path}: cannot create it ({err.strerror or err})") from None
    if not path.is_dir() or not os.access(path, os.W_OK):
        raise SystemExit(f"{what} {path}: not a writable directory")
