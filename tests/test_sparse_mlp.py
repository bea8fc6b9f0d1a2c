"""SparseMLP and pefttorch.sparsify on transformers MLP blocks: equal to the dense block at threshold 0, to the
masked reference above it (within the documented bound of the dense block), and clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import DEVICES
from hf_models import FAMILIES

import pefttorch
from pefttorch import reference
from pefttorch.nn import SparseMLP

transformers = pytest.importorskip("transformers")

# (family, path of one MLP block, how the original block computes its MLP from the block's input)
BLOCKS = {
    "llama": ("model.layers.0.mlp", lambda m, x: m(x)),
    "t5": ("encoder.block.0.layer.1.DenseReluDense", lambda m, x: m(x)),
    "gpt2": ("transformer.h.0.mlp", lambda m, x: m(x)),
    "bert": ("bert.encoder.layer.0", lambda m, x: m.output.dense(m.intermediate(x))),
    "marian": ("model.encoder.layers.0", lambda m, x: m.fc2(m.activation_fn(m.fc1(x)))),
}


def block(family, dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    path, dense = BLOCKS[family]
    module = FAMILIES[family].build().get_submodule(path).to(device=device, dtype=dtype).eval()
    for p in module.parameters():  # random biases too (the tiny configs start some at zero)
        torch.nn.init.normal_(p, std=0.3)
    return module, lambda x: dense(module, x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", list(BLOCKS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lead", [(1,), (2, 3), (20,)], ids=str)  # 20 tokens: beyond the decode kernels
def test_threshold_zero_equals_the_dense_block(device, family, dtype, lead):
    module, dense = block(family, dtype, device)
    sparse = SparseMLP.from_mlp(module)
    x = torch.randn(*lead, sparse.in_features, device=device).to(dtype)
    with torch.no_grad():
        want = dense(x)
        got = sparse(x)
    assert got.shape == want.shape and got.dtype == dtype
    tol = {torch.float32: 2e-5, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


def _gapped_threshold(g: torch.Tensor, quantile: float) -> float:
    """A threshold near the given quantile of |g| in the middle of a wide gap, so rounding cannot flip a mask."""
    v = g.abs().flatten().sort().values
    v = v[v > 0]  # ReLU's zeros are masked at any threshold
    lo = int(quantile * (len(v) - 1))
    window = range(max(lo - 20, 0), min(lo + 20, len(v) - 1))
    i = max(window, key=lambda j: v[j + 1] - v[j])
    assert v[i + 1] - v[i] > 1e-3 * v[i + 1], "no gap wide enough: change the seed"
    return float((v[i] + v[i + 1]) / 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["llama", "bert", "t5"])
@pytest.mark.parametrize("quantile", [0.3, 0.9, 0.99])
def test_threshold_above_zero_is_the_masked_mlp_within_the_bound(device, family, quantile):
    module, dense = block(family, torch.float32, device)
    x = torch.randn(3, module_in(module), device=device)
    probe = SparseMLP.from_mlp(module)
    g = reference.ACTIVATIONS[probe.activation](torch.nn.functional.linear(x.double(), probe.w_in.double(),
                                                                         _double(probe.b_in)))
    sparse = SparseMLP.from_mlp(module, threshold=_gapped_threshold(g, quantile))
    with torch.no_grad():
        got = sparse(x)
        want = reference.sparse_mlp(x.double(), *(_double(t) for t in (sparse.w_in, sparse.b_in, sparse.w_up,
                                                                        sparse.b_up, sparse.w_down_t, sparse.b_down)),
                                    sparse.activation, sparse.threshold)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
        # the documented bound on the distance to the dense block
        gap = (got - dense(x)).abs()
        assert (gap <= sparse.error_bound(x) * (1 + 1e-4) + 1e-4).all()
        assert sparse.active_share(x) < 1.0 or quantile < 0.5


def module_in(module):
    return SparseMLP.from_mlp(module).in_features


def _double(t):
    return None if t is None else t.double()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sparsify_a_model_keeps_its_outputs(family):
    torch.manual_seed(0)
    fam = FAMILIES[family]
    model = fam.build().eval()
    inputs = fam.inputs(torch.Generator().manual_seed(0))
    inputs.pop("labels", None)
    if family in ("t5", "marian"):
        inputs["decoder_input_ids"] = inputs["input_ids"][:, :4]
    with torch.no_grad():
        want = model(**inputs).logits
    dense = copy.deepcopy(model)
    model.train()
    blocks = len(pefttorch.find_mlp_blocks(model))
    names = pefttorch.sparsify(model)
    assert not model.training  # sparsify leaves the model ready for inference
    assert len(names) == blocks > 0
    assert all(isinstance(model.get_submodule(n), SparseMLP) for n in names)
    with torch.no_grad():
        got = model(**inputs).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if fam.generative and family in ("llama", "gpt2"):  # decode: 1 token per step, the sparse kernels' regime
        ids = inputs["input_ids"][:1]
        out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(out, dense.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0))


def test_sparse_kernel_at_low_density_matches_the_reference():
    # a ReLU MLP where 90% of the neurons are off for every token: the decode kernels' sparse path
    torch.manual_seed(0)
    hidden, inter, out = 48, 200, 40
    fc1, fc2 = torch.nn.Linear(hidden, inter), torch.nn.Linear(inter, out)
    with torch.no_grad():
        fc1.bias[20:] = -100.0
    sparse = SparseMLP.from_linears(fc1, fc2, torch.nn.ReLU())
    for tokens in (1, 4, 16):
        x = torch.randn(tokens, hidden)
        assert sparse.active_share(x) <= 0.1 + 1e-6
        with torch.no_grad():
            torch.testing.assert_close(sparse(x), fc2(torch.relu(fc1(x))), rtol=1e-5, atol=1e-5)


def test_construction_and_errors():
    fc1, fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
    sparse = SparseMLP.from_linears(fc1, fc2, torch.nn.GELU(approximate="tanh"), threshold=0.1)
    assert sparse.activation == "gelu_tanh" and "threshold=0.1" in repr(sparse)
    assert sparse.w_in.data_ptr() == fc1.weight.data_ptr()  # shared, not copied
    assert not any(p.requires_grad for p in sparse.parameters())
    sparse.train()
    with pytest.raises(RuntimeError, match="inference module"):
        sparse(torch.randn(2, 8))
    sparse.eval()
    with pytest.raises(RuntimeError, match="dtype|float"):
        sparse(torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="hidden"):
        sparse(torch.randn(2, 9))
    with pytest.raises(ValueError, match="threshold"):
        SparseMLP.from_linears(fc1, fc2, "relu", threshold=-1.0)
    with pytest.raises(ValueError, match="threshold"):
        SparseMLP.from_linears(fc1, fc2, "relu", threshold=float("nan"))
    with pytest.raises(ValueError, match="unsupported activation"):
        SparseMLP.from_linears(fc1, fc2, "tanh")
    with pytest.raises(ValueError, match="QuickGELUActivation is not supported"):
        SparseMLP.from_linears(fc1, fc2, transformers.activations.QuickGELUActivation())
    with pytest.raises(ValueError, match="intermediate"):
        SparseMLP(fc1.weight, torch.randn(15, 8))
    with pytest.raises(ValueError, match="dtype"):
        SparseMLP(fc1.weight, fc2.weight.t().double())
    with pytest.raises(ValueError, match="not an MLP block.*supported are"):
        SparseMLP.from_mlp(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="found no MLP block"):
        pefttorch.sparsify(torch.nn.Sequential(torch.nn.Linear(3, 3)))


class _GatedWithATwist(torch.nn.Module):
    """The parts of a gated MLP, but the gate is cut to its top half before the activation (as Gemma-3n's MLP
    does with activation_sparsity): SparseMLP would compute another function."""

    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj = torch.nn.Linear(8, 16, bias=False), torch.nn.Linear(8, 16, bias=False)
        self.down_proj, self.act_fn = torch.nn.Linear(16, 8, bias=False), torch.nn.SiLU()

    def forward(self, x):
        gate = self.gate_proj(x)
        gate = torch.where(gate > gate.median(-1, keepdim=True).values, gate, torch.zeros_like(gate))
        return self.down_proj(self.act_fn(gate) * self.up_proj(x))


class _LayerWithANormInside(torch.nn.Module):
    """A BART-style layer (its forward also takes the attention mask, so no probe can call it alone) whose forward
    normalises the activation before fc2."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
        self.activation_fn, self.ffn_layernorm = torch.nn.GELU(), torch.nn.LayerNorm(16)

    def forward(self, x, attention_mask):
        return x + self.fc2(self.ffn_layernorm(self.activation_fn(self.fc1(x))))


