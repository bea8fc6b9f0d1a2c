"""(IA)^3 and SSF: learned vectors that rescale (and shift) what chosen modules compute."""

from .config import IA3Config, SsfConfig
from .model import VectorModel

__all__ = ["IA3Config", "SsfConfig", "VectorModel"]
