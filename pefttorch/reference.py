"""Pure-PyTorch versions of every pefttorch op: the oracle the kernels are tested against.

They favour plainness over speed and share no code with the C++/CUDA kernels, including the dropout
mask, which is recomputed here from the same counter-based definition (see csrc/common/philox.h).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels (and these references) compute in for tensors of `dtype`: float64 for float64,
    float32 for the others (half and bfloat16 values are widened, and results rounded back once)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_MASK32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of a * b for a 32-bit constant a and int64 tensor b < 2**32.

    The 64-bit product would overflow int64, so it is formed from 16-bit pieces of a: every
    intermediate stays below 2**49.
    """
    p = (a & 0xFFFF) * b  # < 2**48
    q = (a >> 16) * b  # < 2**48
    mid = q + (p >> 16)  # a*b = mid * 2**16 + (p & 0xFFFF)
    hi = mid >> 16
    lo = ((mid & 0xFFFF) << 16) | (p & 0xFFFF)
    return hi, lo


def philox4x32_10(counter: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    """Philox4x32-10 of int64 counters of shape (..., 4) (32-bit words) under a 64-bit key (k0, k1).

    Returns the four 32-bit output words as int64, shape (..., 4).
    """
    c0, c1, c2, c3 = (counter[..., i].to(torch.int64) for i in range(4))
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_W[0]) & _MASK32
        k1 = (k1 + _PHILOX_W[1]) & _MASK32
    return torch.stack([c0, c1, c2, c3], dim=-1)


def dropout_threshold(p: float) -> int:
    """Philox words below this are dropped: floor(p * 2**32), as the kernels compute it."""
    return min(math.floor(p * 4294967296.0), 0xFFFFFFFF)


def dropout_keep(numel: int, p: float, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The keep mask (bool, shape (numel,)) of the first `numel` elements in row-major order."""
    seed &= (1 << 64) - 1
    groups = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device)
    zero = torch.zeros_like(groups)
    counter = torch.stack([groups & _MASK32, groups >> 32, zero, zero], dim=-1)
    words = philox4x32_10(counter, (seed & _MASK32, seed >> 32)).reshape(-1)[:numel]
    return words >= dropout_threshold(p)


def dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Inverted dropout of x with the mask the kernels draw for (p, seed).

    Element i of x, counted row-major over its logical shape, is kept with probability 1 - p; kept
    elements are multiplied by 1 / (1 - p), dropped ones by 0 (so NaN stays NaN, as in torch.dropout).
    """
    if p == 0.0:
        return x
    keep = dropout_keep(x.numel(), p, seed, x.device).view(x.shape)
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scaling: float = 1.0,
    dropout_p: float = 0.0,
    seed: int | None = None,
) -> torch.Tensor:
    """y = x W^T + b + scaling * dropout(x) A^T B^T, differentiable by autograd."""
    if dropout_p > 0.0 and seed is None:
        raise ValueError("dropout_p > 0 needs the seed the kernel was given")
    x_d = dropout(x, dropout_p, seed) if dropout_p > 0.0 else x
    return F.linear(x, weight, bias) + scaling * ((x_d @ lora_a.t()) @ lora_b.t())


def ranked_lora_factors(a: torch.Tensor, e: torch.Tensor, b_t: torch.Tensor, n: int,
                        dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The LoRA factors of a ranked layer's first `n` components (storage a: (capacity, in), e: (capacity, 1),
    b_t: (capacity, out)): A = diag(e) a, formed in the storage dtype, and B = b_t^T, both cast to `dtype`."""
    return (a[:n] * e[:n]).to(dtype), b_t[:n].t().to(dtype)


def ranked_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    e: torch.Tensor,
    b_t: torch.Tensor,
    *,
    rank: int,
    in_use: int,
    scaling: float,
    dropout_p: float = 0.0,
    seed: int | None = None,
) -> torch.Tensor:
    """A ranked LoRA layer (IncreLoRA, AdaLoRA): ``lora_linear`` with A = diag(e) a and B = b_t^T over the first
    `in_use` components of the storage (a: (capacity, in), e: (capacity, 1), b_t: (capacity, out)); the e of
    the reserve components (rows rank..in_use) is held fixed (no gradient). The low-rank factors are cast to
    x's dtype, as the layer does."""
    a_n, b_n = ranked_lora_factors(a, torch.cat([e[:rank], e[rank:].detach()]), b_t, in_use, x.dtype)
    return lora_linear(x, weight, a_n, b_n, bias, scaling=scaling, dropout_p=dropout_p, seed=seed)


# --------------------------------------------------------------------------------------------------
# Sparse activations (DEFT)


