"""Modules built on pefttorch's fused ops."""

from .lora import LoRALinear

__all__ = ["LoRALinear"]
