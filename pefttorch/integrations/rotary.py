"""``pefttorch.fuse_rotary``: transformers' ``apply_rotary_pos_emb`` replaced by pefttorch's rotary kernel.

transformers applies RoPE as ``q * cos + rotate_half(q) * sin`` (and the same for k): a negation, a
concatenation, two products and a sum, each a pass over the activations, forward and backward. pefttorch's
``rotary_embedding`` op does it in one pass each way and keeps nothing activation-sized for backward.

The attention classes call the function by its name in their modeling module (``modeling_llama``,
``modeling_mistral``, ...), so the switch is made there: it affects every model of that family in the process,
as other kernel libraries patch transformers. Each module is switched only if its function matches the kernel
on a probe (so interleaved-layout variants stay as they were; partial rotary, a cos narrower than the head, goes
through the kernel where a second probe shows the function rotates the first features and passes the rest); calls
the kernel would not reproduce (cos of another dtype than q's, where transformers promotes) go to transformers' own
function. :func:`unfuse_rotary` restores the originals.
"""

from __future__ import annotations

import logging
import sys

import torch
from torch import nn

from .. import ops
from .peft import AccelerateReport

logger = logging.getLogger("pefttorch")

_NAME = "apply_rotary_pos_emb"
_switched: dict[str, object] = {}  # modeling module name -> transformers' function


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The kernel's rotation of x's first cos.shape[-1] features (all of them, or partial rotary's share), the rest
    passed through."""
    width = cos.shape[-1]
    if width == x.shape[-1]:
        return ops.rotary_embedding(x, cos, sin, False)
    return torch.cat([ops.rotary_embedding(x[..., :width], cos, sin, False), x[..., width:]], dim=-1)


def _aligned(cos: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether the (unsqueezed) cos broadcasts over x's leading dimensions, as the kernel applies it (its width is
    checked by the caller: all of x's or, with partial rotary, a share)."""
    try:
        return cos.dim() <= x.dim() and torch.broadcast_shapes(cos.shape[:-1], x.shape[:-1]) == x.shape[:-1]
    except RuntimeError:
        return False


def _fused(original, partial: bool):
    """transformers' `original` through the kernel; with `partial`, also for a cos narrower than the head (partial
    rotary, as the probe found `original` computes it)."""
    def apply_rotary_pos_emb(q, k=None, cos=None, sin=None, *args, **kwargs):
        # transformers' signature has changed across versions: (..., position_ids=None, unsqueeze_dim=1) and
        # (..., unsqueeze_dim=1); the extra arguments pass to the original unchanged. Some families make k optional
        # (Qwen4-Exp's indexer rotates q alone, cos and sin by keyword): what such a call returns is the original's
        # to say, so it goes there
        if k is None or cos is None or sin is None:
            return original(q, k, cos, sin, *args, **kwargs)
        unsqueeze_dim = kwargs.get("unsqueeze_dim", args[-1] if args and isinstance(args[-1], int) else 1)
        width = cos.shape[-1]
        if (q.dtype != cos.dtype or k.dtype != q.dtype or sin.dtype != cos.dtype or q.dim() != 4 or k.dim() != 4
                or width % 2 or k.shape[-1] != q.shape[-1] or sin.shape[-1] != width
                or not (width == q.shape[-1] or (partial and width < q.shape[-1]))):
            return original(q, k, cos, sin, *args, **kwargs)
        cos_u, sin_u = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        if not (_aligned(cos_u, q) and _aligned(cos_u, k) and sin_u.shape == cos_u.shape):
            # cos/sin that do not broadcast to q and k (DINOv3's, with no batch dimension, cover only the patch
            # tokens): the original knows what it means
            return original(q, k, cos, sin, *args, **kwargs)
        return _rotate(q, cos_u, sin_u), _rotate(k, cos_u, sin_u)

    class FusedRotary:
        """pefttorch's rotary kernel in place of transformers' function (fuse_rotary)."""

        pefttorch_original = original

        def __call__(self, *args, **kwargs):
            return apply_rotary_pos_emb(*args, **kwargs)

        def __new__(cls):
            # transformers wraps the function in a `kernels` module, and each attention layer keeps a private copy
            # of it that unpickles as type(modeling.apply_rotary_pos_emb)(): while switched, that must still build
            # transformers' wrapper (a whole model saved with torch.save failed to load)
            return type(original)()

        def __copy__(self):  # copied as a function is, itself (copy's default would build transformers' wrapper)
            return self

        def __deepcopy__(self, memo):
            return self

    return object.__new__(FusedRotary)


def _probe_mismatch(fn, width: int = 8) -> str | None:
    """Why transformers' `fn` is not the half-split rotation the kernel computes, on a random probe of heads of 8
    features and a cos `width` wide (8: whole heads; 4: partial rotary), or None: it is. Calls with other layouts
    are checked again when made (see _aligned)."""
    gen = torch.Generator().manual_seed(0)
    # batch, heads and tokens all differ: a function that reads cos's dimensions otherwise (DINOv3's has no batch
    # dimension) fails or differs here instead of matching by coincidence
    # on the CPU whatever the default device (torch.set_default_device): transformers' function is probed there
    q, k = (torch.randn(2, heads, 5, 8, generator=gen, device="cpu") for heads in (3, 1))
    cos, sin = (torch.randn(2, 5, width, generator=gen, device="cpu") for _ in range(2))
    try:
        with torch.no_grad():
            want = fn(q, k, cos, sin)
    except Exception as err:  # noqa: BLE001 - any failure means: leave it as it is
        return f"its {_NAME} failed on a probe ({type(err).__name__}: {err})"
    got = (_rotate(q, cos.unsqueeze(1), sin.unsqueeze(1)), _rotate(k, cos.unsqueeze(1), sin.unsqueeze(1)))
    same = isinstance(want, tuple) and len(want) == 2 and all(
        w.shape == g.shape and torch.allclose(w, g, rtol=1e-5, atol=1e-6) for w, g in zip(want, got, strict=True))
    if not same:
        return f"its {_NAME} is not the half-split rotation x * cos + rotate_half(x) * sin"
    return None


def fuse_rotary(model: nn.Module, verbose: bool = True) -> AccelerateReport:
    """Switches ``apply_rotary_pos_emb`` of the transformers modeling modules that `model`'s attention layers come
    from (Llama, Mistral, Qwen, ...) to pefttorch's fused rotary kernel: one pass each way instead of five
    operations, nothing activation-sized kept for backward. Outputs match transformers' to one rounding (in bf16
    transformers rounds three times, the kernel once).

    The switch is per modeling module, so it applies to every model of that family in the process (transformers'
    attention calls the function by its module-level name). Returns a report of the modules switched and those
    left alone and why (also logged at INFO when `verbose`); :func:`unfuse_rotary` undoes it.
    """
    report = AccelerateReport(title="pefttorch.fuse_rotary", what="modeling module(s) switched to pefttorch's "
                                                                   "rotary kernel")
    seen = set()
    for module in model.modules():
        name = type(module).__module__
        if name in seen or not type(module).__name__.endswith("Attention"):
            continue
        seen.add(name)
        modeling = sys.modules.get(name)
        fn = getattr(modeling, _NAME, None)
        if fn is None:
            continue  # no rotary embedding there (BERT, GPT-2, T5, ...)
        if getattr(getattr(module, "config", None), "rope_interleave", False) and hasattr(
                modeling, f"{_NAME}_interleave"):
            # DeepSeek-V3, Mistral4: with this flag the attention calls the interleaved variant, which the kernel does
            # not compute; switching the half-split function would be reported and never run
            report.skipped[name] = f"the model's config has rope_interleave=True: it calls {_NAME}_interleave"
            continue
        if name in _switched:
            report.switched.append(name)
            continue
        mismatch = _probe_mismatch(fn)
        if mismatch is not None:
            report.skipped[name] = mismatch
            continue
        _switched[name] = fn
        # partial rotary (Phi3, GPT-NeoX: a cos narrower than the head) through the kernel too, where the function
        # rotates the first features and passes the rest, as _rotate does; elsewhere such calls stay transformers'
        setattr(modeling, _NAME, _fused(fn, partial=_probe_mismatch(fn, width=4) is None))
        report.switched.append(name)
    if verbose:
        logger.info("%s", report)
    return report


def unfuse_rotary() -> int:
    """Gives every modeling module switched by :func:`fuse_rotary` transformers' own function back; returns how
    many."""
    count = 0
    for name, original in list(_switched.items()):
        modeling = sys.modules.get(name)
        if modeling is not None:
            setattr(modeling, _NAME, original)
            count += 1
        del _switched[name]
    return count