def density_loss(a: torch.Tensor, eps: float) -> torch.Tensor:
    """mean(a^2 / (a^2 + eps)), in float32 (float64 for float64 a): near 1 for |a| >> sqrt(eps), 0 at 0."""
    a = a.to(opmath_dtype(a.dtype))
    a2 = a * a
    # |a| above sqrt(max): a2 is inf, and inf / inf NaN where the term's limit is 1 (an inf a stays NaN, as its
    # gradient is)
    return torch.where(a2.isinf() & a.isfinite(), 1.0, a2 / (a2 + eps)).mean()


def activation_density(a: torch.Tensor, threshold: float) -> torch.Tensor:
    """Share of the elements of a with |a| > threshold (compared in float32; float64 for float64 a), the count
    divided by the size exactly and then rounded: a float32 mean would depend on the device (CUDA multiplies by
    1/n, one ulp off the quotient)."""
    a = a.to(opmath_dtype(a.dtype))
    return ((a.abs() > threshold).sum(dtype=torch.float64) / a.numel()).to(a.dtype)


ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "silu": F.silu,
}


def sparse_mlp(
    x: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor | None,
    w_up: torch.Tensor | None,
    b_up: torch.Tensor | None,
    w_down_t: torch.Tensor,
    b_down: torch.Tensor | None,
    activation: str,
    threshold: float,
) -> torch.Tensor:
    """The MLP with every activation of magnitude <= threshold set to zero, computed densely.

    g = act(x W_in^T + b_in); h = g, or g * (x W_up^T + b_up) for a gated MLP; h is zeroed where
    |g| <= threshold; y = h W_down_t + b_down, with w_down_t = W_down^T of shape (intermediate, out).
    """
    g = ACTIVATIONS[activation](F.linear(x, w_in, b_in))
    h = g * F.linear(x, w_up, b_up) if w_up is not None else g
    if threshold > 0.0:
        # compared in float32 at least, as the CPU kernel does (a half-precision threshold would be rounded);
        # zeroed where |g| <= threshold, so a NaN gate stays active and the NaN propagates as in the dense MLP
        inactive = g.abs().to(torch.promote_types(g.dtype, torch.float32)) <= threshold
        h = torch.where(inactive, torch.zeros((), dtype=h.dtype, device=h.device), h)
    y = h @ w_down_t
    return y + b_down if b_down is not None else y


def reversible_coupling(x: torch.Tensor, f: torch.Tensor, scale: float) -> torch.Tensor:
    """One half of a reversible layer (MEFT): y = scale * x + f, in x's dtype (the stream's).

    f (the output of F or G, in the model's dtype) is widened; the sum is formed in float32 (float64
    for float64 streams) and rounded once.
    """
    acc = opmath_dtype(x.dtype)
    return (scale * x.to(acc) + f.to(acc)).to(x.dtype)


