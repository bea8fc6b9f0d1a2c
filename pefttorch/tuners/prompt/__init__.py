"""Prompt tuning (and DePT): learned embeddings in front of the input; prefix tuning: learned keys and values in
front of every attention layer's own."""

from .config import DeptConfig, PrefixTuningConfig, PromptTuningConfig
from .model import DeptModel, PromptModel
from .prefix import PrefixModel

__all__ = ["DeptConfig", "DeptModel", "PrefixModel", "PrefixTuningConfig", "PromptModel", "PromptTuningConfig"]