def test_blocks_with_known_parts_that_compute_otherwise_are_refused():
    """Blocks are found by the names of their parts: one that computes something else between them was swapped all
    the same (a silent wrong answer for Gemma-3n, a shape error at the first forward for Kosmos-2)."""
    twisted = torch.nn.Sequential(_GatedWithATwist())
    with pytest.raises(ValueError, match="computes something else"):
        SparseMLP.from_mlp(twisted[0])
    with pytest.raises(ValueError, match="computes something else"):
        pefttorch.sparsify(twisted)
    assert isinstance(twisted[0], _GatedWithATwist)
    layers = torch.nn.Sequential(_LayerWithANormInside(), _LayerWithANormInside())
    with pytest.raises(ValueError, match="ffn_layernorm .* intermediate width"):
        pefttorch.sparsify(layers)
    assert not any(isinstance(m, SparseMLP) for m in layers.modules())


def test_sparsify_refuses_unmerged_lora_and_leaves_the_model_unchanged():
    model = pefttorch.get_peft_model(FAMILIES["llama"].build(), pefttorch.LoraConfig(target_modules=["down_proj"]))
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="merge the adapters first"):
        pefttorch.sparsify(model)
    assert [type(m) for m in model.modules()] == before
    merged = model.merge_and_unload()
    assert pefttorch.sparsify(merged)


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens, threshold", [(1, 0.0), (1, 1.0), (20, 1.0)])  # dense path, sparse kernel
def test_under_autocast_computes_as_plain_torch_does(family, x_dtype, tokens, threshold):
    """Under torch.autocast the result's dtype once depended on which path ran (float32 from the sparse kernel,
    bfloat16 from the dense path), and a bfloat16 input with float32 weights was refused: the op now computes
    in autocast's dtype, as the dense block's linears (and the reference, in plain torch) do."""
    module, dense = block(family)
    sparse = SparseMLP.from_mlp(module, threshold=threshold)
    x = torch.randn(tokens, sparse.in_features).to(x_dtype)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = reference.sparse_mlp(x, sparse.w_in, sparse.b_in, sparse.w_up, sparse.b_up, sparse.w_down_t,
                                    sparse.b_down, sparse.activation, threshold)
        got = sparse(x)
        assert dense(x).dtype == torch.bfloat16
    assert got.dtype == torch.bfloat16  # as the block's nn.Linear layers give (the reference's bias add promotes)
    torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2 * want.abs().max().item())


