"""BitFit and LayerNorm tuning: training a chosen subset of the base model's own parameters."""

from .config import BitFitConfig, LNTuningConfig
from .model import SelectiveModel

__all__ = ["BitFitConfig", "LNTuningConfig", "SelectiveModel"]
