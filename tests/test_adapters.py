"""Bottleneck adapters (Houlsby, Pfeiffer, parallel) through get_peft_model, and parameter budgets."""

from __future__ import annotations

import copy
import dataclasses
import json
import re

import pytest
import torch
from hf_models import FAMILIES

import pefttorch
from pefttorch import AdapterConfig, config_for_budget, get_peft_model, reference
from pefttorch.nn import BottleneckAdapter

FAMILY_NAMES = ["bert", "llama", "t5", "marian"]
STYLES = ["houlsby", "pfeiffer", "parallel"]


def build(family, config, seed=0):
    torch.manual_seed(seed)
    base = FAMILIES[family].build().eval()
    return base, get_peft_model(copy.deepcopy(base), config)


def inputs(family, seed=1):
    return FAMILIES[family].inputs(torch.Generator().manual_seed(seed))


def logits(model, batch):
    return model(**batch).logits


def randomize(model):
    with torch.no_grad():
        for adapter in model.base_model.adapters.values():
            for p in adapter.parameters():
                p.copy_(torch.randn_like(p) * 0.2)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("style", STYLES)
def test_starts_as_the_base_model(family, style):
    base, model = build(family, AdapterConfig(style=style, bottleneck=3))
    batch = inputs(family)
    with torch.no_grad():
        torch.testing.assert_close(logits(model, batch), logits(base, batch), rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("style", STYLES)
def test_fused_op_matches_the_reference_in_the_model(family, style, monkeypatch):
    """The adapters' outputs through the fused op equal the pure-PyTorch reference's, in the model."""
    _, model = build(family, AdapterConfig(style=style, bottleneck=5, activation="gelu", scaling=0.7))
    randomize(model)
    batch = inputs(family)
    with torch.no_grad():
        ours = logits(model, batch)

        def ref(x, w_down, w_up, b_down=None, b_up=None, *, residual=None, activation="relu", scale=1.0):
            return reference.bottleneck_adapter(x, w_down, b_down, w_up, b_up, residual, False, activation, scale)

        monkeypatch.setattr(pefttorch.functional, "bottleneck_adapter", ref)
        expected = logits(model, batch)
    assert not torch.equal(expected, logits(FAMILIES[family].build().eval(), batch))  # the adapters do something
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_placement_in_bert():
    _, model = build("bert", AdapterConfig(style="houlsby", bottleneck=2))
    outputs = sorted(s.output for s in model.base_model.sites)
    assert outputs == sorted(f"bert.encoder.layer.{i}.{m}" for i in range(2)
                             for m in ("attention.output.dense", "output.dense"))
    _, model = build("bert", AdapterConfig(style="parallel", bottleneck=2))
    assert {(s.input, s.output) for s in model.base_model.sites} == {
        (f"bert.encoder.layer.{i}.intermediate", f"bert.encoder.layer.{i}.output.dense") for i in range(2)}


def test_placement_with_cross_attention_in_t5():
    _, model = build("t5", AdapterConfig(style="houlsby", bottleneck=2))
    kinds = [s.kind for s in model.base_model.sites]
    assert kinds.count("cross_attention") == 2 and kinds.count("attention") == 4 and kinds.count("ffn") == 4
    _, model = build("t5", AdapterConfig(style="houlsby", bottleneck=2, cross_attention=False,
                                         layers_to_transform=[1]))
    assert [s.kind for s in model.base_model.sites] == ["attention", "ffn", "attention", "ffn"]


def test_layer_norm_and_reduction_factor():
    _, model = build("llama", AdapterConfig(style="pfeiffer", reduction_factor=8, layer_norm=True))
    adapter = next(iter(model.base_model.adapters.values()))
    assert adapter.bottleneck == 4 and adapter.layer_norm is not None  # hidden 32 / 8


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_only_the_adapters_train(family):
    base, model = build(family, AdapterConfig(style="houlsby", bottleneck=3))
    randomize(model)
    batch = inputs(family)
    if "labels" not in batch:
        batch = {**batch, "labels": batch["input_ids"]}
    model.train()
    model(**batch).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters." in n for n in trainable)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_classification_head_trains_and_is_saved(tmp_path):
    base, model = build("bert", AdapterConfig(style="pfeiffer", bottleneck=3, task_type="SEQ_CLS"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier.modules_to_save" in n for n in trainable)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    assert any(k.startswith("classifier.") for k in load_file(str(tmp_path / "adapter_model.safetensors")))


@pytest.mark.parametrize("style, modules_to_save", [
    ("houlsby", ["layer.0"]),
    ("parallel", ["layer.0"]),
    ("parallel", ["layer.0.intermediate"]),  # only the parallel adapter's input module
])
def test_no_adapter_inside_a_module_to_save(style, modules_to_save, capsys):
    # the wrapper runs a deep copy of the module to save, whose hooks called a copy of the adapters: those in it
    # trained and were saved but never ran (no gradient); as LoRA's targets, they are left out
    config = AdapterConfig(style=style, bottleneck=3, modules_to_save=modules_to_save)
    base, model = build("bert", config)
    sites = model.base_model.sites
    assert sites and not any(s.output.startswith("bert.encoder.layer.0.") or (s.input or "").startswith(
        "bert.encoder.layer.0.") for s in sites)
    randomize(model)
    model.train()
    model(**inputs("bert")).logits.sum().backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(".modules_to_save." in n for n in trainable)  # the module to save trains in full
    assert all(p.grad is not None for p in trainable.values())
    # the budget counts what trains (asked for this model's share, it picks its bottleneck)
    share = _trainable(model) / sum(p.numel() for p in base.parameters())
    budget = config_for_budget(base, "adapter", share, style=style, modules_to_save=modules_to_save)
    assert budget.bottleneck == 3
    count = int(re.search(r"([\d,]+) trainable", capsys.readouterr().out).group(1).replace(",", ""))
    assert count == _trainable(get_peft_model(copy.deepcopy(base), budget))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_save_and_load_round_trip(family, tmp_path):
    base, model = build(family, AdapterConfig(style="parallel", bottleneck=3, activation="silu"))
    randomize(model)
    batch = inputs(family)
    with torch.no_grad():
        expected = logits(model, batch)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BOTTLENECK_ADAPTER" and saved["style"] == "parallel"
    loaded = pefttorch.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded, batch), expected)


def test_load_into_another_architecture_fails_cleanly(tmp_path):
    _, model = build("llama", AdapterConfig(bottleneck=3))
    model.save_pretrained(tmp_path)
    other = FAMILIES["bert"].build()
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="does not fit this model"):
        pefttorch.PeftModel.from_pretrained(other, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    assert not other._forward_hooks and all(not m._forward_hooks for m in other.modules())


@pytest.mark.parametrize("family", ["llama", "t5", "marian"])
def test_generate(family):
    _, model = build(family, AdapterConfig(style="houlsby", bottleneck=3))
    randomize(model)
    ids = inputs(family)["input_ids"]
    out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == ids.shape[0] and out.shape[1] > (ids.shape[1] if family == "llama" else 1)


def test_disable_unload_and_merge():
    base, model = build("llama", AdapterConfig(bottleneck=3))
    randomize(model)
    batch = inputs("llama")
    with torch.no_grad():
        reference_out = logits(base, batch)
        with model.disable_adapter():
            torch.testing.assert_close(logits(model, batch), reference_out, rtol=0, atol=0)
        assert not torch.equal(logits(model, batch), reference_out)
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    keys = set(base.state_dict())
    unloaded = model.unload()
    assert set(unloaded.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(logits(unloaded, batch), reference_out, rtol=0, atol=0)


@pytest.mark.parametrize("kw, match", [
    (dict(style="lora"), "style must be one of"),
    (dict(bottleneck=0), "bottleneck must be a positive integer"),
    (dict(activation="tanh"), "activation must be one of"),
    (dict(style="pfeiffer", after_ffn=False), "all off"),
    (dict(style="parallel", after_ffn=True), "two adapters on one FFN"),
    (dict(scaling=float("nan")), "scaling must be a finite number"),
    (dict(layer_norm="yes"), "layer_norm must be True or False"),  # passed as truthy
    (dict(after_ffn=0), "after_ffn must be True or False"),
    (dict(reduction_factor=True), "reduction_factor must be a number > 0"),
])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        AdapterConfig(**kw)


def test_unsupported_architecture():
    with pytest.raises(ValueError, match="model type 'gpt2' is not supported; supported are"):
        get_peft_model(FAMILIES["gpt2"].build(), AdapterConfig())


def test_module_errors():
    with pytest.raises(ValueError, match="unsupported activation"):
        BottleneckAdapter(8, 2, activation="tanh")
    # a float, bool or string width failed inside torch.empty ("invalid combination of arguments"), naming neither
    for sizes in ((16, 2.5), (16.0, 4), (16, True), (16, "4"), (16, 0)):
        with pytest.raises(ValueError, match="BottleneckAdapter: features and bottleneck must be positive integers"):
            BottleneckAdapter(*sizes)
    for scale in ("1", float("nan"), True):
        with pytest.raises(ValueError, match="BottleneckAdapter: scale must be a finite number"):
            BottleneckAdapter(8, 2, scale=scale)
    np = pytest.importorskip("numpy")
    adapter = BottleneckAdapter(np.int64(8), np.int32(2), scale=np.float32(0.5))  # numpy's scalars, as LoRALinear
    assert (adapter.features, adapter.bottleneck, adapter.scale) == (8, 2, 0.5) and adapter.down.weight.shape == (2, 8)


def test_meta_built_adapter_materialised_module_by_module_starts_as_the_identity():
    """FSDP's materialisation calls reset_parameters on each module owning parameters: the up projection's own
    (nn.Linear's) gave it a random weight, and the adapter's did not reset its LayerNorm."""
    torch.manual_seed(0)
    adapter = BottleneckAdapter(8, 3, layer_norm=True, device="meta").to_empty(device="cpu")
    for module in adapter.modules():
        if next(module.parameters(recurse=False), None) is not None:
            module.reset_parameters()
    x = torch.randn(4, 8)
    assert torch.equal(adapter(x), x)
    assert adapter.down.weight.abs().max() > 0 and torch.equal(adapter.down.bias, torch.zeros(3))
    with torch.no_grad():
        for p in adapter.parameters():
            p.fill_(5.0)
    adapter.reset_parameters()
    ln = adapter.layer_norm
    assert torch.equal(ln.weight, torch.ones(8)) and torch.equal(ln.bias, torch.zeros(8))
    assert torch.equal(adapter(x), x)
    # a module pickled before the projections had their own class holds plain nn.Linear ones: the adapter's
    # reset_parameters still gives the adapter's initialisation
    for name in ("down", "up"):
        old = torch.nn.Linear(*reversed(getattr(adapter, name).weight.shape))
        setattr(adapter, name, old)
    adapter.reset_parameters()
    assert torch.equal(adapter(x), x) and torch.equal(adapter.down.bias, torch.zeros(3))


# ------------------------------------------------------------------------------------ placement by hand

# Where each placement puts an adapter, written out independently of pefttorch's ARCHITECTURES: module paths
# relative to a transformer layer. "ffn" is (the FFN's input module, its output module).
HAND_SITES = {
    "bert": {"attention": ["attention.output.dense"], "ffn": ("intermediate", "output.dense")},
    "llama": {"attention": ["self_attn.o_proj"], "ffn": ("mlp", "mlp")},
    "marian": {"attention": ["self_attn.out_proj", "encoder_attn.out_proj"], "ffn": ("fc1", "fc2")},
}
HAND_ACTIVATIONS = {"relu": torch.relu, "gelu": lambda a: 0.5 * a * (1 + torch.erf(a / 2 ** 0.5)),
                    "gelu_tanh": lambda a: 0.5 * a * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (a + 0.044715 * a ** 3))),
                    "silu": lambda a: a * torch.sigmoid(a)}