def test_sparsify_refuses_parts_with_hooks_it_would_drop():
    """BERT and BART layers are not probed as a whole: a hook on a part sparsify swaps or bypasses (pefttorch's own
    bottleneck adapters and (IA)^3 are hooks) was dropped with it, and the model silently computed without it."""
    model = pefttorch.get_peft_model(FAMILIES["bert"].build(), pefttorch.IA3Config()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"output\.dense \(Linear\) carries forward hooks"):
        pefttorch.sparsify(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # unchanged
    plain = FAMILIES["marian"].build().eval()
    plain.model.encoder.layers[0].fc2.register_forward_hook(lambda module, args, output: output * 2)
    with pytest.raises(ValueError, match=r"fc2 \(Linear\) carries forward hooks"):
        pefttorch.sparsify(plain)


@pytest.mark.parametrize("family", ["llama", "t5", "gpt2"])
def test_sparsify_refuses_hooks_in_blocks_it_replaces_whole(family):
    """Gated, T5 and GPT-2 blocks are replaced whole; only a probe guarded them, which passes while a hook is the
    identity (a fresh (IA)^3 vector, weights loaded later): the hooks were dropped silently. And the probe ran the
    density loss's hooks, which counted it as an evaluation forward."""
    model = FAMILIES[family].build().eval()
    handle = pefttorch.attach_density_loss(model)
    with pytest.raises(ValueError, match=r"act(_fn)? \((\w+)\) carries forward hooks"):
        pefttorch.sparsify(model)
    assert handle.densities("eval") == {}  # no probe ran
    assert not any(isinstance(m, SparseMLP) for m in model.modules())
    handle.remove()
    path = BLOCKS[family][0]
    hook = model.get_submodule(path).register_forward_pre_hook(lambda module, args: None)  # on the block itself
    with pytest.raises(ValueError, match=rf"{path} \(\w+\) carries forward hooks"):
        pefttorch.sparsify(model)
    hook.remove()
    ia3 = pefttorch.get_peft_model(FAMILIES["llama"].build(), pefttorch.IA3Config(
        target_modules=["down_proj"], feedforward_modules=["down_proj"])).eval()
    with pytest.raises(ValueError, match=r"mlp\.down_proj \(Linear\) carries forward hooks"):
        pefttorch.sparsify(ia3)


def test_sparsify_refuses_a_bypassed_part_holding_more_than_the_mlp():
    """RoBERTa-PreLayerNorm's intermediate normalises its input before `dense`: sparsify bypassed the whole
    intermediate and dropped the LayerNorm, and the model's outputs changed at threshold 0."""
    from transformers import RobertaPreLayerNormConfig, RobertaPreLayerNormForSequenceClassification

    torch.manual_seed(0)
    model = RobertaPreLayerNormForSequenceClassification(RobertaPreLayerNormConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        num_labels=3, max_position_embeddings=70, pad_token_id=1)).eval()
    with pytest.raises(ValueError, match=r"layer\.0: its intermediate\.LayerNorm \(LayerNorm\) is more than the MLP"):
        pefttorch.sparsify(model)
    assert not any(isinstance(m, SparseMLP) for m in model.modules())  # unchanged


