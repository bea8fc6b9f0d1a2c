"""BitFit and LayerNorm tuning through get_peft_model: which parameters train, equality with the base model whose
parameters are set by hand, disable/unload/merge, save/load and HF PEFT's LN tuning format both ways."""

from __future__ import annotations

import copy

import pytest
import torch
from hf_models import fresh, inputs, logits, loss

from pefttorch import BitFitConfig, LNTuningConfig, PeftModel, get_peft_model


def randomize(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.base_model.adapter_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


CASES = [("bert", BitFitConfig()), ("marian", BitFitConfig()), ("bert", LNTuningConfig()),
         ("llama", LNTuningConfig()), ("t5", LNTuningConfig()), ("gpt2", BitFitConfig(target_modules=["c_attn"]))]
IDS = ["bitfit-bert", "bitfit-marian", "ln-bert", "ln-llama", "ln-t5", "bitfit-gpt2-c_attn"]


@pytest.mark.parametrize(("family", "config"), CASES, ids=IDS)
def test_starts_as_the_base_model_and_equals_it_with_the_tuned_values_set_by_hand(family, config):
    base = fresh(family)
    model = get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    batch = inputs(family)
    torch.testing.assert_close(logits(model, batch), logits(base, batch), rtol=0, atol=0)
    randomize(model)
    by_hand = copy.deepcopy(base)
    with torch.no_grad():
        for path, _, name, key in model.base_model.slots:
            getattr(by_hand.get_submodule(path), name).copy_(model.base_model.tuned[key])
    torch.testing.assert_close(logits(model, batch), logits(by_hand, batch), rtol=0, atol=0)


@pytest.mark.parametrize(("family", "config"), CASES, ids=IDS)
def test_only_the_chosen_parameters_train(family, config):
    model = get_peft_model(fresh(family), copy.deepcopy(config))
    model.train()
    loss(model(**inputs(family))).backward()
    trained = {n.removeprefix("base_model.model.") for n, p in model.base_model.model.named_parameters()
               if p.grad is not None}
    want = {f"{path}.{name}" for path, _, name, _ in model.base_model.slots}
    assert trained == want
    if isinstance(config, BitFitConfig):
        assert all(n.endswith("bias") for n in trained)
    else:
        assert all("norm" in n.lower() for n in trained)
    assert model.get_nb_trainable_parameters()[0] == sum(p.numel() for p in model.base_model.adapter_parameters())


def test_bitfit_default_takes_every_bias():
    model = get_peft_model(fresh("bert"), BitFitConfig())
    names = {f"{p}.{n}" for p, _, n, _ in model.base_model.slots}
    biases = {n for n, _ in fresh("bert").named_parameters() if n.endswith("bias")}
    assert names == biases


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])  # (eval: MHA's fast path reads them too)
def test_bitfit_takes_multihead_attentions_biases(train, tmp_path):
    """BitFit's biases are every parameter named as one: nn.MultiheadAttention's in_proj_bias (its query, key and
    value biases) and bias_k / bias_v stayed frozen under "every module with a bias", as they are not named `bias`.
    They train, save, load, switch off and unload as the others. (Compared within rounding: MHA takes its fast
    path where no parameter requires a gradient.)"""
    def build():
        torch.manual_seed(0)
        layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        layer.extra = torch.nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True)
        return layer.train(train)

    mha = {f"{m}.{n}" for m in ("self_attn", "extra") for n in ("in_proj_bias", "out_proj.bias")} | {
        "extra.bias_k", "extra.bias_v"}
    biases = {n for n, _ in build().named_parameters() if "bias" in n}
    model = get_peft_model(build(), BitFitConfig())
    trained = {n.removeprefix("base_model.model.") for n, p in model.named_parameters()
               if p.requires_grad and n.startswith("base_model.model.")}
    assert mha <= biases == trained
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        for p in model.base_model.tuned.values():
            p.add_(torch.randn_like(p))
        adapted = model(x)
        plain = build()(x)
        assert not torch.allclose(adapted, plain)
        with model.disable_adapter():
            torch.testing.assert_close(model(x), plain)
        model.save_pretrained(tmp_path)
        torch.testing.assert_close(PeftModel.from_pretrained(build(), tmp_path)(x), adapted)
        torch.testing.assert_close(copy.deepcopy(model).merge_and_unload()(x), adapted)
        torch.testing.assert_close(model.unload()(x), plain)


