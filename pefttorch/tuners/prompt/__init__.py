"""Prompt tuning (and DePT): learned embeddings in front of the input."""

from .config import DeptConfig, PromptTuningConfig
from .model import DeptModel, PromptModel

__all__ = ["DeptConfig", "DeptModel", "PromptModel", "PromptTuningConfig"]