def test_from_linears_refuses_a_projection_with_its_own_forward():
    """SparseMLP reads the weights: a fake-quantizing nn.Linear subclass's forward would be skipped silently."""
    class Quantized(torch.nn.Linear):
        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight.round(), self.bias)

    with pytest.raises(ValueError, match="forward of its own"):
        SparseMLP.from_linears(Quantized(8, 16), torch.nn.Linear(16, 8), "relu")
    with pytest.raises(ValueError, match="forward of its own"):
        SparseMLP.from_linears(torch.nn.Linear(8, 16), Quantized(16, 8), "relu")


def test_sparsify_takes_a_bypassed_part_with_a_dropout():
    """TimeSformer's intermediate has a dropout after the activation: nothing at inference, where SparseMLP runs;
    the check of what a bypassed part holds refused it."""
    import transformers

    torch.manual_seed(0)
    model = transformers.TimesformerModel(transformers.TimesformerConfig(
        image_size=8, patch_size=4, num_channels=3, num_frames=2, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, hidden_act="relu")).eval()
    assert isinstance(model.encoder.layer[0].intermediate.dropout, torch.nn.Dropout)
    x = torch.randn(1, 2, 3, 8, 8)
    with torch.no_grad():
        want = model(x).last_hidden_state
        pefttorch.sparsify(model, 0.0)
        torch.testing.assert_close(model(x).last_hidden_state, want, rtol=1e-5, atol=1e-5)
    assert any(isinstance(m, SparseMLP) for m in model.modules())