LN_EPS = 0.1  # set on each adapter's LayerNorm: far from the default 1e-5, so ignoring it is caught


def adapter_by_hand(adapter, x, activation, scaling, layer_norm):
    """scaling * up(act(down(LN(x)))) in plain tensor ops, from the adapter's weights only."""
    if layer_norm:
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).square().mean(-1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + LN_EPS) * adapter.layer_norm.weight + adapter.layer_norm.bias
    a = HAND_ACTIVATIONS[activation](x @ adapter.down.weight.T + adapter.down.bias)
    return scaling * (a @ adapter.up.weight.T + adapter.up.bias)


def model_by_hand(base, pm, family, placement, activation, scaling, layer_norm):
    """A copy of the base model with plain forward hooks adding each adapter where its placement says: after
    the attention output projection(s) or the FFN (on that module's output, which stays the residual), or
    parallel (reading the FFN's input, added to the FFN's output). Returns it and the hooked module paths."""
    base = copy.deepcopy(base)
    modules = dict(base.named_modules())
    after_attention, after_ffn, parallel = placement
    layers = [n for n in modules if re.fullmatch(r".*\.layers?\.\d+", n)]
    hooked = []

    def delta(path, x):  # the adapter is saved under its module path, dots replaced
        return adapter_by_hand(pm.adapters[path.replace(".", "_")], x, activation, scaling, layer_norm)

    for layer in layers:
        after = [f"{layer}.{m}" for m in HAND_SITES[family]["attention"]] if after_attention else []
        ffn_in, ffn_out = (f"{layer}.{m}" for m in HAND_SITES[family]["ffn"])
        after += [ffn_out] if after_ffn else []
        for path in after:
            if path in modules:  # an encoder layer has no cross-attention
                modules[path].register_forward_hook(lambda m, args, out, path=path: out + delta(path, out))
                hooked.append(path)
        if parallel:
            kept = {}
            modules[ffn_in].register_forward_pre_hook(lambda m, args, kept=kept: kept.update(x=args[0]))
            modules[ffn_out].register_forward_hook(
                lambda m, args, out, path=ffn_out, kept=kept: out + delta(path, kept.pop("x")))
            hooked.append(ffn_out)
    return base, hooked


