"""Modules built on pefttorch's fused ops."""

from .lora import LoRALinear
from .sparse_mlp import SparseMLP

__all__ = ["LoRALinear", "SparseMLP"]
