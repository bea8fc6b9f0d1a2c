"""Modules built on pefttorch's fused ops."""

from .adapter import BottleneckAdapter
from .lora import LoRALinear
from .sparse_mlp import SparseMLP

__all__ = ["BottleneckAdapter", "LoRALinear", "SparseMLP"]
