"""The rotary embedding op (transformers' half-split RoPE) against pefttorch.reference and a float64 oracle: forward
and the transposed rotation bit-exact to the reference, gradients of x, cos and sin, strides, broadcasting, bad
input, opcheck, gradcheck; and the HF-compatible apply_rotary_pos_emb against transformers' own."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from helpers import DEVICES, assert_close_to_oracle, rand

import pefttorch
from pefttorch import functional, ops, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (x shape, cos shape): a 1-D row, 3-D and 4-D inputs, odd sizes, head_dim 2 and 34 (not multiples of 8),
# cos broadcast over heads (transformers' layout) and over everything but the last dimension
SHAPES = [((6,), (6,)), ((3, 17, 2), (17, 2)), ((2, 3, 5, 34), (2, 1, 5, 34)), ((1, 4, 1, 8), (8,)),
          ((2, 1, 3, 7, 6), (1, 1, 3, 7, 6))]


def make(shape, cos_shape, dtype, device, layout, seed):
    torch.manual_seed(seed)
    if layout == "strided":  # as transformers makes q: (batch, tokens, heads, d) transposed to (batch, heads, ...)
        x = rand(*shape[:-1], 2 * shape[-1], dtype=dtype, device=device)[..., ::2] if len(shape) < 3 else \
            rand(*shape[:-3], shape[-2], shape[-3], shape[-1], dtype=dtype, device=device).transpose(-2, -3)
    else:
        x = rand(*shape, dtype=dtype, device=device)
    return x, rand(*cos_shape, dtype=dtype, device=device), rand(*cos_shape, dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("transpose", [False, True])
def test_matches_the_reference_bit_for_bit(device, dtype, shapes, layout, transpose):
    x, cos, sin = make(*shapes, dtype, device, layout, seed=len(shapes[0]))
    out = ops.rotary_embedding(x, cos, sin, transpose)
    want = reference.rotary_embedding(x, cos, sin, transpose)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    assert torch.equal(out, want), (out - want).abs().max()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", SHAPES[1:3], ids=str)
def test_gradients_against_a_float64_oracle(device, dtype, shapes):
    x, cos, sin = make(*shapes, dtype, device, "strided", seed=3)
    leaves = [t.detach().requires_grad_() for t in (x, cos, sin)]
    out = ops.rotary_embedding(*leaves, False)
    dy = rand(*out.shape, dtype=dtype, device=device)
    got = torch.autograd.grad(out, leaves, dy)
    # the plain computation in the same dtype (transformers' way), and float64
    base_leaves = [t.detach().requires_grad_() for t in (x, cos, sin)]
    h = x.shape[-1] // 2
    bx, bc, bs = base_leaves
    base = bx * bc + torch.cat([-bx[..., h:], bx[..., :h]], -1) * bs
    base_grads = torch.autograd.grad(base, base_leaves, dy)
    o_leaves = [t.detach().double().requires_grad_() for t in (x, cos, sin)]
    oracle = reference.rotary_embedding(*o_leaves)
    o_grads = torch.autograd.grad(oracle, o_leaves, dy.double())
    assert_close_to_oracle("out", out, base, oracle)
    for name, g, b, o in zip(["dx", "dcos", "dsin"], got, base_grads, o_grads, strict=True):
        assert_close_to_oracle(name, g, b, o)


def test_the_gradient_of_x_is_the_transposed_rotation_and_x_is_not_kept():
    x, cos, sin = make((2, 3, 5, 8), (2, 1, 5, 8), torch.float32, "cpu", "contiguous", seed=5)
    x.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = ops.rotary_embedding(x, cos, sin, False)
    assert not any(t.shape == x.shape for t in saved)  # cos and sin (their broadcast shape) only
    dy = rand(*out.shape)
    (gx,) = torch.autograd.grad(out, x, dy)
    assert torch.equal(gx, ops.rotary_embedding(dy, cos, sin, True))
    # and the rotation is orthogonal when cos^2 + sin^2 = 1 (real RoPE): transposing undoes it
    angle = rand(2, 1, 5, 4)
    c, s = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    torch.testing.assert_close(ops.rotary_embedding(ops.rotary_embedding(x, c, s), c, s, True), x)


@pytest.mark.parametrize("transpose", [False, True])
def test_gradcheck_in_float64(transpose):
    x, cos, sin = (t.requires_grad_() for t in make((2, 3, 4, 6), (2, 1, 4, 6), torch.float64, "cpu",
                                                      "strided", seed=7))
    assert torch.autograd.gradcheck(lambda a, b, c: ops.rotary_embedding(a, b, c, transpose), (x, cos, sin))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x, cos, sin = make((2, 3, 5, 8), (2, 1, 5, 8), torch.float32, device, "strided", seed=9)
    for transpose in (False, True):
        torch.library.opcheck(torch.ops.pefttorch.rotary_embedding.default,
                              (x.requires_grad_(), cos, sin, transpose))


def test_empty_and_bad_input():
    x = rand(2, 0, 4)
    assert ops.rotary_embedding(x, rand(4), rand(4)).shape == (2, 0, 4)
    x, c = rand(2, 3, 4), rand(3, 4)
    bad = [
        ((rand(2, 3, 5), rand(5), rand(5)), "must be even"),
        ((x, rand(3, 6), rand(3, 6)), "does not broadcast"),
        ((x, rand(2, 4), rand(2, 4)), "does not broadcast"),
        ((x, c, c.double()), "dtype"),
        ((x.int(), c.int(), c.int()), "unsupported dtype"),
        ((x, c, rand(2, 2, 3, 4)), "does not broadcast"),
        ((rand(1, 1, 1, 1, 1, 4), rand(4), rand(4)), "1 to 5 dimensions"),
        ((rand(()), rand(()), rand(())), "1 to 5 dimensions"),
    ]
    for args, message in bad:
        with pytest.raises(RuntimeError, match=message):
            ops.rotary_embedding(*args, False)
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="is on"):
            ops.rotary_embedding(x.cuda(), c, c, False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rotary_pos_emb_as_transformers(device, dtype):
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    config = llama.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    rope = llama.LlamaRotaryEmbedding(config).to(device)
    q = rand(2, 7, 4, 16, dtype=dtype, device=device).transpose(1, 2)  # (batch, heads, tokens, head_dim)
    k = rand(2, 7, 2, 16, dtype=dtype, device=device).transpose(1, 2)
    cos, sin = rope(q, torch.arange(7, device=device).expand(2, 7))
    got = functional.apply_rotary_pos_emb(q, k, cos, sin)
    want = llama.apply_rotary_pos_emb(q, k, cos, sin)
    for g, w, x in zip(got, want, (q, k), strict=True):
        oracle = reference.rotary_embedding(x.double(), cos.double().unsqueeze(1), sin.double().unsqueeze(1))
        assert_close_to_oracle("rope", g, w, oracle)
    assert pefttorch.functional.apply_rotary_pos_emb is functional.apply_rotary_pos_emb


def test_apply_rotary_pos_emb_promotes_to_a_wider_cos_as_transformers():
    """float16 q with float32 cos: transformers' formula returns float32; the kernel alone returned float16."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    q, k = rand(1, 2, 5, 8, dtype=torch.float16), rand(1, 1, 5, 8, dtype=torch.float16)
    cos, sin = rand(1, 5, 8), rand(1, 5, 8)
    for got, want in zip(functional.apply_rotary_pos_emb(q, k, cos, sin), llama.apply_rotary_pos_emb(q, k, cos, sin),
                         strict=True):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want)