class _HoldsAnMlp(torch.nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        return self.mlp(x)


def test_fc1_fc2_mlp_modules_that_compute_otherwise_are_refused_at_equal_widths():
    """An fc1/fc2 block was never probed, and the structural check gives up when the intermediate width equals the
    input's: LightGlue's MLP (a LayerNorm between fc1 and the activation) and Kosmos-2's FFN with ffn_dim ==
    embed_dim were swapped, and the model silently computed something else. A block whose forward takes the hidden
    states alone is an MLP module, and is now probed; the plain ones (Phi's) still pass."""
    from transformers import Kosmos2TextConfig, LightGlueConfig, PhiConfig, PhiForCausalLM
    from transformers.models.kosmos2.modeling_kosmos2 import Kosmos2TextForCausalLM
    from transformers.models.lightglue.modeling_lightglue import LightGlueMLP

    torch.manual_seed(0)
    lightglue = _HoldsAnMlp(LightGlueMLP(LightGlueConfig(descriptor_dim=16, num_hidden_layers=1,
                                                         num_attention_heads=2))).eval()
    with pytest.raises(ValueError, match=r"^mlp: LightGlueMLP has the parts .* computes something else"):
        pefttorch.sparsify(lightglue)
    kosmos = Kosmos2TextForCausalLM(Kosmos2TextConfig(embed_dim=32, ffn_dim=32, layers=1, attention_heads=4,
                                                      vocab_size=100)).eval()
    with torch.no_grad():
        kosmos.model.layers[0].ffn.ffn_layernorm.weight.normal_()  # a trained norm, not the identity
    with pytest.raises(ValueError, match=r"layers\.0\.ffn: Kosmos2TextFFN has the parts .* computes something else"):
        pefttorch.sparsify(kosmos)
    assert not any(isinstance(m, SparseMLP) for m in (*lightglue.modules(), *kosmos.modules()))
    phi = PhiForCausalLM(PhiConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                                   vocab_size=100)).eval()
    ids = torch.randint(3, 100, (2, 7))
    with torch.no_grad():
        want = phi(ids).logits
        assert pefttorch.sparsify(phi) == ["model.layers.0.mlp.fc2"]
        torch.testing.assert_close(phi(ids).logits, want, rtol=1e-5, atol=1e-5)


def _t5_gated_in_float16(tmp_path, wo_scale):
    """A T5 v1.1 model loaded in float16, where transformers keeps `wo` in float32, with large FFN outputs (as
    flan-t5-xl has: the reason it keeps them)."""
    from transformers import AutoModelForSeq2SeqLM, T5Config

    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
                                                       vocab_size=100, feed_forward_proj="gated-gelu"))
    with torch.no_grad():
        for blk in model.encoder.block:
            blk.layer[1].DenseReluDense.wo.weight.mul_(wo_scale)
    model.save_pretrained(tmp_path)
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path, dtype=torch.float16).eval()
    if model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype != torch.float32:
        pytest.skip("this transformers does not keep T5's wo in float32")
    return model


@pytest.mark.parametrize("wo_scale", [3e4, 1e5])
def test_t5_in_float16_with_wo_kept_in_float32_computes_as_the_dense_block(tmp_path, wo_scale):
    """T5's block casts its hidden to wo's dtype (float32) and returns float32; SparseMLP cast wo to float16: the
    encoder's output was 22% off at threshold 0 (3e4), or the probe overflowed and called the block one that
    computes something else (1e5). The sparse block now computes in wo's dtype and returns what the dense one does."""
    model = _t5_gated_in_float16(tmp_path, wo_scale)
    ids = torch.randint(3, 100, (1, 6))
    dense = copy.deepcopy(model)
    pefttorch.sparsify(model)
    x = torch.randn(6, 32).half()
    sparse, block = model.encoder.block[0].layer[1].DenseReluDense, dense.encoder.block[0].layer[1].DenseReluDense
    with torch.no_grad():
        want, got = block(x), sparse(x)
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * want.abs().max().item())
        want = dense.encoder(input_ids=ids).last_hidden_state.float()
        got = model.encoder(input_ids=ids).last_hidden_state.float()
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