def reversible_coupling_backward(
    y: torch.Tensor, f: torch.Tensor, grad_y: torch.Tensor, grad_other: torch.Tensor, vjp: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward step of y = scale * x + f(other stream), which needs no saved x:

    x = (y - f) / scale (the input, reconstructed), grad_x = scale * grad_y, and the other stream's
    gradient updated with the vector-Jacobian product of f: grad_other + vjp. Results in y's dtype,
    each formed in float32 (float64 for float64 streams) and rounded once.
    """
    acc = opmath_dtype(y.dtype)
    x = ((y.to(acc) - f.to(acc)) / scale).to(y.dtype)
    grad_x = (scale * grad_y.to(acc)).to(y.dtype)
    grad_other_out = (grad_other.to(acc) + vjp.to(acc)).to(y.dtype)
    return x, grad_x, grad_other_out


def rank_importance(
    lora_a: list[torch.Tensor], lora_b: list[torch.Tensor], lora_e: list[torch.Tensor],
    grad_tiles: list[torch.Tensor], row_offset: list[int], row_stride: list[int], col_offset: list[int],
    col_stride: list[int], rank: list[int], weight: list[float],
) -> torch.Tensor:
    """IncreLoRA's importance of each adapted module m, ``weight[m] * sum |dW * G|`` over a sampled grid.

    dW = B[:, :n] diag(E[:n]) A[:n] is the module's low-rank update without its scaling (n = rank[m]
    components; lora_a (cap, in), lora_b (out, cap), lora_e (cap, 1)), and G = grad_tiles[m] holds the
    gradient of the loss w.r.t. the update at the sampled rows ``i = row_offset + ii * row_stride < out``
    and columns ``j = col_offset + jj * col_stride < in``: shape (len(rows), len(cols)). The scaling, the
    inverse inclusion probability of the sample (row_stride * col_stride) and IncreLoRA's 1/sqrt(numel)
    all go into `weight`. With strides of 1 the sum is over the whole matrix: the exact score.

    Formed here with dW materialised, in float64; returns a float32 tensor of shape (modules,).
    """
    scores = []
    for a, b, e, g, r0, rs, c0, cs, n, w in zip(lora_a, lora_b, lora_e, grad_tiles, row_offset, row_stride,
                                                col_offset, col_stride, rank, weight, strict=True):
        dw = b[:, :n].double() @ (e.reshape(-1, 1)[:n].double() * a[:n].double())  # e: (cap, 1) or (cap,)
        sampled = dw[r0::rs, c0::cs]
        scores.append(w * (sampled * g.double()).abs().sum())
    device = lora_a[0].device if lora_a else "cpu"
    return torch.stack(scores).float() if scores else torch.zeros(0, device=device)


# --------------------------------------------------------------------------------------------------
# Bottleneck adapters (Houlsby, Pfeiffer, parallel)


def bottleneck_adapter(
    x: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor | None, w_up: torch.Tensor,
    b_up: torch.Tensor | None, residual: torch.Tensor | None, add_input: bool, activation: str, scale: float,
) -> torch.Tensor:
    """A bottleneck adapter with its residual: ``y = scale * (act(x W_down^T + b_down) W_up^T + b_up)``, plus x
    when `add_input` (a sequential adapter: out = in + f(in)) and plus `residual` when given (a parallel adapter
    adds its output to the block's). x: (..., d_in); w_down (m, d_in); w_up (d_out, m); residual (..., d_out)."""
    a = ACTIVATIONS[activation](F.linear(x, w_down, b_down))
    y = scale * F.linear(a, w_up, b_up)
    if add_input:
        y = y + x
    if residual is not None:
        y = y + residual
    return y


# --------------------------------------------------------------------------------------------------
# Rank allocation: the per-component AdamW step of pefttorch.optim.RankAwareAdamW


def component_adamw_(
    params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], rows: list[int], lr: float, beta1: float,
    beta2: float, eps: float, weight_decay: float, warmup: list[float],
) -> None:
    """AdamW on the first rows[m] rows (components) of each 2-D tensor params[m], in place, where row k has its
    own step count s = steps[m][k] (already incremented for this step; float32) and hence its own bias
    corrections and learning rate ``lr * min(1, s / warmup[m])`` (plain lr when warmup[m] == 0):

        p *= 1 - lr_k * weight_decay;  m += (1 - beta1) (g - m);  v = beta2 v + (1 - beta2) g^2
        p -= lr_k / (1 - beta1^s) * m / (sqrt(v / (1 - beta2^s)) + eps)

    Computed in float32 (float64 for float64 tensors) and rounded once into each tensor; rows beyond
    rows[m] are not touched."""
    for p, g, m, v, s, n, w in zip(params, grads, exp_avgs, exp_avg_sqs, steps, rows, warmup, strict=True):
        if n == 0:
            continue
        acc = opmath_dtype(p.dtype)
        s = s[:n].to(acc).unsqueeze(1)
        lr_k = lr * (torch.clamp(s / w, max=1.0) if w > 0 else torch.ones_like(s))
        pn, gn, mn, vn = (t[:n].to(acc) for t in (p, g, m, v))
        pn = pn * (1 - lr_k * weight_decay)
        mn = mn + (1 - beta1) * (gn - mn)
        vn = beta2 * vn + (1 - beta2) * gn * gn
        pn = pn - lr_k / (1 - beta1**s) * mn / ((vn / (1 - beta2**s)).sqrt() + eps)
        p[:n] = pn.to(p.dtype)
        m[:n] = mn.to(m.dtype)
        v[:n] = vn.to(v.dtype)


def rotary_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """Rotary position embedding in transformers' half-split layout: ``x * cos + rotate_half(x) * sin`` with
    ``rotate_half(x) = cat(-x[..., h:], x[..., :h])`` (h = half the last dimension), cos and sin broadcast to x.

    With `transpose`, the transposed rotation (the gradient w.r.t. x of the above, given the output's gradient
    as x): ``x * cos + cat(x[..., h:] * sin[..., h:], -(x[..., :h] * sin[..., :h]))``. Formed in float32 (float64
    for float64 x), each product and sum rounded there, the result rounded once to x's dtype; contiguous.
    """
    acc = opmath_dtype(x.dtype)
    xa, c, s = x.to(acc), cos.to(acc), sin.to(acc)
    h = x.shape[-1] // 2
    if transpose:
        xs = xa * s
        turned = torch.cat([xs[..., h:], -xs[..., :h]], dim=-1)
    else:
        turned = torch.cat([-xa[..., h:], xa[..., :h]], dim=-1) * s
    return (xa * c + turned).to(x.dtype).contiguous()
