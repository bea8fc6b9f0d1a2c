"""Reversible adapters (MEFT): backward reconstructs activations instead of caching them."""

from .config import MeftConfig
from .model import MeftAdapter, MeftModel

__all__ = ["MeftAdapter", "MeftConfig", "MeftModel"]