def test_a_probe_that_overflows_is_not_taken_for_another_computation():
    """A float16 block with large weights overflows on a unit-scale probe, in the block and in SparseMLP alike: inf -
    inf made the probe differ by NaN, and the block was refused as computing something else."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=64, hidden_act="silu")).half().eval()
    with torch.no_grad():
        mlp.down_proj.weight.mul_(4e5)  # up to 5e4, within float16
    x = torch.randn(3, 32).half() / 256
    with torch.no_grad():
        assert not mlp(torch.randn(4, 32).half()).isfinite().all()
        want = mlp(x)
        torch.testing.assert_close(SparseMLP.from_mlp(mlp)(x), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_sparsify_refuses_hf_peft_layers_asking_to_merge(method):
    """HF PEFT's LoRA and IA3 layers left in an MLP were refused as 'built from nn.Linear or Conv1D projections, got
    Linear', which names no adapter: they get the message pefttorch's own LoRA layers get."""
    peft = pytest.importorskip("peft")
    config = (peft.LoraConfig(r=4, target_modules=["up_proj"]) if method == "lora" else
              peft.IA3Config(target_modules=["up_proj"], feedforward_modules=["up_proj"]))
    model = peft.get_peft_model(FAMILIES["llama"].build(), config).eval()
    with pytest.raises(ValueError, match=r"layers\.0\.mlp: the MLP holds adapter layers \(peft\.tuners\..*merge the "
                                         r"adapters first \(merge_and_unload\(\)\)"):
        pefttorch.sparsify(model)
    assert pefttorch.sparsify(model.merge_and_unload())


def test_sparsify_refuses_a_glu_split_from_fc1_naming_the_block():
    """Moonshine's decoder MLP splits fc1's output in two and gates one half with the other: fc1 gives twice the
    features fc2 takes, and the SparseMLP constructor failed on the shapes, naming no module. It is refused, named."""
    from transformers import MoonshineConfig, MoonshineForConditionalGeneration

    model = MoonshineForConditionalGeneration(MoonshineConfig(
        hidden_size=32, intermediate_size=64, encoder_num_hidden_layers=1, decoder_num_hidden_layers=1,
        encoder_num_attention_heads=4, decoder_num_attention_heads=4, vocab_size=100)).eval()
    with pytest.raises(ValueError, match=r"^model\.decoder\.layers\.0\.mlp: MoonshineDecoderMLP: its fc1 gives 128 "
                                         r"features but its fc2 takes 64"):
        pefttorch.sparsify(model)
    assert not any(isinstance(m, SparseMLP) for m in model.modules())


def test_sparsify_takes_a_layer_holding_a_second_mlp_beside_its_own():
    """InstructBLIP's Q-Former layer runs its query tokens through a second MLP (intermediate_query, output_query) and
    MobileBERT's runs stacked ffn layers before its own MLP: parts of the intermediate width, but not between the
    parts SparseMLP replaces, and the whole model was refused. The layer's own MLP is swapped, the second left dense."""
    from transformers import InstructBlipQFormerConfig, InstructBlipQFormerModel, MobileBertConfig, MobileBertModel

    torch.manual_seed(0)
    qformer = InstructBlipQFormerModel(InstructBlipQFormerConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, encoder_hidden_size=32,
        vocab_size=100)).eval()
    mobilebert = MobileBertModel(MobileBertConfig(
        hidden_size=32, embedding_size=16, intermediate_size=64, true_hidden_size=16, intra_bottleneck_size=16,
        num_hidden_layers=1, num_attention_heads=4, vocab_size=100)).eval()
    ids = torch.randint(3, 100, (2, 7))
    inputs = [(qformer, dict(input_ids=ids, query_embeds=torch.randn(2, 4, 32),
                             encoder_hidden_states=torch.randn(2, 5, 32))), (mobilebert, dict(input_ids=ids))]
    for model, kwargs in inputs:
        with torch.no_grad():
            want = model(**kwargs).last_hidden_state
            names = pefttorch.sparsify(model)
            torch.testing.assert_close(model(**kwargs).last_hidden_state, want, rtol=1e-5, atol=1e-5)
        assert names == ["encoder.layer.0.output.dense"]


class _FFNWithResidual(torch.nn.Module):
    """An fc1/fc2 MLP module that adds its own residual and norm, as DETR-family decoders' FFN modules do (LwDetr's,
    RF-DETR's, DAB-DETR's)."""

    def __init__(self, hidden=32, inter=64):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(hidden, inter), torch.nn.Linear(inter, hidden)
        self.activation_fn = torch.nn.ReLU()
        self.norm = torch.nn.LayerNorm(hidden)

    def forward(self, hidden_states):
        return self.norm(hidden_states + self.fc2(self.activation_fn(self.fc1(hidden_states))))


def test_an_mlp_module_with_its_own_residual_is_probed_with_the_swap():
    """The probe of an fc1/fc2 module compared the whole module (its residual and norm included) with SparseMLP alone,
    and refused DETR-family FFNs that sparsify had swapped exactly: it compares the module with the swap made now."""
    torch.manual_seed(0)
    model = _HoldsAnMlp(_FFNWithResidual()).eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        want = model(x)
        assert pefttorch.sparsify(model) == ["mlp.fc2"]
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


