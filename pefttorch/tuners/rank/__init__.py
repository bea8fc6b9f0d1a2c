"""Rank-allocating LoRA: IncreLoRA (grows ranks by importance) and AdaLoRA (prunes them), with compute that
follows the rank in use."""

from .config import AdaLoraConfig, IncreLoraConfig
from .layer import RankedLoraLayer
from .model import RankAllocationCallback, RankedLoraModel

__all__ = ["AdaLoraConfig", "IncreLoraConfig", "RankAllocationCallback", "RankedLoraLayer", "RankedLoraModel"]
