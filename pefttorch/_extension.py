"""Loads the compiled extension, pefttorch._C, and explains why when it cannot."""

from __future__ import annotations

import importlib
import importlib.machinery
import re
import sys
from pathlib import Path
from types import ModuleType

import torch

# --no-deps: --force-reinstall alone reinstalls torch too (gigabytes, maybe another build of it, which the
# extension would then refuse)
_REBUILD = ("Rebuild it in this environment: pip install --no-build-isolation --no-deps --force-reinstall "
            "<path to pefttorch>")
PACKAGE = Path(__file__).resolve().parent

# The ops csrc/bindings.cpp registers and the Python layer uses: a _C built from older sources lacks some.
OPS = ("lora_linear_forward", "lora_linear_backward", "density_loss", "density_loss_backward", "sparse_mlp",
       "reversible_coupling", "reversible_coupling_backward", "rank_importance", "bottleneck_adapter_forward",
       "bottleneck_adapter_backward", "component_adamw_", "ranked_lora_factors", "ranked_lora_factors_backward",
       "rotary_embedding")


def _not_built(package: Path = PACKAGE) -> str:
    """Why no _C was found in `package`, and what to do: built for another Python, or a source tree never built
    (which, run from its root, hides an installed copy)."""
    message = f"pefttorch's compiled extension (pefttorch._C) is missing from {package}"
    own = {"_C" + suffix for suffix in importlib.machinery.EXTENSION_SUFFIXES}
    others = sorted(p.name for p in package.glob("_C*") if p.suffix in (".so", ".pyd") and p.name not in own)
    if others:
        return (f"{message}: there is {', '.join(others)}, built for another Python than this one "
                f"({sys.implementation.cache_tag}). {_REBUILD}")
    if (package.parent / "setup.py").is_file():
        return (f"{message}, a source tree that was not built. Build it in place (python setup.py build_ext "
                "--inplace, or `make test`), or install it (pip install --no-build-isolation .) and run Python "
                "from another directory: from the source tree's root, its unbuilt copy hides the installed one.")
    return f"{message}: the package was not built. {_REBUILD}"


def explain_load_error(err: BaseException, torch_version: str = torch.__version__) -> str:
    """A message that says why pefttorch._C failed to load and what to do about it."""
    text = str(err)
    if isinstance(err, ModuleNotFoundError) and "pefttorch._C" in text:
        return _not_built()
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


def _registered(name: str) -> bool:
    try:
        getattr(torch.ops.pefttorch, name)
    except (AttributeError, RuntimeError):  # torch raises RuntimeError: "operator ... does not exist"
        return False
    return True


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
    missing = [name for name in OPS if not _registered(name)]
    if missing:
        raise ImportError(f"pefttorch._C ({ext.__file__}) is older than pefttorch's Python sources: it lacks the "
                          f"op(s) {', '.join(missing)}. {_REBUILD} (or, in a source tree, python setup.py "
                          "build_ext --inplace)")
    return ext
