"""pefttorch.sparsify: swap every MLP block of a model for a SparseMLP, in place."""

from __future__ import annotations

from torch import nn

from ...nn.sparse_mlp import SparseMLP
from .mlp import find_mlp_blocks


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def sparsify(model: nn.Module, threshold: float = 0.0) -> list[str]:
    """Replaces the MLP blocks of `model` by :class:`pefttorch.nn.SparseMLP` with `threshold`, in place,
    and puts the model in eval mode (SparseMLP is for inference). Returns the names of the replaced
    SparseMLP modules.

    At threshold 0 the model computes as before up to rounding; above 0 each MLP's error is bounded as
    SparseMLP documents. Merge LoRA adapters into the weights first (``merge_and_unload()``). All blocks are
    built before any is swapped: on error the model is unchanged.
    """
    blocks = find_mlp_blocks(model)
    if any(b.name == "" for b in blocks):
        raise ValueError("the model itself is an MLP block: use SparseMLP.from_mlp(model) instead")
    built = [(b, SparseMLP.from_mlp(b.module, threshold)) for b in blocks]
    names = []
    for block, sparse in built:
        target = block.name if block.layout.replace else block.part_name(block.layout.down)
        for path in () if block.layout.replace else block.layout.bypass:
            _set(model, block.part_name(path), nn.Identity())  # SparseMLP computes the gate and activation now
        _set(model, target, sparse)
        names.append(target)
    model.eval()
    return names
