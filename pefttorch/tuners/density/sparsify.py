"""pefttorch.sparsify: swap every MLP block of a model for a SparseMLP, in place."""

from __future__ import annotations

from torch import nn

from ...nn.sparse_mlp import SparseMLP, checked_threshold
from .mlp import MlpBlock, find_mlp_blocks, layout_of


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def sparsify(model: nn.Module, threshold: float = 0.0) -> list[str]:
    """Replaces the MLP blocks of `model` by :class:`pefttorch.nn.SparseMLP` with `threshold`, in place,
    and puts the model in eval mode (SparseMLP is for inference). Returns the names of the replaced
    SparseMLP modules: a block several layers share (one module object at several paths) is replaced at every path
    by one SparseMLP, so they share it still, and each path is named.

    At threshold 0 the model computes as before up to rounding; above 0 each MLP's error is bounded as
    SparseMLP documents. Merge LoRA adapters into the weights first (``merge_and_unload()``). All blocks are
    built before any is swapped: on error the model is unchanged.
    """
    threshold = checked_threshold(threshold, "sparsify")  # before the model is searched: not a block's error
    blocks = find_mlp_blocks(model)
    if any(b.name == "" for b in blocks):
        raise ValueError("the model itself is an MLP block: use SparseMLP.from_mlp(model) instead")
    for block in blocks:  # before from_mlp's probe, which would run the hooks (the density loss's counts it)
        _check_no_hooks(block)
    built = [(b, _build(b, threshold)) for b in blocks]
    for block, sparse in built:
        if not block.layout.replace:
            _check_bypass_holds_only_the_mlp(block)
            _check_nothing_else_reads_the_activation(block, sparse)
    # named_modules (and find_mlp_blocks) names a shared module once: replaced there only, the other layers stayed
    # dense, silently
    paths: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(name)
    names = []
    for block, sparse in built:
        for name in paths[id(block.module)]:
            at = MlpBlock(name, block.module, block.layout)
            target = at.name if at.layout.replace else at.part_name(at.layout.down)
            for path in () if at.layout.replace else at.layout.bypass:
                _set(model, at.part_name(path), nn.Identity())  # SparseMLP computes the gate and activation now
            _set(model, target, sparse)
            names.append(target)
    model.eval()
    return names


def _build(block, threshold: float) -> SparseMLP:
    try:
        return SparseMLP.from_mlp(block.module, threshold)
    except ValueError as err:  # its class names the kind of block, not which of the model's it is
        raise ValueError(f"{block.name}: {err}") from None


def _check_no_hooks(block) -> None:
    """The modules sparsify replaces (a whole block, or the parts swapped or bypassed of one kept in place: BERT,
    BART) take their hooks with them: pefttorch's own bottleneck adapters and (IA)^3, both hooks, the density loss's
    and the user's were silently dropped (a replaced block's probe misses a hook that is the identity for now, as
    a fresh (IA)^3 vector). Refuse, naming the module."""
    layout = block.layout
    paths = [""] if layout.replace else [p for p in (layout.gate, layout.up, layout.act, layout.down, *layout.bypass)
                                         if p]
    for path in dict.fromkeys(paths):
        for name, module in block.module.get_submodule(path).named_modules(prefix=path):
            if module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__:
                where = block.part_name(name) if name else block.name
                raise ValueError(f"{where} ({type(module).__name__}) carries forward hooks (an adapter's, (IA)^3's, "
                                 "the density loss's, or your own), which sparsify would drop with the module: remove "
                                 "them (handle.remove() for the density loss), or merge what can be merged "
                                 "(merge_and_unload()), first")


def _check_bypass_holds_only_the_mlp(block) -> None:
    """A bypassed part becomes an identity, so it must hold nothing but the parts SparseMLP computes: anything else in
    it runs in its forward, and would be dropped. RoBERTa-PreLayerNorm's intermediate normalises its input before the
    up projection (a LayerNorm beside `dense`): the model computed without it. Refuse what is not a known part."""
    layout = block.layout
    known = [p for p in (layout.gate, layout.up, layout.act) if p]
    for path in layout.bypass:
        for name, module in block.module.get_submodule(path).named_modules(prefix=path):
            if any(name == p or name.startswith(f"{p}.") for p in known):
                continue
            if isinstance(module, (nn.modules.dropout._DropoutNd, nn.Identity)):
                continue  # nothing at inference (TimeSformer's intermediate has a dropout), and SparseMLP is that
            if name != path or next(module.parameters(recurse=False), None) is not None:
                raise ValueError(f"{block.name or type(block.module).__name__}: its {name} ({type(module).__name__}) "
                                 f"is more than the MLP's {', '.join(known)} in the part sparsify would bypass, and "
                                 "would be dropped with it: this block is not one SparseMLP can replace")


def _check_nothing_else_reads_the_activation(block, sparse: SparseMLP) -> None:
    """A block kept in place (a BERT or BART layer) has its down projection swapped for the whole MLP, which is
    right only if its forward does nothing between the activation and the down projection. Another part sized to
    the intermediate width (a norm of the activation there) says it does: refuse rather than run a different model.
    A block that takes the hidden states alone (an MLP module: Kosmos-2's FFN, LightGlue's MLP) was probed by
    from_mlp, which also covers equal widths."""
    inter = sparse.intermediate_size
    if inter == sparse.in_features:
        return  # the widths cannot tell the parts apart (a layer's own norms have the width too)
    parts = {block.layout.gate, block.layout.down, block.layout.act, *block.layout.bypass}
    for path, module in block.module.named_modules():
        if not path or any(path == p or path.startswith(f"{p}.") for p in parts):
            continue
        if _in_a_second_mlp(block, path):
            continue
        if any(inter in t.shape for t in module.parameters(recurse=False)):
            raise ValueError(f"{block.name or type(block.module).__name__}: its {path} ({type(module).__name__}) works "
                             f"on the MLP's intermediate width ({inter}), between the parts SparseMLP would replace: "
                             f"this block is not one SparseMLP can replace")


def _in_a_second_mlp(block, path: str) -> bool:
    """Whether `path` lies in another MLP the layer computes on its own, beside the one sparsify replaces (which it
    leaves dense): a copy of the layer's intermediate or output part (BLIP-2's and InstructBLIP's Q-Former run the
    query tokens through intermediate_query and output_query), or a whole MLP block of a known layout (MobileBERT's
    stacked ffn layers, run before its own MLP). Those work on the intermediate width but not between the parts."""
    own = {p.rpartition(".")[0] for p in (block.layout.gate, block.layout.down) if "." in p}
    owners = {type(block.part(p)) for p in own}
    prefix = ""
    for name in path.split("."):
        prefix = f"{prefix}.{name}" if prefix else name
        if prefix in own:  # the layer's own parts (and what they hold) are not a second MLP: checked as parts
            return False
        module = block.part(prefix)
        if type(module) in owners or layout_of(module) is not None:
            return True
    return False

