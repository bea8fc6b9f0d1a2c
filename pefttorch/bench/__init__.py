"""Benchmarks that compare pefttorch with the frozen-base bound, HF PEFT and plain PyTorch."""

from .lora import IMPLS, Shape, check_targets, default_shapes, run_shape

__all__ = ["IMPLS", "Shape", "check_targets", "default_shapes", "run_shape"]
