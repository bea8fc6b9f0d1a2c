"""Dropout on the low-rank path: the mask is regenerated from a seed, so check it statistically and
check that forward and backward agree on it."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import DEVICES, HAS_CUDA, rand

from pefttorch import functional, reference


def identity_lora(n: int, device: str, requires_grad: bool = False):
    """W = 0, A = B = I: the layer's output is dropout(x) itself."""
    w = torch.zeros(n, n, device=device)
    eye = torch.eye(n, device=device)
    return w, eye.clone().requires_grad_(requires_grad), eye.clone().requires_grad_(requires_grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_and_scale(device, p):
    n, tokens = 64, 256
    w, a, b = identity_lora(n, device)
    x = torch.rand(tokens, n, device=device) + 0.5  # positive, never 0
    y = functional.lora_linear(x, w, a, b, dropout=p)
    kept = y != 0
    rate = kept.float().mean().item()
    sigma = math.sqrt(p * (1 - p) / kept.numel())
    assert abs(rate - (1 - p)) < 5 * sigma, f"keep rate {rate} vs {1 - p}"
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))


@pytest.mark.parametrize("device", DEVICES)
def test_backward_uses_forward_mask(device):
    n = 32
    w, a, b = identity_lora(n, device)
    x = (torch.rand(50, n, device=device) + 0.5).requires_grad_()
    y = functional.lora_linear(x, w, a, b, dropout=0.4)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    # dy/dx is diagonal: 1/(1-p) where kept, 0 where dropped, the same pattern as y.
    torch.testing.assert_close(gx, (y != 0).float() / 0.6)


@pytest.mark.parametrize("device", DEVICES)
def test_masks_differ_across_calls_and_reproduce_under_seed(device):
    n = 32
    w, a, b = identity_lora(n, device)
    x = torch.rand(40, n, device=device) + 0.5
    torch.manual_seed(0)
    y1 = functional.lora_linear(x, w, a, b, dropout=0.5)
    y2 = functional.lora_linear(x, w, a, b, dropout=0.5)
    torch.manual_seed(0)
    y1_again = functional.lora_linear(x, w, a, b, dropout=0.5)
    assert not torch.equal(y1 != 0, y2 != 0)
    torch.testing.assert_close(y1, y1_again, rtol=0, atol=0)
    g = torch.Generator().manual_seed(5)
    g2 = torch.Generator().manual_seed(5)
    torch.testing.assert_close(functional.lora_linear(x, w, a, b, dropout=0.5, generator=g),
                               functional.lora_linear(x, w, a, b, dropout=0.5, generator=g2), rtol=0, atol=0)


def test_reference_mask_statistics_and_alignment():
    # The reference mask itself: keep rate, and independence of neighbouring elements that share a
    # Philox block (elements 4g..4g+3) or do not.
    keep = reference.dropout_keep(400_000, 0.3, seed=11)
    assert abs(keep.float().mean().item() - 0.7) < 0.005
    k = keep.view(-1, 4).float()
    corr = torch.corrcoef(torch.stack([k[:, 0], k[:, 1], k[:, 3], torch.roll(k[:, 0], 1)]))
    assert corr.fill_diagonal_(0).abs().max() < 0.01


def test_philox_known_answers():
    # Known-answer vectors of Philox4x32-10 published with Random123.
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for counter, key, want in cases:
        assert tuple(reference.philox4x32_10(torch.tensor(counter), key).tolist()) == want


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_same_mask_on_cpu_and_cuda():
    n = 24
    x = torch.rand(33, n) + 0.5
    w, a, b = identity_lora(n, "cpu")
    g_cpu, g_cuda = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    y_cpu = functional.lora_linear(x, w, a, b, dropout=0.3, generator=g_cpu)
    y_cuda = functional.lora_linear(x.cuda(), w.cuda(), a.cuda(), b.cuda(), dropout=0.3, generator=g_cuda)
    assert torch.equal(y_cpu != 0, y_cuda.cpu() != 0)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_only_on_lora_path(device):
    # The base path sees x undropped: with B = 0 the output is exactly the base layer.
    x, w = rand(8, 16, device=device), rand(4, 16, device=device)
    a, b = rand(3, 16, device=device), torch.zeros(4, 3, device=device)
    torch.testing.assert_close(functional.lora_linear(x, w, a, b, dropout=0.7), x @ w.t())


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointing_replays_the_default_generator_and_refuses_another(use_reentrant):
    """Checkpointing restores torch's global RNG before recomputing, so dropout from it gets the forward's mask again;
    a generator= of the user's gave the recomputation another seed: the gradients were silently wrong (the output
    was right). That is refused now, in backward, where the recomputation happens."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    x, w, b = torch.randn(6, 5), torch.randn(7, 5), torch.randn(7, 3)
    a0 = torch.randn(3, 5)

    def grads(ckpt, generator=None):
        a = a0.clone().requires_grad_()
        torch.manual_seed(1)
        f = lambda a: functional.lora_linear(x, w, a, b, dropout=0.3, generator=generator)  # noqa: E731
        y = checkpoint(f, a, use_reentrant=use_reentrant) if ckpt else f(a)
        y.square().sum().backward()
        return a.grad

    torch.testing.assert_close(grads(True), grads(False), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"dropout with generator= cannot be recomputed by activation checkpointing"):
        grads(True, torch.Generator().manual_seed(9))
    grads(False, torch.Generator().manual_seed(9))  # without checkpointing the generator is fine