@pytest.mark.parametrize("family", ["bert", "llama", "marian"])
@pytest.mark.parametrize("kw, placement, activation", [
    (dict(style="houlsby"), (True, True, False), "gelu"),
    (dict(style="pfeiffer"), (False, True, False), "silu"),
    (dict(style="parallel"), (False, False, True), "gelu_tanh"),
    (dict(style="parallel", after_attention=True), (True, False, True), "relu"),
    (dict(style="pfeiffer", after_attention=True, after_ffn=False), (True, False, False), "gelu"),
])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_each_placement_equals_hooks_written_by_hand(family, kw, placement, activation, layer_norm):
    """Each style's adapters sit where the papers put them (Houlsby: after the attention output projection and
    after the FFN; Pfeiffer: after the FFN; He et al.'s parallel: reading the FFN's input, added to its output)
    and compute scaling * up(act(down(LN(x)))) with the LayerNorm's own eps: the logits equal a copy of the base
    model with forward hooks written here in plain tensor ops (random adapter weights, up projection included)."""
    config = AdapterConfig(**kw, bottleneck=5, activation=activation, scaling=0.7, layer_norm=layer_norm)
    base, model = build(family, config)
    pm = model.base_model
    randomize(model)
    if layer_norm:
        for adapter in pm.adapters.values():
            assert adapter.layer_norm.eps == 1e-5  # nn.LayerNorm's (and AdapterHub's) default
            adapter.layer_norm.eps = LN_EPS
    hand, hooked = model_by_hand(base, pm, family, placement, activation, 0.7, layer_norm)
    assert sorted(hooked) == sorted(s.output for s in pm.sites)  # no adapter left out of the comparison
    batch = inputs(family)
    with torch.no_grad():
        expected = logits(hand, batch)
        assert not torch.allclose(expected, logits(base, batch), atol=1e-3)  # the adapters matter
        torch.testing.assert_close(logits(model, batch), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- budgets


def _trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _budget_model():
    """A Llama of about 0.9M parameters: big enough that 1% is several units of every method."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64))


@pytest.mark.parametrize("method, unit, kwargs", [
    ("lora", "r", {"target_modules": "all-linear"}),
    ("adapter", "bottleneck", {"style": "houlsby"}),
    ("adapter", "bottleneck", {"style": "parallel", "layer_norm": True}),
])
@pytest.mark.parametrize("budget", [0.1, 0.05, 0.01])
def test_budget_is_hit_within_one_unit(method, unit, kwargs, budget, capsys):
    base = _budget_model()
    total = sum(p.numel() for p in base.parameters())
    config = config_for_budget(base, method, budget, **kwargs)
    assert f"{budget:.4%}" in capsys.readouterr().out
    count = _trainable(get_peft_model(copy.deepcopy(base), config))
    units = getattr(config, unit)
    counts = []
    for u in (units - 1, units + 1):
        if u >= 1:
            other = copy.deepcopy(config)
            setattr(other, unit, u)
            counts.append(_trainable(get_peft_model(copy.deepcopy(base), other)))
    # the chosen unit is the best: its neighbours are no closer to the target
    assert all(abs(count - budget * total) <= abs(c - budget * total) for c in counts)
    assert abs(count - budget * total) <= (max(counts) - min(counts + [count])) / 2 + 1


@pytest.mark.parametrize("method, kwargs, budget", [
    ("prompt", {}, 0.002),
    ("prompt", {"num_transformer_submodules": 2}, 0.002),  # HF PEFT's seq2seq layout: a row per submodule (was 2x)
    ("ia3", {}, 0.001),
    ("ssf", {}, 0.002),
    ("ln_tuning", {}, 0.0005),
    ("bitfit", {}, None),  # the Llama has no biases: BERT's instead
])
def test_budget_in_tokens_and_layers_is_hit_within_one_unit(method, kwargs, budget, capsys):
    if method == "bitfit":
        torch.manual_seed(0)
        base = FAMILIES["bert"].build()
        budget = 0.02
    else:
        base = _budget_model()
    total = sum(p.numel() for p in base.parameters())
    config = config_for_budget(base, method, budget, **kwargs)
    assert f"{budget:.4%}" in capsys.readouterr().out
    count = _trainable(get_peft_model(copy.deepcopy(base), config))
    if method == "prompt":
        neighbours = [config.replace(num_virtual_tokens=u) for u in (config.num_virtual_tokens - 1,
                                                                     config.num_virtual_tokens + 1) if u >= 1]
    else:
        chosen = config.layers_to_transform
        assert chosen == sorted(chosen) and chosen[-1] == max(_layers(base))  # the top layers
        below = sorted(set(_layers(base)) - set(chosen))
        neighbours = ([config.replace(layers_to_transform=chosen[1:])] if len(chosen) > 1 else []) + \
            ([config.replace(layers_to_transform=[below[-1], *chosen])] if below else [])
    counts = [_trainable(get_peft_model(copy.deepcopy(base), c)) for c in neighbours]
    assert counts and all(abs(count - budget * total) <= abs(c - budget * total) for c in counts)


@pytest.mark.parametrize("family, kwargs", [
    ("bert", {"target_modules": ["query", "value"], "bias": "lora_only"}),
    ("bert", {"target_modules": ["query", "value"], "bias": "all"}),
    ("bert", {"target_modules": ["query", "value"], "bias": "all", "modules_to_save": ["classifier"]}),  # once
    ("gpt2", {"target_modules": ["c_attn"], "bias": "lora_only"}),  # Conv1D's bias
    ("bert", {"target_modules": ["query", "value"], "rank_pattern": {"value": 2}}),  # value's rank is fixed
])
def test_lora_budget_counts_the_biases_and_pinned_ranks_that_train(family, kwargs, capsys):
    torch.manual_seed(0)
    base = FAMILIES[family].build()
    total = sum(p.numel() for p in base.parameters())
    config = config_for_budget(base, "lora", 0.05, **kwargs)
    said = int(re.search(r": ([\d,]+) trainable", capsys.readouterr().out).group(1).replace(",", ""))
    count = _trainable(get_peft_model(copy.deepcopy(base), config))
    assert said == count  # the printed count is the model's
    counts = [_trainable(get_peft_model(copy.deepcopy(base), dataclasses.replace(config, r=u)))
              for u in (config.r - 1, config.r + 1) if u >= 1]
    assert counts and all(abs(count - 0.05 * total) <= abs(c - 0.05 * total) for c in counts)  # r chosen on it


def test_lora_budget_refuses_a_rank_pattern_covering_every_target():
    base = FAMILIES["bert"].build()
    with pytest.raises(ValueError, match="rank_pattern sets the rank of every targeted layer"):
        config_for_budget(base, "lora", 0.05, target_modules=["query", "value"], rank_pattern={"query": 2, "value": 2})


def _layers(model):
    from pefttorch.tuners.lora.model import _layer_index

    return sorted({i for n, _ in model.named_modules() if (i := _layer_index(n + ".", None)) is not None})


def test_budget_out_of_reach_says_the_range():
    base = FAMILIES["llama"].build()
    with pytest.raises(ValueError, match=r"cannot reach 0\.0001% .* it reaches .*% \(bottleneck=1"):
        config_for_budget(base, "adapter", 1e-6)
    with pytest.raises(ValueError, match="cannot reach 90.0000%"):
        config_for_budget(base, "lora", 0.9, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="not yet supported method 'scalearn'"):
        config_for_budget(base, "scalearn", 0.01)
    with pytest.raises(ValueError, match=r"ia3 cannot reach 10\.0000% .*\(layers=1, .*\(layers=2,"):
        config_for_budget(base, "ia3", 0.1)
    with pytest.raises(ValueError, match="chooses layers_to_transform itself"):
        config_for_budget(base, "ssf", 0.01, layers_to_transform=[0])
    for budget in ("0.01", None, True, float("nan")):  # a string was "'<' not supported between ..."
        with pytest.raises(ValueError, match=r"budget is a share of the model's parameters, a real number in \(0, "):
            config_for_budget(base, "lora", budget)
    # a numpy scalar or a 0-d tensor from a sweep is a number
    assert config_for_budget(base, "lora", torch.tensor(0.01), verbose=False) == config_for_budget(
        base, "lora", 0.01, verbose=False)


def test_bf16_model_keeps_fp32_adapters_and_trains():
    torch.manual_seed(0)
    model = get_peft_model(FAMILIES["llama"].build().to(torch.bfloat16), AdapterConfig(bottleneck=3, layer_norm=True))
    assert all(p.dtype == torch.float32 for p in model.base_model.adapters.parameters())
    batch = inputs("llama")
    out = model(**batch, labels=batch["input_ids"])
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.base_model.adapters.parameters())


def test_a_bare_decoder_gets_adapters_and_layer_selection():
    """What AutoModel returns (LlamaModel: its blocks are "layers.N", its own first component) got no adapter at all
    ("found no place"), and layers_to_transform matched nothing there: the layer index was only read after one more
    component, as in model.layers.N. LoRA keeps HF PEFT's reading (which has no index there), so that its save with
    layers_to_transform always loads in HF PEFT: there it is refused with the layers available."""
    torch.manual_seed(0)
    bare = FAMILIES["llama"].build().model  # the LlamaModel inside LlamaForCausalLM
    ids = torch.randint(1, 90, (2, 5))

    def layers_trained(model):  # the block index in each trained parameter's name ("layers.1." or "layers_1_")
        return {re.search(r"layers[._](\d+)[._]", n).group(1) for n, p in model.named_parameters() if p.requires_grad}

    assert layers_trained(get_peft_model(copy.deepcopy(bare), AdapterConfig(bottleneck=4))) == {"0", "1"}
    for config in (AdapterConfig(bottleneck=4, layers_to_transform=[1]), pefttorch.IA3Config(layers_to_transform=[1]),
                   pefttorch.LNTuningConfig(layers_to_transform=[1])):
        model = get_peft_model(copy.deepcopy(bare), config)
        assert layers_trained(model) == {"1"}, type(config).__name__
        model(input_ids=ids)
    with pytest.raises(ValueError, match=r"matched no linear layer .*layers_to_transform=\[1\]"):
        get_peft_model(copy.deepcopy(bare), pefttorch.LoraConfig(target_modules=["q_proj"], layers_to_transform=[1]))


@pytest.mark.parametrize("name", ["AdapterConfig", "LoraConfig", "IA3Config", "SsfConfig", "BitFitConfig",
                                  "LNTuningConfig", "IncreLoraConfig"])
def test_an_empty_layers_to_transform_is_refused(name):
    """[] was read as no restriction: every layer was adapted (HF PEFT reads it as no layer, and finds nothing)."""
    cls = getattr(pefttorch, name)
    with pytest.raises(ValueError, match=rf"{name}: layers_to_transform=\[\] selects no layer; give None"):
        cls(layers_to_transform=[])
    assert cls(layers_to_transform=None).layers_to_transform is None
