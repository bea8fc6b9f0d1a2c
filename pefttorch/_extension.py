"""Loads the compiled extension, pefttorch._C, and explains why when it cannot."""

from __future__ import annotations

import importlib
import re
from types import ModuleType

import torch

_REBUILD = "Rebuild it in this environment: pip install --no-build-isolation --force-reinstall <path to pefttorch>"


def explain_load_error(err: BaseException, torch_version: str = torch.__version__) -> str:
    """A message that says why pefttorch._C failed to load and what to do about it."""
    text = str(err)
    if isinstance(err, ModuleNotFoundError) and "pefttorch._C" in text:
        return (
            "pefttorch's compiled extension (pefttorch._C) is missing: the package was not built. "
            "Install it with `pip install --no-build-isolation .` from the source tree (or run `make test`)."
        )
    missing = re.search(r"(lib[\w.+-]*\.so[\w.]*): cannot open shared object file", text)
    if missing and ("cuda" in missing.group(1) or "cublas" in missing.group(1)):
        return (
            f"pefttorch._C needs the CUDA runtime library {missing.group(1)}, which was not found. It was "
            f"built with CUDA kernels; install torch's CUDA build (torch {torch_version} is installed) or "
            f"build pefttorch without CUDA (PEFTTORCH_CUDA=0). {_REBUILD}"
        )
    if "undefined symbol" in text or (missing and ("torch" in missing.group(1) or "c10" in missing.group(1))):
        return (
            f"pefttorch._C was built against a different torch than the one installed ({torch_version}): "
            f"the binary interface does not match ({text}). {_REBUILD}"
        )
    return f"pefttorch._C failed to load: {text}. {_REBUILD}"


def load() -> ModuleType:
    try:
        ext = importlib.import_module("pefttorch._C")
    except (ImportError, OSError) as err:
        raise ImportError(explain_load_error(err)) from err
    if ext.TORCH_VERSION != torch.__version__:
        # It loaded, but the C++ ABI of torch is not stable across versions: refuse rather than crash later.
        raise ImportError(
            f"pefttorch._C was built against torch {ext.TORCH_VERSION} but torch {torch.__version__} is "
            f"installed. {_REBUILD}"
        )
    return ext
