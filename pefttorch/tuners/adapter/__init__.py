"""Bottleneck adapters (Houlsby, Pfeiffer, parallel) on the fused adapter op, and ScaLearn's learned mixing of
several frozen source adapters."""

from .config import AdapterConfig
from .model import AdapterModel
from .scalearn import ScaLearnConfig, ScaLearnModel

__all__ = ["AdapterConfig", "AdapterModel", "ScaLearnConfig", "ScaLearnModel"]