# ---- fuse_rotary: transformers' apply_rotary_pos_emb switched, per modeling module


@pytest.fixture
def unfused():
    yield
    pefttorch.unfuse_rotary()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fuse_rotary_keeps_a_llama_training_step(unfused, device, dtype):
    from hf_models import fresh, inputs

    batch = {k: v.to(device) for k, v in inputs("llama").items()}
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=5e-2, atol=2e-2)
    results = []
    for switch in (False, True):
        model = pefttorch.get_peft_model(fresh("llama").to(device=device, dtype=dtype), pefttorch.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False)).train()
        if switch:
            report = pefttorch.fuse_rotary(model)
            assert report.switched == ["transformers.models.llama.modeling_llama"] and not report.skipped
        with torch.profiler.profile() as prof:
            out = model(**batch, labels=batch["input_ids"])
            out.loss.backward()
        calls = sum(e.count for e in prof.key_averages() if e.key == "pefttorch::rotary_embedding")
        assert calls == (8 if switch else 0)  # q and k of 2 layers, forward and backward
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, **tol)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], **tol, msg=n)


def test_fuse_rotary_is_undone_and_leaves_other_families_and_calls_alone(unfused):
    from hf_models import fresh, inputs, logits

    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    original = llama.apply_rotary_pos_emb
    assert not pefttorch.fuse_rotary(fresh("bert")).switched  # no rotary embedding there
    model, batch = fresh("llama"), inputs("llama")
    before = logits(model, batch)
    assert pefttorch.fuse_rotary(model).switched and llama.apply_rotary_pos_emb is not original
    assert pefttorch.fuse_rotary(model).switched  # twice: still switched, one original kept
    torch.testing.assert_close(logits(model, batch), before, rtol=1e-5, atol=1e-6)
    # a cos of another dtype than q's: transformers promotes, so the call goes to its own function
    q, k, cos, sin = rand(1, 2, 3, 8), rand(1, 1, 3, 8), rand(1, 3, 8, dtype=torch.float64), rand(1, 3, 8)
    got = llama.apply_rotary_pos_emb(q, k, cos, sin)
    assert all(torch.equal(g, w) for g, w in zip(got, original(q, k, cos, sin), strict=True))
    # a whole model saved with torch.save loads while switched (transformers' `kernels` wrapper, of which each
    # attention layer keeps a copy, unpickles as type(modeling.apply_rotary_pos_emb)()) and computes the same
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    torch.testing.assert_close(logits(torch.load(buffer, weights_only=False), batch), before, rtol=1e-5, atol=1e-6)
    fused = llama.apply_rotary_pos_emb  # copied as a function is: itself
    assert copy.copy(fused) is fused and copy.deepcopy({"rope": fused})["rope"] is fused
    assert pefttorch.unfuse_rotary() == 1 and llama.apply_rotary_pos_emb is original
    assert torch.equal(logits(model, batch), before)


