"""DEFT: a density loss that trains MLP activations towards zero, and sparse MLP inference."""

from .loss import DensityLoss, DensityLossConfig, attach_density_loss
from .mlp import find_mlp_blocks
from .sparsify import sparsify

__all__ = ["DensityLoss", "DensityLossConfig", "attach_density_loss", "find_mlp_blocks", "sparsify"]
