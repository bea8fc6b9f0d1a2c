"""(IA)^3 and SSF through get_peft_model: identity at init, against HF PEFT's (IA)^3 and against weights scaled by
hand, training only the vectors, merging, save/load and HF PEFT's format both ways."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hf_models import fresh, inputs, logits, loss
from torch import nn

from pefttorch import IA3Config, PeftModel, SsfConfig, get_peft_model

FAMILY_NAMES = ["bert", "llama", "t5", "marian", "gpt2"]


def randomize(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.base_model.adapter_parameters():
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g) if p.dim() == 2 or "scale" in _name(model, p)
                    else 0.3 * torch.randn(p.shape, generator=g))


def _name(model, param):
    return next(n for n, p in model.named_parameters() if p is param)


CONFIGS = [IA3Config(), SsfConfig()]


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("config", CONFIGS, ids=["ia3", "ssf"])
def test_starts_as_the_base_model(family, config):
    base = fresh(family)
    model = get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    batch = inputs(family)
    torch.testing.assert_close(logits(model, batch), logits(base, batch), rtol=0, atol=0)


def _scaled_by_hand(base, model):
    """`base` with each site's weights scaled (and bias shifted) in float64 by plain tensor algebra: the
    reference the hooks must equal."""
    ref = copy.deepcopy(base).double()
    vm = model.base_model
    with torch.no_grad():
        for key, site in zip(vm.keys, vm.sites, strict=True):
            m = ref.get_submodule(site.path)
            s = vm.scales[key].double().view(-1)
            conv1d = not isinstance(m, nn.Linear) and m.weight.dim() == 2  # GPT-2's Conv1D: (in, out)
            if site.on_input:
                m.weight.mul_(s.view(-1, 1) if conv1d else s.view(1, -1))
                continue
            m.weight.mul_(s.view(1, -1) if conv1d else s.view(-1, *([1] * (m.weight.dim() - 1))))
            shift = vm.shifts[key].double() if key in vm.shifts else torch.zeros_like(s)
            if m.bias is None:
                m.bias = nn.Parameter(shift.clone())
            else:
                m.bias.copy_(m.bias * s + shift)
    return ref


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("config", CONFIGS, ids=["ia3", "ssf"])
def test_equals_the_weights_scaled_by_hand(family, config):
    base = fresh(family)
    model = get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    randomize(model)
    batch = inputs(family)
    ref = _scaled_by_hand(base, model)
    want = logits(ref, {k: v for k, v in batch.items()})
    torch.testing.assert_close(logits(model, batch).double(), want, rtol=1e-4, atol=1e-5)
    # merging folds the same algebra into the model's own weights
    merged = model.merge_and_unload()
    assert not any(k.endswith(("ia3_l", "ssf_scale")) for k in merged.state_dict())
    torch.testing.assert_close(logits(merged, batch).double(), want, rtol=1e-4, atol=1e-5)


def test_default_sites():
    model = get_peft_model(fresh("bert"), IA3Config())
    sites = {s.path: s.on_input for s in model.base_model.sites}
    layer = "bert.encoder.layer.0."
    assert sites[layer + "attention.self.key"] is False and sites[layer + "attention.self.value"] is False
    assert sites[layer + "output.dense"] is True  # the FFN intermediate activation, scaled on its way in
    assert layer + "attention.output.dense" not in sites and layer + "attention.self.query" not in sites
    t5 = get_peft_model(fresh("t5"), IA3Config())
    paths = [s.path for s in t5.base_model.sites]
    assert any("EncDecAttention.k" in p for p in paths)  # cross-attention keys and values too
    ssf = get_peft_model(fresh("llama"), SsfConfig())
    assert len(ssf.base_model.sites) == 2 * 7  # every linear layer of both blocks, not the LM head


def test_default_sites_of_aliased_model_types():
    # as IA3Config's docstring says (HF PEFT's differ: BART's queries instead of keys, mT5's wi_1 on its output)
    from transformers import BartConfig, BartForConditionalGeneration, MT5Config, MT5ForConditionalGeneration

    bart = BartForConditionalGeneration(BartConfig(vocab_size=32, d_model=16, encoder_layers=1, decoder_layers=1,
                                                   encoder_attention_heads=2, decoder_attention_heads=2,
                                                   encoder_ffn_dim=32, decoder_ffn_dim=32))
    mt5 = MT5ForConditionalGeneration(MT5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    for model, want in [(bart, {("k_proj", False), ("v_proj", False), ("fc2", True)}),
                        (mt5, {("k", False), ("v", False), ("wo", True)})]:
        sites = get_peft_model(model, IA3Config()).base_model.sites
        assert {(s.path.rsplit(".", 1)[-1], s.on_input) for s in sites} == want


@pytest.mark.parametrize("kind", ["Llama", "Mistral", "Qwen2", "Qwen3", "Gemma", "Gemma2"])
def test_default_sites_of_decoders_are_hf_pefts(kind):
    """Qwen and Gemma took Llama's keys where HF PEFT's defaults take queries; the docstring said only BERT,
    BART/Marian and mT5 differ."""
    import transformers
    from peft.utils import constants

    config = getattr(transformers, f"{kind}Config")(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                                    head_dim=8)
    model = getattr(transformers, f"{kind}ForCausalLM")(config)
    sites = get_peft_model(model, IA3Config()).base_model.sites
    model_type = config.model_type
    feedforward = constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[model_type]
    want = {(n, n in feedforward) for n in constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING[model_type]}
    assert {(s.path.rsplit(".", 1)[-1], s.on_input) for s in sites} == want


@pytest.mark.parametrize("family", ["bert", "llama", "t5"])
@pytest.mark.parametrize("config", CONFIGS, ids=["ia3", "ssf"])
def test_only_the_vectors_train(family, config):
    model = get_peft_model(fresh(family), copy.deepcopy(config))
    randomize(model)
    model.train()
    loss(model(**inputs(family))).backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    own = {_name(model, p) for p in model.base_model.adapter_parameters()}
    assert trained == own
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in own)
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for p in model.base_model.adapter_parameters())


@pytest.mark.parametrize("config", CONFIGS, ids=["ia3", "ssf"])
def test_disable_merge_unmerge_unload(config):
    base = fresh("llama")
    model = get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    randomize(model)
    batch = inputs("llama")
    adapted, plain = logits(model, batch), logits(base, batch)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, batch), plain, rtol=0, atol=0)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, batch), adapted, rtol=1e-4, atol=1e-5)
    with model.disable_adapter():  # disabling a merged adapter takes it out of the weights
        torch.testing.assert_close(logits(model, batch), plain, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits(model, batch), adapted, rtol=1e-4, atol=1e-5)
    model.merge_adapter()
    unloaded = model.unload()  # not merged: the original weights, no hooks, no added biases
    torch.testing.assert_close(logits(unloaded, batch), plain, rtol=1e-4, atol=1e-5)
    assert set(unloaded.state_dict()) == set(base.state_dict())
    assert all(p.requires_grad for p in unloaded.parameters())


@pytest.mark.parametrize("config", CONFIGS, ids=["ia3", "ssf"])
def test_a_float64_model_merges_in_float64(config):
    """The fold computed in float32 whatever the weight's dtype: a float64 model's merged weights were rounded
    through float32 (3e-9 off), and unmerging left that rounding in its base weights for good."""
    model = get_peft_model(fresh("llama").double(), copy.deepcopy(config))
    randomize(model)
    vm = model.base_model
    before = {n: p.detach().clone() for n, p in vm.model.named_parameters() if not p.requires_grad}
    batch = inputs("llama")
    adapted = logits(model, batch)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, batch), adapted, rtol=1e-12, atol=1e-12)
    model.unmerge_adapter()
    for n, p in vm.model.named_parameters():
        if n in before:
            torch.testing.assert_close(p, before[n], rtol=1e-13, atol=1e-13, msg=n)


def test_merging_shifts_into_new_biases_warns_that_from_pretrained_drops_them():
    """SSF on Llama's bias-less linears: merge_and_unload adds biases the config does not declare (attention_bias,
    mlp_bias), which transformers' from_pretrained of the merged model's save dropped with a load report only."""
    model = get_peft_model(fresh("llama"), SsfConfig())
    randomize(model)
    with pytest.warns(UserWarning, match=r"new biases on \d+ module\(s\) that had none .*from_pretrained"):
        merged = model.merge_and_unload()
    assert merged.model.layers[0].self_attn.q_proj.bias is not None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # BERT's linears have biases: nothing new, nothing said
        get_peft_model(fresh("bert"), SsfConfig(target_modules=["query"])).merge_and_unload()


@pytest.mark.parametrize("config", CONFIGS, ids=["ia3", "ssf"])
def test_resizing_the_embeddings_under_a_vector_is_refused(config):
    """transformers' resize_token_embeddings replaces lm_head with a new module: the vector's hook stayed on the old
    one, so it stopped applying and training in silence (HF PEFT refuses it). Elsewhere the resize works."""
    config = copy.deepcopy(config)
    config.target_modules = ["lm_head", "down_proj"]
    if isinstance(config, IA3Config):
        config.feedforward_modules = ["down_proj"]
    model = get_peft_model(fresh("llama"), config)
    vocab = model.get_output_embeddings().weight.shape[0]
    with pytest.raises(TypeError, match="would replace the output embeddings, which carry a hook of"):
        model.resize_token_embeddings(vocab + 8)
    assert model.get_output_embeddings().weight.shape[0] == vocab
    other = get_peft_model(fresh("llama"), IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"]))
    other.resize_token_embeddings(vocab + 8)
    assert other.get_output_embeddings().weight.shape[0] == vocab + 8


@pytest.mark.parametrize("config", CONFIGS, ids=["ia3", "ssf"])
def test_unmerge_refused_changes_nothing(config):
    # a zero scale on the last site only: the refusal must come before the earlier sites are divided
    model = get_peft_model(fresh("llama"), copy.deepcopy(config))
    randomize(model)
    vm = model.base_model
    with torch.no_grad():
        vm.scales[vm.keys[-1]].view(-1)[0] = 0.0
    batch = inputs("llama")
    adapted = logits(model, batch)
    model.merge_adapter()
    weights = {n: p.clone() for n, p in vm.model.named_parameters()}
    for attempt in range(2):
        with pytest.raises(ValueError, match="cannot be divided out again"):
            if attempt == 0:
                model.unmerge_adapter()
            else:
                with model.disable_adapter():
                    pass
        assert vm.merged and not vm.disabled  # the failed switch off left the adapter on
        for n, p in vm.model.named_parameters():
            torch.testing.assert_close(p, weights[n], rtol=0, atol=0, msg=n)
        torch.testing.assert_close(logits(model, batch), adapted, rtol=1e-4, atol=1e-5)


def test_ssf_on_norms():
    base = fresh("bert")
    config = SsfConfig(target_modules=["query", "LayerNorm"])
    model = get_peft_model(copy.deepcopy(base), config)
    kinds = {type(s.module).__name__ for s in model.base_model.sites}
    assert kinds == {"Linear", "LayerNorm"}
    randomize(model)
    batch = inputs("bert")
    want = logits(model, batch)
    torch.testing.assert_close(logits(model.merge_and_unload(), batch), want, rtol=1e-4, atol=1e-5)
    # Llama's RMSNorm has no bias to take the shift: merging is refused and the model is left as it was
    llama = get_peft_model(fresh("llama"), SsfConfig(target_modules=["q_proj", "input_layernorm"]))
    randomize(llama)
    before = logits(llama, inputs("llama"))
    with pytest.raises(ValueError, match="LlamaRMSNorm.*cannot be merged"):
        llama.merge_and_unload()
    torch.testing.assert_close(logits(llama, inputs("llama")), before, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["bert", "llama", "t5", "marian"])
@pytest.mark.parametrize("config", CONFIGS, ids=["ia3", "ssf"])
def test_save_and_load_round_trip(family, config, tmp_path):
    model = get_peft_model(fresh(family), copy.deepcopy(config))
    randomize(model)
    batch = inputs(family)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == ("IA3" if isinstance(config, IA3Config) else "SSF")
    loaded = PeftModel.from_pretrained(fresh(family), tmp_path)
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())
    again = PeftModel.from_pretrained(fresh(family), tmp_path, is_trainable=True)
    assert all(p.requires_grad for p in again.base_model.adapter_parameters())


def test_load_into_another_architecture_fails_cleanly(tmp_path):
    model = get_peft_model(fresh("llama"), IA3Config())
    model.save_pretrained(tmp_path)
    other = fresh("llama", seed=1)
    other.model.layers = other.model.layers[:1]
    keys = set(other.state_dict())
    with pytest.raises(ValueError, match="does not fit"):
        PeftModel.from_pretrained(other, tmp_path)
    assert set(other.state_dict()) == keys and not other._forward_hooks
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in other.modules())


@pytest.mark.parametrize("family", ["llama", "t5", "marian"])
@pytest.mark.parametrize("config", CONFIGS, ids=["ia3", "ssf"])
def test_generate(family, config):
    model = get_peft_model(fresh(family), copy.deepcopy(config))
    randomize(model)
    ids = inputs(family)["input_ids"]
    out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == ids.shape[0] and out.shape[1] >= 4


def test_bf16_model_keeps_fp32_vectors_and_trains():
    model = get_peft_model(fresh("llama").to(torch.bfloat16), SsfConfig())
    assert all(p.dtype == torch.float32 for p in model.base_model.adapter_parameters())
    model.train()
    out = model(**inputs("llama"))
    assert out.logits.dtype == torch.bfloat16
    loss(out).backward()
    assert all(p.grad is not None for p in model.base_model.adapter_parameters())


@pytest.mark.parametrize("config", [IA3Config, SsfConfig])
def test_each_vector_takes_its_module_s_dtype_as_hf_peft(config, tmp_path):
    """A 16-bit T5 keeps `wo` in float32 (transformers' _keep_in_fp32_modules). With autocast_adapter_dtype=False
    every vector took the model's first parameter's dtype: `wo`'s was bfloat16, where HF PEFT's follows the module,
    and a saved float32 vector was rounded on load."""
    base = fresh("t5").to(torch.bfloat16)
    for name, module in base.named_modules():
        if name.endswith(".wo"):
            module.float()
    model = get_peft_model(copy.deepcopy(base), config(), autocast_adapter_dtype=False)
    sites = {key: site.module.weight.dtype for key, site in zip(model.base_model.keys, model.base_model.sites,
                                                                    strict=True)}
    assert torch.float32 in sites.values() and torch.bfloat16 in sites.values()
    for key, dtype in sites.items():
        assert model.base_model.scales[key].dtype == dtype, key
        if config is SsfConfig:
            assert model.base_model.shifts[key].dtype == dtype, key
    if config is IA3Config:  # and as HF PEFT's
        import peft

        hf = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(task_type="SEQ_2_SEQ_LM"),
                                 autocast_adapter_dtype=False)
        hf_dtypes = {n.removeprefix("base_model.model.").removesuffix(".ia3_l.default").replace(".", "_"): p.dtype
                     for n, p in hf.named_parameters() if "ia3_l" in n}
        assert hf_dtypes == sites
        randomize(model)
        model.save_pretrained(tmp_path)
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, autocast_adapter_dtype=False)
        for key, p in model.base_model.scales.items():
            assert torch.equal(loaded.base_model.scales[key], p), key
    # the default: float32 vectors beside the 16-bit and the float32 modules alike
    model = get_peft_model(copy.deepcopy(base), config())
    assert all(p.dtype == torch.float32 for p in model.base_model.adapter_parameters())


@pytest.mark.parametrize("config", [IA3Config, SsfConfig])
def test_a_module_with_an_integer_weight_gets_float32_vectors(config):
    """A weight-only quantized layer keeps integers: its vectors took the int8 dtype (with the per-module rule) and
    get_peft_model failed on a parameter that cannot require grad; HF PEFT gives float32 there."""

    class Int8Linear(nn.Linear):
        def __init__(self, linear):
            super().__init__(linear.in_features, linear.out_features, bias=False)
            scale = linear.weight.abs().amax(1, keepdim=True) / 127
            self.weight = nn.Parameter((linear.weight / scale).round().to(torch.int8), requires_grad=False)
            self.register_buffer("scale", scale.detach())

        def forward(self, x):
            return x @ (self.weight.to(x.dtype) * self.scale.to(x.dtype)).t()

    base = fresh("llama")
    attention = base.model.layers[0].self_attn
    attention.v_proj = Int8Linear(attention.v_proj)
    kw = {"feedforward_modules": []} if config is IA3Config else {}
    for autocast in (True, False):
        model = get_peft_model(base, config(target_modules=["v_proj"], **kw), autocast_adapter_dtype=autocast)
        assert all(p.dtype == torch.float32 for p in model.base_model.adapter_parameters())
        loss(model(**inputs("llama"))).backward()
        assert all(p.grad is not None for p in model.base_model.adapter_parameters())
        # ... and no merge into the integers (the scaled weight was rounded and wrapped back into int8 in silence)
        weight = attention.v_proj.weight.clone()
        with pytest.raises(ValueError, match=r"cannot be merged into \['model.layers.0.self_attn.v_proj'\]: its "
                                             r"weight is not floating point"):
            model.merge_adapter()
        assert torch.equal(attention.v_proj.weight, weight)
        base = model.unload()


@pytest.mark.parametrize(("kw", "match"), [
    ({"target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]}, "must be among target_modules"),
    ({"target_modules": 3}, "list of module names"),
    ({"targets": ["k_proj"]}, "did you mean 'target_modules'"),
])
def test_ia3_config_errors(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        IA3Config(**kw)


def test_model_errors():
    with pytest.raises(ValueError, match="matched none of the linear layers.*available to match: .*k_proj"):
        get_peft_model(fresh("llama"), IA3Config(target_modules=["key"]))
    with pytest.raises(ValueError, match="LlamaRMSNorm"):
        get_peft_model(fresh("llama"), IA3Config(target_modules=["input_layernorm"]))
    with pytest.raises(ValueError, match="no default for model type 'gpt_neo'"):
        from transformers import GPTNeoConfig, GPTNeoForCausalLM

        get_peft_model(GPTNeoForCausalLM(GPTNeoConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2,
                                                      attention_types=[[["global"], 1]])), IA3Config())
    model = get_peft_model(fresh("llama"), IA3Config())
    with pytest.raises(ValueError, match="one adapter set"):
        model.add_adapter("other", IA3Config())


def test_layers_to_transform():
    model = get_peft_model(fresh("llama"), IA3Config(layers_to_transform=[1]))
    assert all(".layers.1." in s.path for s in model.base_model.sites) and len(model.base_model.sites) == 3


# ---------------------------------------------------------------- HF PEFT's (IA)^3, both ways


@pytest.mark.parametrize("family", ["bert", "llama", "t5", "marian"])
@pytest.mark.parametrize("layers", [None, [1]])
def test_hf_peft_loads_ours(family, layers, tmp_path):
    peft = pytest.importorskip("peft")
    model = get_peft_model(fresh(family), IA3Config(layers_to_transform=layers))
    randomize(model)
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(fresh(family), tmp_path)
    batch = inputs(family)
    torch.testing.assert_close(logits(theirs, batch), logits(model, batch), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("family", "targets"), [("llama", ["k_proj", "v_proj", "down_proj"]),
                                                 ("llama", ["k_proj", "v_proj"]), ("gpt2", "all-linear")])
def test_targets_without_feedforward_modules_mean_what_they_mean_in_hf_peft(family, targets, tmp_path):
    """feedforward_modules unset with target_modules set: HF PEFT takes the model type's feedforward modules, we took
    none (down_proj scaled on its output, not its input), and saved null, which PEFT then read as its defaults and
    failed to load (a vector of the wrong shape)."""
    peft = pytest.importorskip("peft")
    model = get_peft_model(fresh(family), IA3Config(target_modules=targets))
    randomize(model)
    theirs = peft.get_peft_model(fresh(family), peft.IA3Config(target_modules=targets))
    shapes = {k.replace(".ia3_l.default", ".ia3_l"): tuple(v.shape) for k, v in theirs.state_dict().items()
              if "ia3_l" in k}
    assert {k: tuple(v.shape) for k, v in model.base_model.adapter_state_dict("default").items()} == shapes
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(fresh(family), tmp_path)
    batch = inputs(family)
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), rtol=1e-5, atol=1e-6)


def test_no_feedforward_modules_with_layers_to_transform_is_saved_as_none(tmp_path):
    """The export for layers_to_transform wrote feedforward_modules null for none: both loaders read that as the model
    type's defaults (down_proj scaled on its input) and refused the saved vectors' shape."""
    peft = pytest.importorskip("peft")
    config = IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=[], layers_to_transform=[1])
    model = get_peft_model(fresh("llama"), config)
    randomize(model)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["feedforward_modules"] == []
    batch = inputs("llama")
    for loaded in (PeftModel.from_pretrained(fresh("llama"), tmp_path),
                   peft.PeftModel.from_pretrained(fresh("llama"), tmp_path)):
        torch.testing.assert_close(logits(loaded, batch), logits(model, batch), rtol=1e-5, atol=1e-6)


def test_feedforward_modules_outside_the_default_targets_are_refused():
    """With target_modules unset, feedforward modules outside the model type's targets were not adapted (and the
    defaults' own feedforward module was scaled on its output); the save then failed the config's own check."""
    with pytest.raises(ValueError, match=r"must be among target_modules, here the defaults .*'llama'.*\['up_proj'\]"):
        get_peft_model(fresh("llama"), IA3Config(feedforward_modules=["up_proj"]))
    model = get_peft_model(fresh("llama"), IA3Config(feedforward_modules=[]))  # among them: none
    assert not any(s.on_input for s in model.base_model.sites) and len(model.base_model.sites) == 6


@pytest.mark.parametrize("config", [IA3Config(target_modules=["lm_head"], feedforward_modules=[]),
                                    SsfConfig(target_modules=["lm_head"])], ids=["ia3", "ssf"])
def test_merging_into_a_tied_weight_warns(config):
    """GPT-2's lm_head shares the input embeddings' weight: merging scales both, so the merged model's outputs are
    not the adapter model's. LoRA (and HF PEFT) say so; (IA)^3 and SSF merged silently."""
    model = get_peft_model(fresh("gpt2"), copy.deepcopy(config))
    randomize(model)
    with pytest.warns(UserWarning, match="merging into the weight of lm_head, which transformer.wte shares"):
        model.merge_and_unload()


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_we_load_hf_peft_ia3(family, tmp_path):
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(fresh(family), peft.IA3Config(init_ia3_weights=False))
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(fresh(family), tmp_path)
    batch = inputs(family)
    torch.testing.assert_close(logits(ours, batch), logits(theirs, batch), rtol=1e-5, atol=1e-6)


def test_we_load_hf_peft_ia3_on_the_lm_head(tmp_path):
    """HF PEFT saves a targeted lm_head's own weight next to the adapter, under its wrapper's key
    (lm_head.base_layer.weight); (IA)^3 here adapts the head by a hook, unwrapped, and the file was refused."""
    import warnings

    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(fresh("llama"), peft.IA3Config(target_modules=["k_proj", "lm_head"],
                                                                feedforward_modules=[], init_ia3_weights=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HF PEFT says it saves the embedding layers
        theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(fresh("llama"), tmp_path)
    batch = inputs("llama")
    torch.testing.assert_close(logits(ours, batch), logits(theirs, batch), rtol=1e-5, atol=1e-6)


class _Shared(torch.nn.Module):
    """One Linear called twice, registered under two names (`again` is `shared`); `block` holds another, reached
    through it alone."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(8, 8)
        self.again = self.shared
        self.block = nn.Sequential(nn.Linear(8, 8))
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.block(self.again(torch.relu(self.shared(x)))))


def test_ia3_refuses_a_module_registered_under_two_names_where_lora_matches_hf_peft(tmp_path):
    """(IA)^3's hooks act on the module, so on its call through either name, while HF PEFT's layer stands under the
    name matched only: the same adapter file gave other outputs here. Refused now, from get_peft_model and from HF
    PEFT's file, saying why; LoRA swaps the layer in under the name as HF PEFT does, and matches it. A module inside
    a shared parent is reached one way, and stays accepted."""
    peft = pytest.importorskip("peft")
    import pefttorch

    def model():
        torch.manual_seed(0)
        return _Shared().eval()

    x = torch.randn(3, 8)
    ia3 = dict(target_modules=["shared"], feedforward_modules=[], init_ia3_weights=False)
    theirs = peft.get_peft_model(model(), peft.IA3Config(**ia3))
    theirs.save_pretrained(tmp_path / "ia3")
    why = r"shared is one module registered under more than one name \(shared, again\)"
    with pytest.raises(ValueError, match=why):
        get_peft_model(model(), IA3Config(**ia3))
    base = model()
    with pytest.raises(ValueError, match=why):
        PeftModel.from_pretrained(base, tmp_path / "ia3")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in base.modules())
    norm = nn.LayerNorm(8)  # LayerNorm tuning swaps the module's parameters, HF PEFT the module under its name
    with pytest.raises(ValueError, match=r"LayerNorm tuning: 0 is one module registered under more than one name"):
        get_peft_model(nn.Sequential(norm, norm), pefttorch.LNTuningConfig())
    get_peft_model(model(), IA3Config(target_modules=["out"], feedforward_modules=[]))  # not the shared one: fine
    get_peft_model(model(), SsfConfig(target_modules=["shared"]))  # pefttorch's own: the module's, on every call

    def ia3_block(lib):
        return lib.IA3Config(target_modules=["block.0"], feedforward_modules=[], init_ia3_weights=False)
    shared_parent = model()
    shared_parent.other = shared_parent.block  # block.0 is one module in one place, reached through either name
    theirs = peft.get_peft_model(copy.deepcopy(shared_parent), ia3_block(peft)).eval()
    ours = get_peft_model(copy.deepcopy(shared_parent), ia3_block(pefttorch))
    with torch.no_grad():
        ours.base_model.scales["block_0"].copy_(theirs.base_model.model.block[0].ia3_l["default"])
        torch.testing.assert_close(ours(x), theirs(x))

    lora = dict(target_modules=["shared"], init_lora_weights=False)
    theirs = peft.get_peft_model(model(), peft.LoraConfig(**lora)).eval()
    theirs.save_pretrained(tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(PeftModel.from_pretrained(model(), tmp_path / "lora")(x), theirs(x))