def test_fuse_rotary_leaves_other_arithmetic_alone(unfused, monkeypatch):
    import types

    def interleaved(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):  # GPT-J's layout: pairs (2i, 2i + 1)
        def turn(x):
            return torch.stack([-x[..., 1::2], x[..., ::2]], -1).flatten(-2)
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + turn(q) * sin, k * cos + turn(k) * sin

    modeling = types.ModuleType("fake_modeling")
    modeling.apply_rotary_pos_emb = interleaved
    monkeypatch.setitem(__import__("sys").modules, "fake_modeling", modeling)
    attention = type("FakeAttention", (torch.nn.Module,), {"__module__": "fake_modeling"})
    report = pefttorch.fuse_rotary(torch.nn.Sequential(attention()))
    assert not report.switched and "not the half-split rotation" in report.skipped["fake_modeling"]
    assert modeling.apply_rotary_pos_emb is interleaved


@pytest.mark.parametrize("interleave", [True, False])
def test_fuse_rotary_reports_a_model_that_calls_the_interleaved_variant(unfused, monkeypatch, interleave):
    """DeepSeek-V3 with rope_interleave=True calls apply_rotary_pos_emb_interleave: the module was reported switched
    and the kernel never ran; it is reported left alone. Without the flag the kernel runs."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DeepseekV3Config"):
        pytest.skip("no DeepSeek-V3 in this transformers")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
        first_k_dense_replace=1, rope_interleave=interleave)).eval()
    ids = torch.randint(0, 64, (2, 5))
    before = model(input_ids=ids).logits
    calls = []
    kernel = ops.rotary_embedding
    monkeypatch.setattr(ops, "rotary_embedding", lambda *a: calls.append(1) or kernel(*a))
    report = pefttorch.fuse_rotary(model)
    name = "transformers.models.deepseek_v3.modeling_deepseek_v3"
    if interleave:
        assert not report.switched and "rope_interleave=True" in report.skipped[name]
    else:
        assert report.switched == [name] and not report.skipped
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-6)
    assert bool(calls) == (not interleave)


def test_fuse_rotary_passes_calls_without_k_to_the_original(unfused, monkeypatch):
    """Families whose function takes k as optional (Qwen4-Exp: `apply_rotary_pos_emb(q, k=None, cos=None,
    sin=None, unsqueeze_dim=1)`, called with q alone and cos/sin by keyword) passed the probe, made with q and k,
    and every q-only call then failed in the switched function ("missing 1 required positional argument: 'k'")."""
    import types

    def optional_k(q, k=None, cos=None, sin=None, unsqueeze_dim=1):
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        q = reference.rotary_embedding(q, cos, sin)
        return q if k is None else (q, reference.rotary_embedding(k, cos, sin))

    modeling = types.ModuleType("fake_optional_k_modeling")
    modeling.apply_rotary_pos_emb = optional_k
    monkeypatch.setitem(__import__("sys").modules, "fake_optional_k_modeling", modeling)
    attention = type("FakeAttention", (torch.nn.Module,), {"__module__": "fake_optional_k_modeling"})
    assert pefttorch.fuse_rotary(torch.nn.Sequential(attention())).switched == ["fake_optional_k_modeling"]
    q, k, cos, sin = rand(2, 4, 5, 8), rand(2, 1, 5, 8), rand(2, 5, 8), rand(2, 5, 8)
    torch.testing.assert_close(modeling.apply_rotary_pos_emb(q, cos=cos, sin=sin), optional_k(q, cos=cos, sin=sin))
    for got, want in zip(modeling.apply_rotary_pos_emb(q, k, cos=cos, sin=sin), optional_k(q, k, cos, sin),
                         strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_unsqueeze_dim_2_for_tokens_before_heads(unfused, monkeypatch, device):
    """q and k in the (batch, tokens, heads, head_dim) layout take cos and sin with unsqueeze_dim=2, as in
    transformers: both functional.apply_rotary_pos_emb and the function fuse_rotary installs must honour it (by
    keyword and by position), through the kernel, as transformers' own does. tokens != heads, so a dimension
    hard-coded to 1 cannot broadcast by chance."""
    from hf_models import fresh

    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    original = llama.apply_rotary_pos_emb
    q, k = rand(2, 7, 4, 16, device=device), rand(2, 7, 2, 16, device=device)  # (batch, tokens, heads, head_dim)
    cos, sin = rand(2, 7, 16, device=device), rand(2, 7, 16, device=device)  # (batch, tokens, head_dim)
    want = original(q, k, cos, sin, unsqueeze_dim=2)
    assert pefttorch.fuse_rotary(fresh("llama")).switched == ["transformers.models.llama.modeling_llama"]
    calls, kernel = [], ops.rotary_embedding
    monkeypatch.setattr(ops, "rotary_embedding", lambda *args: calls.append(1) or kernel(*args))
    for name, got in (("functional", functional.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)),
                      ("fused, keyword", llama.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)),
                      ("fused, positional", llama.apply_rotary_pos_emb(q, k, cos, sin, 2))):
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, msg=name)
    assert len(calls) == 3 * 2  # q and k of each call went to the kernel, not to transformers' function


@pytest.mark.parametrize("family", ["phi3", "gpt_neox"])
def test_partial_rotary_goes_through_the_kernel(unfused, family):
    """Phi3 and GPT-NeoX rotate only part of each head (a cos narrower than the head): those calls once all fell
    back to transformers' function while the report said "switched". The kernel rotates the share, the rest passes;
    a training step is transformers' own."""
    import transformers

    def build():
        torch.manual_seed(0)
        if family == "phi3":
            return transformers.Phi3ForCausalLM(transformers.Phi3Config(
                vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                partial_rotary_factor=0.5, pad_token_id=0))
        return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            rotary_pct=0.25))

    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    results = []
    for switch in (False, True):
        model = build().train()
        if switch:
            assert pefttorch.fuse_rotary(model).switched
        with torch.profiler.profile() as prof:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        calls = sum(e.count for e in prof.key_averages() if e.key == "pefttorch::rotary_embedding")
        assert calls == (8 if switch else 0)  # q and k of 2 layers, forward and backward
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-6, msg=n)


