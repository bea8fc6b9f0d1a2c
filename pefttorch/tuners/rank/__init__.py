"""Rank-allocating LoRA: IncreLoRA (grows ranks by importance) and AdaLoRA (prunes them), with compute that
follows the rank in use."""

from .config import AdaLoraConfig, IncreLoraConfig
from .layer import RankedLoraLayer
from .model import RankedLoraModel

__all__ = ["AdaLoraConfig", "IncreLoraConfig", "RankedLoraLayer", "RankedLoraModel"]
