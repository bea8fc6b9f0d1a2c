"""Argument checks shared by the `pefttorch` command and the scripts under bench/: a bad value is a one-line error
before any work starts, not a traceback from deep inside a run (or after it, with the results lost)."""

from __future__ import annotations

import argparse
import importlib
import math
import os
from pathlib import Path

import torch


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (a 0 was silently taken as "the default" where code read `value or ...`)."""
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """An argparse type: an integer >= 0 (a count of warm-up steps, say)."""
    return _int_at_least(text, 0)


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0 (a learning rate)."""
    value = _finite(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def nonnegative_float(text: str) -> float:
    """An argparse type: a finite number >= 0 (a loss weight)."""
    value = _finite(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {value}")
    return value


def probability(text: str) -> float:
    """An argparse type: a dropout probability, in [0, 1)."""
    value = _finite(text)
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


class UsageError(Exception):
    """A bad command-line value found after argparse (it needs the device, or another option): the command reports
    it as argparse does, with the usage and exit status 2 (1 is for a benchmark whose check failed)."""


def writable_dir(path: Path, what: str) -> None:
    """Creates `path` (a directory) if needed and checks it can be written, before a run whose results go there;
    a UsageError otherwise."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"{what} {path}: cannot create it ({err.strerror or err})") from None
    if not path.is_dir() or not os.access(path, os.W_OK):
        raise UsageError(f"{what} {path}: not a writable directory")


def writable_file(path: Path, what: str) -> None:
    """`path` can be written as a file: its directory is writable (and made) and it is not a directory itself, nor
    an existing file that cannot be overwritten (read-only: its directory's check passed, and the write failed after
    the run)."""
    if path.is_dir():
        raise UsageError(f"{what} {path}: is a directory; give a file name")
    writable_dir(path.parent, what)
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{what} {path}: the file exists and cannot be written")


def missing_extra(command: str, modules) -> str | None:
    """The one-line message for `pefttorch <command>` when one of `modules` (the pip extra of the command's name
    installs them; the plain `pip install .` does not) is not importable, None when all are: checked before the
    command does anything, not found as a traceback halfway (or after a benchmark had run)."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as err:
            return (f"pefttorch {command} needs the {command} extras ({err.name or name} is missing): "
                    f"pip install 'pefttorch[{command}]'")
    return None