def test_fuse_rotary_leaves_functions_that_read_cos_otherwise_alone(unfused, monkeypatch):
    """DINOv3's function takes a cos with no batch dimension and rotates only the patch tokens after the class and
    register tokens. It passed a probe of batch 1 and was switched, and the model then failed in the kernel: now
    the probe (batch, heads and tokens all different) refuses it, and a call whose cos is not one row per token of q
    goes to the original even where a probe passed."""
    import types

    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DINOv3ViTModel"):
        pytest.skip("this transformers has no DINOv3")
    torch.manual_seed(0)
    model = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_register_tokens=2)).eval()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(pixel_values=pixels).last_hidden_state
    report = pefttorch.fuse_rotary(model)
    assert not report.switched and "failed on a probe" in str(report)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixels).last_hidden_state, want)

    def patches_only(q, k, cos, sin, unsqueeze_dim=1):  # the probe's layout as Llama; a 2-D cos as DINOv3
        if cos.dim() == 3:
            cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
            return reference.rotary_embedding(q, cos, sin), reference.rotary_embedding(k, cos, sin)
        prefix = q.shape[-2] - cos.shape[-2]
        return tuple(torch.cat([t[..., :prefix, :], reference.rotary_embedding(t[..., prefix:, :], cos, sin)], -2)
                     for t in (q, k))

    modeling = types.ModuleType("fake_patch_modeling")
    modeling.apply_rotary_pos_emb = patches_only
    monkeypatch.setitem(__import__("sys").modules, "fake_patch_modeling", modeling)
    attention = type("FakeAttention", (torch.nn.Module,), {"__module__": "fake_patch_modeling"})
    assert pefttorch.fuse_rotary(torch.nn.Sequential(attention())).switched == ["fake_patch_modeling"]
    q, k, cos, sin = rand(2, 4, 19, 8), rand(2, 4, 19, 8), rand(16, 8), rand(16, 8)
    for got, expected in zip(modeling.apply_rotary_pos_emb(q, k, cos, sin), patches_only(q, k, cos, sin),
                             strict=True):
        torch.testing.assert_close(got, expected)
