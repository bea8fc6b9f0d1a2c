"""Bottleneck adapters (Houlsby, Pfeiffer, parallel) on the fused adapter op."""

from .config import AdapterConfig
from .model import AdapterModel

__all__ = ["AdapterConfig", "AdapterModel"]
