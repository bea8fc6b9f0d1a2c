"""pefttorch: parameter-efficient fine-tuning for PyTorch with fused C++/CUDA kernels."""

from __future__ import annotations

import importlib.util
import re

import torch

# `ops` loads pefttorch._C (the op schemas and kernels) and registers fake kernels and autograd; every
# module that calls an op imports it.
from . import _extension, functional, nn, ops, optim, reference
from .integrations.norms import fuse_norms, unfuse_norms
from .integrations.peft import AccelerateReport, accelerate, deaccelerate
from .integrations.rotary import fuse_rotary, unfuse_rotary
from .peft_model import PeftModel, get_peft_model
from .tuners.adapter import AdapterConfig, ScaLearnConfig
from .tuners.budget import config_for_budget
from .tuners.density import (
    DensityLoss,
    DensityLossConfig,
    attach_density_loss,
    find_mlp_blocks,
    sparsify,
)
from .tuners.lora import LoraConfig
from .tuners.meft import MeftConfig
from .tuners.prompt import DeptConfig, PrefixTuningConfig, PromptTuningConfig
from .tuners.rank import AdaLoraConfig, IncreLoraConfig
from .tuners.scaling import IA3Config, SsfConfig
from .tuners.selective import BitFitConfig, LNTuningConfig

__version__ = ops._C.VERSION


def build_info() -> dict:
    """What the compiled extension was built with.

    Keys: ``version`` (pefttorch), ``torch_version`` (the torch it was built against), ``cuda`` (CUDA
    kernels compiled in), ``cuda_version`` and ``cuda_archs`` (targets, e.g. ``["8.0+PTX", "9.0a"]``;
    empty without CUDA), ``ops`` (the registered op names) and ``devices`` (the backends with kernels).
    """
    c = ops._C
    names = list(_extension.OPS)
    devices = [
        key.lower()
        for key in ("CPU", "CUDA")
        if all(torch._C._dispatch_has_kernel_for_dispatch_key(f"pefttorch::{n}", key) for n in names)
    ]
    return {
        "version": c.VERSION,
        "torch_version": c.TORCH_VERSION,
        "cuda": bool(c.WITH_CUDA),
        "cuda_version": c.CUDA_VERSION or None,
        "cuda_archs": [a for a in re.split(r"[;\s]+", c.CUDA_ARCHS) if a],  # torch takes ";" or spaces
        "ops": names,
        "devices": devices,
    }


# The Trainer callbacks load transformers' Trainer (seconds): only when asked for. Listed (dir, `import *`) only
# where transformers is installed, since asking for them without it raises the ImportError that says so.
def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a finder that refuses it, or a module without a spec
        return False


_CALLBACKS = ("DensityLossCallback", "RankAllocationCallback") if _installed("transformers") else ()


def __getattr__(name: str):
    if name in ("DensityLossCallback", "RankAllocationCallback"):
        from . import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_CALLBACKS})


__all__ = [
    "AccelerateReport",
    "AdaLoraConfig",
    "AdapterConfig",
    "BitFitConfig",
    "DensityLoss",
    "DeptConfig",
    "DensityLossConfig",
    "IA3Config",
    "IncreLoraConfig",
    "LNTuningConfig",
    "LoraConfig",
    "MeftConfig",
    "PeftModel",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "ScaLearnConfig",
    "SsfConfig",
    "__version__",
    "accelerate",
    "attach_density_loss",
    "build_info",
    "config_for_budget",
    "deaccelerate",
    "find_mlp_blocks",
    "functional",
    "fuse_norms",
    "fuse_rotary",
    "get_peft_model",
    "nn",
    "optim",
    "reference",
    "sparsify",
    "unfuse_norms",
    "unfuse_rotary",
    *_CALLBACKS,
]