def test_a_norm_inside_the_layers_own_output_part_is_still_refused():
    """The second-MLP exception covered the layer's own intermediate/output parts (their type is the second MLP's):
    a norm on the intermediate width inside `output` was swapped over, and the model then failed or was wrong."""

    class Intermediate(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dense, self.intermediate_act_fn = torch.nn.Linear(16, 64), torch.nn.ReLU()

        def forward(self, x):
            return self.intermediate_act_fn(self.dense(x))

    class Output(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.dense = torch.nn.LayerNorm(64), torch.nn.Linear(64, 16)

        def forward(self, h, x):
            return self.dense(self.norm(h)) + x

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.intermediate, self.output = Intermediate(), Output()

        def forward(self, x, attention_mask=None):
            return self.output(self.intermediate(x), x)

    with pytest.raises(ValueError, match=r"its output\.norm \(LayerNorm\) works on the MLP's intermediate width"):
        pefttorch.sparsify(torch.nn.Sequential(Layer()).eval())


def test_a_part_read_by_the_forward_is_refused_in_words():
    """A forward that reads a part's weight (Seamless-M4T's FFN casts to fc1's dtype) fails once the parts are
    swapped: the probe let its AttributeError out, naming nothing; refused in words now, the model left as it was."""

    class ReadsFc1(_FFNWithResidual):
        def forward(self, hidden_states):
            return self.fc2(self.activation_fn(self.fc1(hidden_states.to(self.fc1.weight.dtype))))

    model = _HoldsAnMlp(ReadsFc1()).eval()
    with pytest.raises(ValueError, match="ReadsFc1 computes something between the parts .*'Identity' object has no"):
        pefttorch.sparsify(model)
    assert isinstance(model.mlp.fc1, torch.nn.Linear) and isinstance(model.mlp.fc2, torch.nn.Linear)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_an_mlp_shared_by_several_layers_is_replaced_at_every_path(family):
    """A block one module object holds for several layers (layer-wise weight sharing) was replaced at its first path
    only, which named_modules gives: the other layers stayed dense, silently. Every path gets the one SparseMLP, so the
    layers share it still, and every path is named."""
    torch.manual_seed(0)
    fam = FAMILIES[family]
    model = fam.build().eval()
    layers = model.model.layers if family == "llama" else model.bert.encoder.layer
    if family == "llama":
        layers[1].mlp = layers[0].mlp
        want_names = ["model.layers.0.mlp", "model.layers.1.mlp"]
    else:
        layers[1] = layers[0]  # BERT's whole layer, whose output.dense becomes the SparseMLP
        want_names = ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense"]
    inputs = fam.inputs(torch.Generator().manual_seed(0))
    inputs.pop("labels", None)
    with torch.no_grad():
        want = model(**inputs).logits
    assert pefttorch.sparsify(model) == want_names
    sparse = [model.get_submodule(n) for n in want_names]
    assert isinstance(sparse[0], SparseMLP) and sparse[0] is sparse[1]
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, want, rtol=1e-5, atol=1e-5)


def test_sparsify_refuses_a_threshold_that_is_not_a_number():
    """float() took sparsify(model, True) as threshold 1.0 and "0.1" as 0.1; numpy's and 0-d tensors are numbers."""
    np = pytest.importorskip("numpy")
    model = FAMILIES["llama"].build().eval()
    fc1, fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
    for bad in (True, "0.1", None):
        with pytest.raises(ValueError, match=rf"sparsify: threshold must be a number >= 0, got {type(bad).__name__}"):
            pefttorch.sparsify(model, bad)
        with pytest.raises(ValueError, match="SparseMLP: threshold must be a number >= 0"):
            SparseMLP.from_linears(fc1, fc2, "relu", threshold=bad)
    with pytest.raises(ValueError, match="sparsify: threshold must be >= 0, got nan"):
        pefttorch.sparsify(model, float("nan"))
    assert not any(isinstance(m, SparseMLP) for m in model.modules())
    assert SparseMLP.from_linears(fc1, fc2, "relu", threshold=np.float32(0.5)).threshold == 0.5
    pefttorch.sparsify(model, torch.tensor(0.25))
    assert model.model.layers[0].mlp.threshold == 0.25
