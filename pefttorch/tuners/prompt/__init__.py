"""Prompt tuning (and DePT): learned embeddings in front of the input."""

from .config import PromptTuningConfig
from .model import PromptModel

__all__ = ["PromptModel", "PromptTuningConfig"]