def test_disable_unload_and_merge():
    base = fresh("bert")
    model = get_peft_model(copy.deepcopy(base), BitFitConfig())
    originals = {k: p for k, p in model.base_model.originals.items()}
    randomize(model)
    batch = inputs("bert")
    adapted, plain = logits(model, batch), logits(base, batch)
    assert not torch.equal(adapted, plain)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, batch), plain, rtol=0, atol=0)
    torch.testing.assert_close(logits(model, batch), adapted, rtol=0, atol=0)
    model.to(torch.float64)  # the originals kept aside move with the model
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, batch), plain.double(), rtol=1e-6, atol=1e-6)
    model.to(torch.float32)
    merged = copy.deepcopy(model).merge_and_unload()
    torch.testing.assert_close(logits(merged, batch), adapted, rtol=0, atol=0)
    unloaded = model.unload()
    torch.testing.assert_close(logits(unloaded, batch), plain, rtol=0, atol=0)
    # the modules hold their original Parameter objects again
    held = {id(p) for p in unloaded.parameters()}
    assert all(id(p) in held for p in originals.values())
    assert set(unloaded.state_dict()) == set(base.state_dict())


@pytest.mark.parametrize(("family", "config"), CASES, ids=IDS)
def test_save_and_load_round_trip(family, config, tmp_path):
    model = get_peft_model(fresh(family), copy.deepcopy(config))
    randomize(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(fresh(family), tmp_path)
    batch = inputs(family)
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), rtol=0, atol=0)


def test_errors():
    with pytest.raises(ValueError, match="matched none of the modules with a bias of LlamaForCausalLM"):
        get_peft_model(fresh("llama"), BitFitConfig())  # Llama has no biases
    with pytest.raises(ValueError, match="LNTuningConfig adapts LayerNorm/RMSNorm modules; .*q_proj"):
        get_peft_model(fresh("llama"), LNTuningConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="did you mean 'target_modules'"):
        BitFitConfig(target_module=["dense"])
    model = get_peft_model(fresh("bert"), LNTuningConfig(layers_to_transform=[0]))
    assert all(".layer.0." in p for p, *_ in model.base_model.slots)


# ---------------------------------------------------------------- HF PEFT's LN tuning, both ways

@pytest.mark.parametrize("family", ["bert", "llama", "t5"])
@pytest.mark.parametrize("layers", [None, [1]])
def test_hf_peft_loads_our_ln_tuning(family, layers, tmp_path):
    peft = pytest.importorskip("peft")
    model = get_peft_model(fresh(family), LNTuningConfig(layers_to_transform=layers))
    randomize(model)
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(fresh(family), tmp_path)
    batch = inputs(family)
    torch.testing.assert_close(logits(theirs, batch), logits(model, batch), rtol=0, atol=0)


def test_we_load_hf_peft_ln_tuning(tmp_path):
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(fresh("llama"), peft.LNTuningConfig())
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(fresh("llama"), tmp_path)
    batch = inputs("llama")
    torch.testing.assert_close(logits(ours, batch), logits(theirs, batch), rtol=0, atol=0)


@pytest.mark.parametrize(("family", "config"), [("marian", BitFitConfig()), ("t5", LNTuningConfig())],
                         ids=["bitfit", "ln"])
def test_a_model_built_on_meta_and_materialised_by_to_empty(family, config, tmp_path):
    """to_empty() gave the module's slot and the tuned copy a tensor each: a strict load of the same model's state
    dict failed, the trainable count doubled, and save_pretrained wrote the copy that did not train. (Families
    without non-persistent buffers, which to_empty leaves uninitialised and no state dict restores.)"""
    from hf_models import FAMILIES

    want = get_peft_model(fresh(family), config)
    randomize(want)
    with torch.device("meta"):
        model = get_peft_model(FAMILIES[family].build(), config)
    model.to_empty(device="cpu")
    model.get_base_model().tie_weights()  # to_empty unties them, as for any model
    model.load_state_dict({k: v.clone() for k, v in want.state_dict().items()}, strict=True)
    assert model.get_nb_trainable_parameters() == want.get_nb_trainable_parameters()
    batch = inputs(family)
    torch.testing.assert_close(logits(model, batch), logits(want, batch))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(fresh(family), tmp_path)
    torch.testing.assert_close(logits(loaded, batch), logits(want, batch))


@pytest.mark.parametrize("merge", [False, True])
def test_moving_the_peft_model_after_unload_leaves_the_base_model_alone(merge):
    """The to_empty fix re-seated the tuned copies in _apply, also after unload(): peft.float() put them back into
    the returned base model (other logits, and a second get_peft_model refused it as adapted)."""
    base = fresh("bert")
    want = logits(base, inputs("bert"))
    peft = get_peft_model(base, LNTuningConfig())
    randomize(peft)
    unloaded = peft.merge_and_unload() if merge else peft.unload()
    after = logits(unloaded, inputs("bert"))
    peft.float()
    torch.testing.assert_close(logits(unloaded, inputs("bert")), after)
    if not merge:
        torch.testing.assert_close(after, want)
    get_peft_model(unloaded, LNTuningConfig())  # not refused
