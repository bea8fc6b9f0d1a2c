"""LoRA on transformers models: get_peft_model, training, save/load in HF PEFT's format both ways,
merging, generation, gradient checkpointing; on tiny Llama, BERT, T5, GPT-2 (Conv1D) and Marian."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from hf_models import FAMILIES
from safetensors import safe_open

from pefttorch import LoraConfig, PeftModel, get_peft_model
from pefttorch.tuners.lora import LoraLayer

peft = pytest.importorskip("peft")


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return FAMILIES[request.param]


def fresh(family, seed=0):
    torch.manual_seed(seed)
    return family.build().eval()


def inputs_of(family, seed=1):
    return family.inputs(torch.Generator().manual_seed(seed))


def logits(model, inputs):
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def loss_and_grads(model, inputs):
    model.train()
    model.zero_grad()
    kwargs = dict(inputs)
    kwargs.setdefault("labels", kwargs["input_ids"])
    loss = model(**kwargs).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_starts_as_the_base_model_and_only_adapters_train(family):
    base = fresh(family)
    inp = inputs_of(family)
    want = logits(base, inp)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=family.targets))
    torch.testing.assert_close(logits(model, inp), want)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    n_train, n_all = model.get_nb_trainable_parameters()
    assert n_train == sum(p.numel() for p in model.parameters() if p.requires_grad) and n_all > n_train
    assert model.config is model.get_base_model().config  # attributes reach the wrapped model


def test_backward_reaches_every_adapter_and_nothing_else(family):
    model = get_peft_model(fresh(family), LoraConfig(r=4, target_modules=family.targets, init_lora_weights=False,
                                                     lora_dropout=0.1))
    loss, grads = loss_and_grads(model, inputs_of(family))
    assert torch.isfinite(loss)
    assert all(g.abs().sum() > 0 for g in grads.values()), [n for n, g in grads.items() if g.abs().sum() == 0]
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_outputs_and_grads_match_hf_peft(family, tmp_path):
    theirs = peft.get_peft_model(fresh(family), peft.LoraConfig(r=4, lora_alpha=8, target_modules=family.targets,
                                                                init_lora_weights=False))
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(fresh(family), tmp_path, is_trainable=True)
    inp = inputs_of(family)
    torch.testing.assert_close(logits(ours, inp), logits(theirs, inp), rtol=1e-5, atol=1e-5)
    loss_o, g_o = loss_and_grads(ours, inp)
    loss_t, g_t = loss_and_grads(theirs, inp)
    torch.testing.assert_close(loss_o, loss_t)
    assert g_o.keys() == g_t.keys()  # same parameter names as HF PEFT
    for name in g_o:
        torch.testing.assert_close(g_o[name], g_t[name], rtol=1e-4, atol=1e-6, msg=name)


def test_save_load_round_trips_with_hf_peft(family, tmp_path):
    inp = inputs_of(family)
    ours = get_peft_model(fresh(family), LoraConfig(r=4, target_modules=family.targets, init_lora_weights=False))
    want = logits(ours, inp)
    ours.save_pretrained(tmp_path / "ours")
    assert {p.name for p in (tmp_path / "ours").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}

    again = PeftModel.from_pretrained(fresh(family), tmp_path / "ours")
    torch.testing.assert_close(logits(again, inp), want)
    assert not any(p.requires_grad for p in again.parameters())  # is_trainable=False, as in HF PEFT
    assert not again.training

    theirs = peft.PeftModel.from_pretrained(fresh(family), tmp_path / "ours")
    torch.testing.assert_close(logits(theirs, inp), want)
    theirs.save_pretrained(tmp_path / "theirs")
    back = PeftModel.from_pretrained(fresh(family), tmp_path / "theirs")
    torch.testing.assert_close(logits(back, inp), want)


def test_generate_matches_hf_peft(family, tmp_path):
    if not family.generative:
        pytest.skip("not a generative model")
    ours = get_peft_model(fresh(family), LoraConfig(r=4, target_modules=family.targets, init_lora_weights=False))
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(fresh(family), tmp_path)
    ids = inputs_of(family)["input_ids"]
    kwargs = dict(max_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(ids))
    out_ours = ours.eval().generate(input_ids=ids, **kwargs)
    out_theirs = theirs.eval().generate(input_ids=ids, **kwargs)
    assert torch.equal(out_ours, out_theirs)


def test_merge_and_unload(family):
    inp = inputs_of(family)
    base = fresh(family)
    original = logits(base, inp)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=family.targets, init_lora_weights=False))
    want = logits(model, inp)
    assert not torch.allclose(want, original)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, inp), want, rtol=1e-5, atol=1e-5)  # merged layers run as the base
    model.unmerge_adapter()
    merged = model.merge_and_unload()
    assert merged is base and not any(isinstance(m, LoraLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, inp), want, rtol=1e-5, atol=1e-5)


def test_unload_gives_back_the_original(family):
    inp = inputs_of(family)
    base = fresh(family)
    original = logits(base, inp)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    model = get_peft_model(base, LoraConfig(r=4, target_modules=family.targets, init_lora_weights=False))
    model.merge_adapter()
    back = model.unload()
    torch.testing.assert_close(logits(back, inp), original, rtol=1e-6, atol=1e-6)
    assert back.state_dict().keys() == state.keys()
    assert {n: p.requires_grad for n, p in back.named_parameters()} == flags


@pytest.mark.parametrize("name", ["llama", "bert", "t5"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    family = FAMILIES[name]
    inp = inputs_of(family)
    plain = get_peft_model(fresh(family), LoraConfig(r=4, target_modules=family.targets, init_lora_weights=False))
    ckpt = get_peft_model(fresh(family), LoraConfig(r=4, target_modules=family.targets, init_lora_weights=False))
    ckpt.load_state_dict(plain.state_dict())
    enable = getattr(ckpt, "activation_checkpointing_enable", None) if hasattr(
        type(ckpt.get_base_model()), "activation_checkpointing_enable") else None
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": True})
    else:
        ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    _, g_plain = loss_and_grads(plain, inp)
    _, g_ckpt = loss_and_grads(ckpt, inp)
    assert g_plain.keys() == g_ckpt.keys()
    for n in g_plain:
        torch.testing.assert_close(g_ckpt[n], g_plain[n], rtol=1e-5, atol=1e-6, msg=n)


# ---------------------------------------------------------------------------------------- adapters


def test_multiple_adapters_switch_add_up_and_delete():
    family = FAMILIES["llama"]
    inp = inputs_of(family)
    base = fresh(family)
    original = logits(base, inp)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    y_a = logits(model, inp)
    model.add_adapter("b", LoraConfig(r=2, target_modules=["v_proj", "o_proj"], init_lora_weights=False))
    assert model.active_adapters == ["default"]
    torch.testing.assert_close(logits(model, inp), y_a)
    model.set_adapter("b")
    y_b = logits(model, inp)
    assert not torch.allclose(y_b, y_a)
    assert all(p.requires_grad == (".b." in n) for n, p in model.named_parameters() if ".lora_" in n)

    # both active: the updates add up, which merging both must reproduce
    model.set_adapter(["default", "b"])
    y_ab = logits(model, inp)
    reference = copy.deepcopy(model)
    reference.merge_adapter()
    torch.testing.assert_close(logits(reference, inp), y_ab, rtol=1e-5, atol=1e-5)

    with model.disable_adapter():
        torch.testing.assert_close(logits(model, inp), original)
    torch.testing.assert_close(logits(model, inp), y_ab)

    model.delete_adapter("default")
    assert list(model.peft_config) == ["b"] and model.active_adapters == ["b"]
    torch.testing.assert_close(logits(model, inp), y_b)
    assert not any("default" in n for n, _ in model.named_parameters())


def test_merging_into_a_tied_weight_warns():
    """GPT-2's lm_head shares the input embeddings' weight: merging LoRA on it changes the embeddings too, and the
    merged model's logits moved by 2.5 without a word (HF PEFT warns)."""
    family = FAMILIES["gpt2"]
    model = get_peft_model(fresh(family), LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False))
    with pytest.warns(UserWarning, match="merging into the weight of lm_head, which transformer.wte shares"):
        model.merge_adapter()
    model.unmerge_adapter()
    with pytest.warns(UserWarning, match="lm_head, which transformer.wte shares"):
        model.merge_and_unload()
    untied = get_peft_model(fresh(family), LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to say where no merged weight is shared
        untied.merge_adapter()


def test_merged_adapters_leave_when_disabled_or_switched():
    """A merged adapter is in the base weights: disabling adapters or switching to another takes it back out, as HF
    PEFT does, instead of computing it anyway (disabled) or adding it to the new adapter (set_adapter)."""
    family = FAMILIES["llama"]
    inp = inputs_of(family)
    original = logits(fresh(family), inp)
    model = get_peft_model(fresh(family), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=2, target_modules=["v_proj", "o_proj"], init_lora_weights=False))
    model.set_adapter("b")
    y_b = logits(model, inp)
    model.set_adapter("default")
    y_default = logits(model, inp)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, inp), y_default, rtol=1e-5, atol=1e-5)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, inp), original, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(model, inp), y_default, rtol=1e-5, atol=1e-5)  # unmerged now, still adapted
    model.merge_adapter()
    with pytest.warns(UserWarning, match="unmerging"):
        model.set_adapter("b")
    torch.testing.assert_close(logits(model, inp), y_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(model.merge_and_unload(), inp), y_b, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_takes_hf_peft_arguments(tmp_path):
    family = FAMILIES["llama"]
    inp = inputs_of(family)
    model = get_peft_model(fresh(family), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    y = logits(model, inp)  # "default" alone is active
    merged = model.merge_and_unload(progressbar=True, safe_merge=True, adapter_names=["default"])
    torch.testing.assert_close(logits(merged, inp), y, rtol=1e-5, atol=1e-5)

    model = get_peft_model(fresh(family), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("inf")
    before = layer.base_layer.weight.clone()
    with pytest.raises(ValueError, match="NaN or inf"):
        model.merge_adapter(safe_merge=True)
    assert not layer.merged and torch.equal(layer.base_layer.weight, before)

    # the rank allocation step of a plain LoRA model names the cause, not the wrapped model's missing attribute
    with pytest.raises(AttributeError, match=r"update_and_allocate is for rank-allocating adapters .* LoraConfig"):
        model.update_and_allocate(0)
    # a name that is no adapter once merged nothing without a word
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['typo'\]; adapters are: \['default'\]"):
        model.merge_adapter(["typo"])
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['typo'\]"):
        model.merge_and_unload(adapter_names=["typo"])
    with pytest.raises(TypeError, match=r"adapter_names is a list of adapter names, got the string 'default'"):
        model.merge_adapter("default")
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['typo'\]"):  # the same check when saving
        model.save_pretrained(tmp_path, selected_adapters=["typo"])
    assert not list(tmp_path.iterdir())
    assert isinstance(layer, LoraLayer) and not layer.merged  # nothing merged or unloaded


def test_adapter_set_errors():
    family = FAMILIES["llama"]
    model = get_peft_model(fresh(family), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="pefttorch config"):
        model.add_adapter("hf", peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    from pefttorch import IA3Config
    with pytest.raises(TypeError, match="cannot join"):
        model.add_adapter("ia3", IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    assert list(model.peft_config) == ["default"]
    with pytest.raises(ValueError, match="only adapter"):
        model.delete_adapter("default")
    assert model.active_adapter == "default"


def test_two_adapters_with_a_copy_of_the_same_module_cannot_both_be_active():
    """Both active, forward ran the first adapter's copy of lm_head while the second's trained as if used (its
    gradient was None, its training lost without a word). Refused; each alone, and with an adapter without a copy,
    still works."""
    family = FAMILIES["llama"]
    model = get_peft_model(fresh(family), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    model.add_adapter("two", LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    model.add_adapter("plain", LoraConfig(r=2, target_modules=["v_proj"]))
    with pytest.raises(ValueError, match=r"\['default', 'two'\] each keep their own copy of .*lm_head"):
        model.set_adapter(["default", "two"])
    assert model.active_adapters == ["default"]
    model.set_adapter(["two", "plain"])
    model(**inputs_of(family)).logits.square().mean().backward()
    heads = model.base_model.model.lm_head.modules_to_save
    assert heads["two"].weight.grad is not None and heads["default"].weight.grad is None


@pytest.mark.parametrize("first", ["lora", "ia3", "prompt", "meft", "adalora", "bitfit", "ln"])
def test_a_second_get_peft_model_on_the_same_model_is_refused(first, tmp_path):
    """A second get_peft_model on a model that holds adapters already (a notebook cell run twice) once
    re-initialised the first PeftModel's adapter in place and made its save unloadable; after unload() it works."""
    import pefttorch

    configs = {"lora": LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False),
               "ia3": pefttorch.IA3Config(), "prompt": pefttorch.PromptTuningConfig(num_virtual_tokens=2),
               "meft": pefttorch.MeftConfig(), "adalora": pefttorch.AdaLoraConfig(init_r=4, target_r=2,
                                                                                 total_step=10),
               "bitfit": pefttorch.BitFitConfig(), "ln": pefttorch.LNTuningConfig()}
    family = FAMILIES["marian" if first == "bitfit" else "llama"]  # Llama's linear layers have no bias
    base = fresh(family)
    batch = inputs_of(family)
    first_model = get_peft_model(base, configs[first])
    if first in ("bitfit", "ln"):  # parameters swapped in, not hooks: found on a deep copy of the PeftModel too
        with pytest.raises(ValueError, match="swapped in by BitFit or LayerNorm tuning"):
            get_peft_model(copy.deepcopy(first_model).get_base_model(), LoraConfig(r=4, target_modules=["v_proj"]))
    before = logits(first_model, batch)
    with pytest.raises(ValueError, match=r"holds a pefttorch adapter already .* given to get_peft_model before") as e:
        get_peft_model(base, LoraConfig(r=4, target_modules=["v_proj"]))
    # the advice fits the method: add_adapter() only where it holds several adapters (it refuses for the others)
    assert ("add_adapter()" in str(e.value)) == (first == "lora"), str(e.value)
    torch.testing.assert_close(logits(first_model, batch), before, rtol=0, atol=0)
    first_model.unload()
    get_peft_model(base, LoraConfig(r=4, target_modules=["v_proj"]))


@pytest.mark.parametrize("method", ["increlora", "ia3", "ssf", "ln", "adapter", "meft"])
def test_merge_and_unload_with_adapter_names_on_one_adapter_set_methods(method):
    """merge_and_unload(adapter_names=["default"]) once failed with a TypeError inside the tuner for every method
    but plain LoRA; naming the one adapter set is the same as naming none."""
    import pefttorch

    configs = {"increlora": pefttorch.IncreLoraConfig(target_modules=["q_proj", "v_proj"], top_h=1),
               "ia3": pefttorch.IA3Config(), "ssf": pefttorch.SsfConfig(), "ln": pefttorch.LNTuningConfig(),
               "adapter": pefttorch.AdapterConfig(), "meft": pefttorch.MeftConfig()}
    family = FAMILIES["llama"]
    batch = inputs_of(family)
    results = []
    for names in (None, ["default"]):
        model = get_peft_model(fresh(family), configs[method])
        with torch.no_grad():  # move off the identity init so that merging has something to fold
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        try:
            results.append(logits(model.merge_and_unload(adapter_names=names), batch))
        except (ValueError, NotImplementedError) as e:  # adapters and MEFT cannot be merged: the same error
            results.append(str(e))
    if isinstance(results[0], str):
        assert results[0] == results[1] and "merged" in results[0]
    else:
        torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)


@pytest.mark.parametrize("method", ["ia3", "ssf", "ln", "bitfit", "adapter", "prompt", "meft"])
def test_safe_merge_for_every_method(method):
    """merge_adapter/merge_and_unload(safe_merge=True) failed with a TypeError inside every tuner but LoRA's. Now
    the mergeable ones merge as without it and refuse a NaN, with nothing merged; the others give their own
    "cannot be merged" error."""
    import pefttorch

    configs = {"ia3": pefttorch.IA3Config(), "ssf": pefttorch.SsfConfig(), "ln": pefttorch.LNTuningConfig(),
               "bitfit": pefttorch.BitFitConfig(), "adapter": pefttorch.AdapterConfig(),
               "prompt": pefttorch.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
               "meft": pefttorch.MeftConfig()}
    family = FAMILIES["llama"] if method != "bitfit" else FAMILIES["bert"]
    batch = inputs_of(family)

    def build():
        model = get_peft_model(fresh(family), configs[method])
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        return model

    model = build()
    try:
        want = logits(build().merge_and_unload(), batch)
    except (ValueError, NotImplementedError) as e:
        with pytest.raises(type(e), match="merged"):
            model.merge_and_unload(safe_merge=True)
        return
    torch.testing.assert_close(logits(model.merge_and_unload(safe_merge=True), batch), want, rtol=0, atol=0)

    model = build()
    before = {n: p.detach().clone() for n, p in model.get_base_model().named_parameters()}
    with torch.no_grad():
        trained = next(p for p in model.parameters() if p.requires_grad)
        trained.view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="safe_merge: .*NaN or inf; nothing was merged"):
        model.merge_adapter(safe_merge=True)
    after = dict(model.get_base_model().named_parameters())
    for n, p in before.items():  # nothing folded: the base weights are as they were (the NaN is the adapter's)
        if n in after and after[n] is not trained:
            torch.testing.assert_close(after[n], p, rtol=0, atol=0, equal_nan=True, msg=n)


def test_a_refused_safe_merge_leaves_every_weight_bit_for_bit():
    """A NaN in a later layer's update was found after the earlier layers had merged; they were undone by
    subtracting their update, which does not round back: in bfloat16 the refused merge moved base weights by a step."""
    family = FAMILIES["llama"]
    model = get_peft_model(fresh(family).to(torch.bfloat16), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                        init_lora_weights=False))
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    with torch.no_grad():
        for layer in layers:
            layer.lora_B["default"].weight.normal_(0, 0.1)
        layers[-1].lora_B["default"].weight[0, 0] = float("nan")
    before = {n: p.clone() for n, p in model.get_base_model().state_dict().items()}
    for call in (lambda: model.merge_adapter(safe_merge=True), lambda: model.merge_and_unload(safe_merge=True)):
        with pytest.raises(ValueError, match="safe_merge: merging into .* gives a weight with NaN or inf"):
            call()
        after = model.get_base_model().state_dict()
        assert all(torch.equal(after[n], p) for n, p in before.items() if "lora_" not in n)
        assert not any(layer.merged for layer in layers)


@pytest.mark.parametrize("kept", ["modules_to_save", "bias", "ia3_modules_to_save"])
def test_safe_merge_refuses_a_non_finite_tensor_the_merged_model_keeps(kept, tmp_path):
    """The trained copy of a modules_to_save module and LoRA's trained biases are kept as they are by
    merge_and_unload: a NaN there passed safe_merge, where BitFit or LayerNorm tuning refused the same tensor."""
    import pefttorch

    family = FAMILIES["gpt2"]
    config = {"modules_to_save": LoraConfig(r=2, target_modules=["c_attn"], modules_to_save=["ln_f"]),
              "bias": LoraConfig(r=2, target_modules=["c_attn"], bias="all"),
              "ia3_modules_to_save": pefttorch.IA3Config(modules_to_save=["ln_f"])}[kept]
    model = get_peft_model(fresh(family), config)
    with torch.no_grad():
        if kept == "bias":
            model.base_model.model.transformer.h[0].mlp.c_fc.bias[0] = float("nan")
        else:
            model.base_model.model.transformer.ln_f.modules_to_save["default"].weight[0] = float("nan")
    before = {n: p.clone() for n, p in model.get_base_model().state_dict().items()}
    where = "transformer.h.0.mlp.c_fc.bias" if kept == "bias" else "transformer.ln_f.weight"
    with pytest.raises(ValueError, match=f"safe_merge: NaN or inf in the trained {re.escape(where)}.*nothing was "
                                         "merged"):
        model.merge_and_unload(safe_merge=True)
    after = model.get_base_model().state_dict()
    assert all(torch.equal(after[n], p) for n, p in before.items() if p.isfinite().all())
    if kept == "bias":  # the biases stay whichever adapter merges: another adapter's merge is checked too
        model.add_adapter("other", LoraConfig(r=2, target_modules=["c_attn"]))
        with pytest.raises(ValueError, match=f"safe_merge: NaN or inf in the trained {re.escape(where)}"):
            model.merge_and_unload(safe_merge=True, adapter_names=["other"])
        model.delete_adapter("other")
    if kept == "bias":  # a loaded adapter (nothing requires grad) is checked by its config's bias setting too
        model.save_pretrained(tmp_path)
        loaded = PeftModel.from_pretrained(fresh(family), tmp_path)
        with pytest.raises(ValueError, match=f"safe_merge: NaN or inf in the trained {re.escape(where)}"):
            loaded.merge_and_unload(safe_merge=True)
    model.merge_and_unload()  # without safe_merge: kept as it is, as HF PEFT


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt"])
def test_gradient_checkpointing_leaves_one_input_hook_that_disable_removes(method):
    """transformers' gradient_checkpointing_enable registers the input-require-grads hook already; registering it
    again replaced the handles the model keeps, so disable_input_require_grads() left one hook firing for good
    (outputs required grad with every parameter frozen)."""
    import pefttorch

    family = FAMILIES["llama"]
    config = {"lora": LoraConfig(r=2, target_modules=["q_proj"]), "ia3": pefttorch.IA3Config(),
              "prompt": pefttorch.PromptTuningConfig(num_virtual_tokens=2)}[method]
    model = get_peft_model(fresh(family), config)
    base = model.get_base_model()
    names = ["gradient_checkpointing_enable"] + (["activation_checkpointing_enable"]  # (transformers 5's other name)
                                                 if hasattr(base, "activation_checkpointing_enable") else [])
    for name in names:
        getattr(model, name)(**{name.replace("_enable", "_kwargs"): {"use_reentrant": True}})
        assert len(base.get_input_embeddings()._forward_hooks) == 1
        base.gradient_checkpointing_disable()
        base.disable_input_require_grads()
        assert not base.get_input_embeddings()._forward_hooks
    base = model.unload()
    base.requires_grad_(False)
    assert not base(**inputs_of(family)).logits.requires_grad


@pytest.mark.parametrize("method", ["lora", "ia3", "meft", "ln"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_unload_of_a_copy_gives_back_the_trainability_the_model_came_with(method, how):
    """unload() once looked trainability up by the original parameters' ids: on a deep copy or an unpickled
    model every parameter came back trainable, the embeddings the user had frozen included."""
    import io

    import pefttorch

    configs = {"lora": LoraConfig(r=4, target_modules=["q_proj"]), "ia3": pefttorch.IA3Config(),
               "meft": pefttorch.MeftConfig(bottleneck=4), "ln": pefttorch.LNTuningConfig()}
    base = fresh(FAMILIES["llama"])
    base.get_input_embeddings().requires_grad_(False)
    model = get_peft_model(base, configs[method])
    if how == "deepcopy":
        copied = copy.deepcopy(model)
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        copied = torch.load(buffer, weights_only=False)
    for unloaded in (copied.unload(), model.unload()):
        flags = {n: p.requires_grad for n, p in unloaded.named_parameters()}
        assert flags.pop("model.embed_tokens.weight") is False and all(flags.values())


def test_hf_peft_keywords_and_classification_heads_per_adapter(tmp_path):
    """HF PEFT's keyword arguments are accepted, and on a classification model a later adapter gets its own
    trainable copy of the new head, as in HF PEFT (it trained against the frozen, random head)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    def build():
        torch.manual_seed(0)
        return LlamaForSequenceClassification(LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=50, num_labels=3, pad_token_id=0))

    model = get_peft_model(build(), LoraConfig(r=2, target_modules=["q_proj"], task_type="SEQ_CLS"),
                           low_cpu_mem_usage=False)
    second = LoraConfig(r=2, target_modules=["v_proj"])
    model.add_adapter("b", second)
    assert second.modules_to_save is None  # the user's config is left as it was
    assert model.peft_config["b"].modules_to_save == ["classifier", "score", "pre_classifier"]  # HF PEFT 0.22's
    model.set_adapter("b")
    assert any(p.requires_grad and "score" in n and ".b." in n for n, p in model.named_parameters())
    model.set_adapter("b", inference_mode=True)
    assert not any(p.requires_grad for p in model.parameters())
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build(), tmp_path, low_cpu_mem_usage=True, torch_device="cpu")
    assert list(loaded.peft_config) == ["default"]


@pytest.mark.parametrize("method", ["lora", "bitfit", "ln", "ia3", "adapter"])
def test_save_pretrained_takes_hf_pefts_distributed_arguments(method, tmp_path):
    """is_main_process=False wrote the files anyway (every process of a run at once) and state_dict= was ignored
    (under FSDP2 the only way to save; tested with two processes in test_distributed.py), and then, for BitFit and
    LayerNorm tuning, whose tuned tensors are registered twice, still read from the model."""
    from safetensors.torch import load_file

    import pefttorch

    config = {"lora": LoraConfig(r=4, target_modules=["query"], init_lora_weights=False),
              "bitfit": pefttorch.BitFitConfig(), "ln": pefttorch.LNTuningConfig(),
              "ia3": pefttorch.IA3Config(), "adapter": pefttorch.AdapterConfig(bottleneck=4)}[method]
    family = FAMILIES["bert"]
    model = get_peft_model(fresh(family), config)
    model.save_pretrained(tmp_path / "other", is_main_process=False)
    assert not (tmp_path / "other").exists()
    own = {k: v.clone() for k, v in model.state_dict().items()}
    given = {k: v + 1 if v.is_floating_point() else v for k, v in own.items()}
    model.save_pretrained(tmp_path / "given", state_dict=given)
    twin = copy.deepcopy(model)  # what the file must hold: the save of a model whose tensors are the given ones
    twin.load_state_dict(given)
    twin.save_pretrained(tmp_path / "want")
    model.save_pretrained(tmp_path / "own")
    got, want, mine = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("given", "want", "own"))
    assert got.keys() == want.keys() and got
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
        assert not torch.equal(got[k], mine[k]), k
    for k, v in model.state_dict().items():  # the model's own tensors are back
        torch.testing.assert_close(v, own[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="state_dict key 'bert.pooler.nope.weight' is not a parameter"):
        model.save_pretrained(tmp_path / "bad", state_dict={"bert.pooler.nope.weight": torch.ones(1)})
    assert not (tmp_path / "bad").exists()


def test_switching_adapters_leaves_what_the_user_unfroze_alone():
    """set_adapter and delete_adapter froze the whole model again, so an embedding the user made trainable after
    get_peft_model silently stopped training (HF PEFT's set_adapter leaves it). Adding an adapter leaves it too, as
    HF PEFT 0.22's injection does (it froze the model again, as the first injection)."""
    family = FAMILIES["llama"]
    model = get_peft_model(fresh(family), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    embed = model.get_base_model().model.embed_tokens.weight
    embed.requires_grad_(True)
    model.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert embed.requires_grad

    def trainable():
        return {n for n, p in model.named_parameters() if p.requires_grad}

    model.set_adapter("b")
    assert "base_model.model.model.embed_tokens.weight" in trainable()
    assert all(".b." in n or "embed_tokens" in n for n in trainable())
    assert any(n.endswith("v_proj.lora_A.b.weight") for n in trainable())
    model.set_adapter("default")
    assert "base_model.model.model.embed_tokens.weight" in trainable()
    assert not any(".b." in n for n in trainable())
    assert any("lm_head.modules_to_save.default" in n for n in trainable())
    model.delete_adapter("b")
    assert "base_model.model.model.embed_tokens.weight" in trainable()


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_deleting_an_adapter_stops_its_biases_training(bias):
    """set_adapter marks only what the adapters still there own: the deleted one's biases kept training."""
    model = get_peft_model(fresh(FAMILIES["bert"]), LoraConfig(r=2, target_modules=["query"], bias=bias))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["value"]))
    model.delete_adapter("default")
    assert model.active_adapters == ["other"]
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith("bias"))


def test_load_adapter_for_inference_puts_the_model_in_eval_mode(tmp_path):
    """As HF PEFT's load_adapter (and from_pretrained here): left in training mode, the adapters' dropout and the
    model's own changed every output of a model loaded for inference."""
    family = FAMILIES["llama"]
    get_peft_model(fresh(family), LoraConfig(r=2, target_modules=["v_proj"], lora_dropout=0.5)).save_pretrained(
        tmp_path)
    for is_trainable in (False, True):
        model = get_peft_model(fresh(family).train(), LoraConfig(r=2, target_modules=["q_proj"]))
        model.load_adapter(tmp_path, "other", is_trainable=is_trainable)
        assert model.training is is_trainable
        theirs = peft.get_peft_model(fresh(family).train(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
        theirs.load_adapter(tmp_path, "other", is_trainable=is_trainable)
        assert theirs.training is is_trainable
        # and the loaded adapter trains (inactive) if asked to, as in HF PEFT: an optimizer built from what requires
        # grad before set_adapter left it out
        assert ({n.replace(".other", "") for n, p in model.named_parameters() if p.requires_grad and ".other" in n}
                == {n.replace(".other", "") for n, p in theirs.named_parameters() if p.requires_grad and ".other" in n}
                != set()) is is_trainable


def test_a_refused_delete_of_a_merged_adapter_changes_nothing():
    """The refusal came after the adapter was frozen: it stayed active, untrainable, and unmerging did not help."""
    model = get_peft_model(fresh(FAMILIES["llama"]), LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("two", LoraConfig(r=2, target_modules=["v_proj"]))
    model.set_adapter("two")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".two." in n for n in trainable)
    model.merge_adapter()
    with pytest.raises(RuntimeError, match="'two' is merged into the base weight of .*v_proj and 1 more"):
        model.delete_adapter("two")
    model.unmerge_adapter()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    model.delete_adapter("two")
    assert list(model.peft_config) == ["default"]


def test_modules_to_save_naming_another_adapters_lora_layer_is_refused():
    """modules_to_save naming a layer another adapter adapts with LoRA wrapped the whole LoRA layer: its factors were
    copied and trained in full, and the saves held them under the wrapper's keys, which pefttorch could not load (HF
    PEFT refuses it, a TypeError). Refused; the model is left as it was."""
    family = FAMILIES["llama"]
    inp = inputs_of(family)
    model = get_peft_model(fresh(family), LoraConfig(r=4, target_modules=["q_proj", "lm_head"],
                                                     init_lora_weights=False))
    before = logits(model, inp)
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    second = {"r": 2, "target_modules": ["k_proj"], "modules_to_save": ["lm_head"]}
    with pytest.raises(TypeError, match=r"modules_to_save=\['lm_head'\] matches lm_head, which adapter\(s\) "
                                        r"\['default'\] adapt with LoRA"):
        model.add_adapter("b", LoraConfig(**second))
    theirs = peft.get_peft_model(fresh(family), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(TypeError):
        theirs.add_adapter("b", peft.LoraConfig(**second))
    assert list(model.peft_config) == ["default"]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == trainable  # no k_proj layers left either
    torch.testing.assert_close(logits(model, inp), before, rtol=0, atol=0)


def test_a_target_that_another_adapter_keeps_a_copy_of_is_refused():
    """target_modules naming a module another adapter wraps as a module to save skipped it in silence: the new
    adapter went without LoRA there (HF PEFT refuses it). Refused where the spec matches it; specs that leave it out
    keep working, and so does the adapter's own copy of it."""
    family = FAMILIES["llama"]
    model = get_peft_model(fresh(family), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match=r"target_modules=\['lm_head', 'q_proj'\] matches lm_head, which "
                                         r"adapter\(s\) \['default'\] keep a trained copy of \(modules_to_save\)"):
        model.add_adapter("c", LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    theirs = peft.get_peft_model(fresh(family), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                modules_to_save=["lm_head"]))
    with pytest.raises(ValueError):
        theirs.add_adapter("c", peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert list(model.peft_config) == ["default"]
    model.add_adapter("regex", LoraConfig(r=2, target_modules=r".*\.(q|v)_proj"))
    model.add_adapter("linear", LoraConfig(r=2, target_modules="all-linear"))
    model.add_adapter("excluded", LoraConfig(r=2, target_modules=["q_proj", "lm_head"], exclude_modules=["lm_head"]))
    model.add_adapter("own", LoraConfig(r=2, target_modules=["q_proj", "lm_head"], modules_to_save=["lm_head"]))
    assert list(model.base_model.model.lm_head.modules_to_save) == ["default", "own"]


def test_set_adapter_and_add_adapter_take_out_every_merged_adapter_as_hf_peft():
    """set_adapter unmerged only when the active adapters changed: "default" merged by name while "b" was active
    stayed in the weights after set_adapter("b") (and add_adapter, which sets the active adapters again), added to
    b's outputs in silence. HF PEFT unmerges whatever is merged there; so does pefttorch."""
    import pefttorch

    family = FAMILIES["llama"]
    inp = inputs_of(family)
    models = {}
    for lib in (peft, pefttorch):
        model = lib.get_peft_model(fresh(family), lib.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                 init_lora_weights=False))
        model.add_adapter("b", lib.LoraConfig(r=2, target_modules=["q_proj", "k_proj"], init_lora_weights=False))
        model.set_adapter("b")
        models[lib] = model
    ours, theirs = models[pefttorch], models[peft]
    ours.load_state_dict(theirs.state_dict())
    only_b = logits(theirs, inp)
    for lib, model in models.items():
        model.merge_adapter(adapter_names=["default"])
        with pytest.warns(UserWarning, match="nmerging"):
            model.set_adapter("b")
        torch.testing.assert_close(logits(model, inp), only_b, rtol=1e-5, atol=1e-5)
        model.merge_adapter(adapter_names=["default"])
        model.add_adapter("c", lib.LoraConfig(r=2, target_modules=["o_proj"]))
        torch.testing.assert_close(logits(model, inp), only_b, rtol=1e-5, atol=1e-5)
    assert not any(m.merged for m in ours.modules() if isinstance(m, LoraLayer))


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_what_trains_after_adding_loading_and_deleting_adapters_is_hf_peft_s(tmp_path):
    """HF PEFT 0.22's rules: set_adapter trains the active adapters (unless inference_mode) and freezes the others;
    adding or loading an adapter changes nothing that trained before (the new one is frozen, unless loaded with
    is_trainable=True); deleting the active adapter activates what remains, trainable, deleting another changes
    nothing. pefttorch froze an inactive adapter loaded to train when another came, and remembered an
    inference_mode past set_adapter, keeping an adapter frozen after a delete and overriding set_requires_grad."""
    import pefttorch

    family = FAMILIES["llama"]
    get_peft_model(fresh(family), LoraConfig(r=2, target_modules=["v_proj"])).save_pretrained(tmp_path)
    runs = {}
    for lib in (pefttorch, peft):
        model = lib.get_peft_model(fresh(family), lib.LoraConfig(r=2, target_modules=["q_proj"]))
        model.load_adapter(tmp_path, "loaded", is_trainable=True)
        model.add_adapter("b", lib.LoraConfig(r=2, target_modules=["k_proj"]))
        model.load_adapter(tmp_path, "reference")
        steps = [_trainable(model)]
        model.set_adapter("default", inference_mode=True)
        model.add_adapter("c", lib.LoraConfig(r=2, target_modules=["o_proj"]))
        steps.append(_trainable(model))
        model.delete_adapter("loaded")  # inactive, trainable
        model.delete_adapter("reference")
        steps.append(_trainable(model))
        model.set_adapter("b")
        model.set_requires_grad("default")
        model.delete_adapter("c")  # inactive
        steps.append(_trainable(model))
        model.set_adapter("default", inference_mode=True)
        model.set_adapter("b")
        model.delete_adapter("b")  # active: "default" takes over, and trains
        steps.append((_trainable(model), model.active_adapters))
        runs[lib] = steps
    assert runs[pefttorch] == runs[peft]
    assert any(".loaded." in n for n in runs[peft][0]) and runs[peft][-1][0]


def test_an_adapter_added_while_adapters_are_disabled_starts_disabled():
    """Inside disable_adapter() the model computes as the base model (its docstring), but an adapter added there ran
    once activated (HF PEFT's does too). Its layers start disabled, and are enabled on leaving with the others; the
    same between disable_adapter_layers() and enable_adapter_layers()."""
    from pefttorch.tuners.lora.layer import ModulesToSaveWrapper

    family = FAMILIES["llama"]
    inp = inputs_of(family)
    original = logits(fresh(family), inp)
    model = get_peft_model(fresh(family), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))

    def switched_off():
        return {m.disable_adapters for m in model.modules() if isinstance(m, (LoraLayer, ModulesToSaveWrapper))}

    with model.disable_adapter():
        model.add_adapter("d", LoraConfig(r=2, target_modules=["down_proj"], modules_to_save=["lm_head"],
                                          init_lora_weights=False))
        model.set_adapter("d")
        assert switched_off() == {True}
        torch.testing.assert_close(logits(model, inp), original)
    assert switched_off() == {False}
    with_d = logits(model, inp)
    assert not torch.allclose(with_d, original)
    model.disable_adapter_layers()
    model.add_adapter("e", LoraConfig(r=2, target_modules=["up_proj"], init_lora_weights=False))
    model.set_adapter(["d", "e"])
    torch.testing.assert_close(logits(model, inp), original)
    model.enable_adapter_layers()
    assert switched_off() == {False} and not torch.allclose(logits(model, inp), with_d)


def test_one_adapter_per_model_may_train_biases():
    """The biases are the base model's, shared by all adapters: a second adapter with bias != 'none' was accepted,
    and training it changed the first adapter's outputs (HF PEFT refuses it)."""
    config = dict(r=2, target_modules=["query"], bias="all")
    model = get_peft_model(fresh(FAMILIES["bert"]), LoraConfig(**config))
    with pytest.raises(ValueError, match="adapter 'default' trains biases .*one adapter per model"):
        model.add_adapter("two", LoraConfig(**{**config, "bias": "lora_only"}))
    assert list(model.peft_config) == ["default"]
    theirs = peft.get_peft_model(fresh(FAMILIES["bert"]), peft.LoraConfig(**config))
    with pytest.raises(ValueError, match="only 1 adapter with bias"):
        theirs.add_adapter("two", peft.LoraConfig(**{**config, "bias": "lora_only"}))
    model.add_adapter("two", LoraConfig(**{**config, "bias": "none"}))  # biases trained by one adapter alone


@pytest.mark.parametrize("method", ["lora", "ia3"])
@pytest.mark.parametrize("entry", ["unload", "base_model.unload", "merge_and_unload"])
def test_unload_gives_the_original_modules_to_save_back_and_merging_the_trained(method, entry):
    """A task head trained with the adapter (a modules_to_save copy): unload() gives the original back, as HF PEFT
    0.22 does (0.21 gave the trained copy), the tuner's own unload() too; merge_and_unload() keeps the trained copy."""
    from pefttorch import IA3Config

    family = FAMILIES["bert"]
    inp = inputs_of(family)
    config = (LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]) if method == "lora"
              else IA3Config(target_modules=["query"], feedforward_modules=[], modules_to_save=["classifier"]))
    model = get_peft_model(fresh(family), config)
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
    trained = logits(model, inp)
    unload = {"unload": model.unload, "base_model.unload": model.base_model.unload,
              "merge_and_unload": model.merge_and_unload}[entry]
    want = trained if entry == "merge_and_unload" else logits(fresh(family), inp)
    torch.testing.assert_close(logits(unload(), inp), want)
    assert (trained - logits(fresh(family), inp)).abs().max() > 0.1


@pytest.mark.parametrize("merged, active, keeps", [
    (["default"], "y", "default"),  # the active adapter's (original) head stayed: default's trained head was lost
    (["y"], "default", "original"),  # y has no copy: default's trained head came along
    (["default", "z"], "default", None),  # two trained heads: which? (HF PEFT refuses; one was kept silently)
])
def test_merge_and_unload_keeps_the_named_adapters_modules_to_save_copy(merged, active, keeps):
    """As HF PEFT 0.22: merging named adapters keeps the trained copy of the one that has one, or the original."""
    family = FAMILIES["llama"]
    inp = inputs_of(family)
    results = []
    for lib in (peft, None):
        make = LoraConfig if lib is None else peft.LoraConfig
        model = (get_peft_model if lib is None else peft.get_peft_model)(
            fresh(family), make(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
        model.add_adapter("y", make(r=2, target_modules=["k_proj"]))
        model.add_adapter("z", make(r=2, target_modules=["v_proj"], modules_to_save=["lm_head"]))
        with torch.no_grad():
            for name, copied in model.base_model.model.lm_head.modules_to_save.items():
                copied.weight.add_(1.0 if name == "default" else -1.0)
        model.set_adapter(active)
        if keeps is None:
            with pytest.raises(ValueError, match=None if lib else r"each train their own copy of this module"):
                model.merge_and_unload(adapter_names=merged)
            continue
        head = model.merge_and_unload(adapter_names=merged).lm_head.weight
        want = fresh(family).lm_head.weight + (1.0 if keeps == "default" else 0.0)
        torch.testing.assert_close(head, want, rtol=0, atol=0)
        results.append(logits(model.base_model.model, inp))
    if keeps is not None:
        torch.testing.assert_close(results[1], results[0])
    else:  # refused before anything changed
        assert all(not layer.merged_adapters for layer in model.modules() if isinstance(layer, LoraLayer))


def test_saved_config_is_for_inference_as_hf_peft_writes_it(tmp_path):
    """HF PEFT writes inference_mode true (its PeftConfig.from_pretrained + get_peft_model then gives a frozen
    adapter); pefttorch wrote the live value, false, and that route trained the adapter."""
    for lib, folder in ((peft, "theirs"), (None, "ours")):
        build = get_peft_model if lib is None else peft.get_peft_model
        make = LoraConfig if lib is None else peft.LoraConfig
        build(fresh(FAMILIES["llama"]), make(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / folder)
    for folder in ("theirs", "ours"):
        assert json.loads((tmp_path / folder / "adapter_config.json").read_text())["inference_mode"] is True


def test_multiple_adapters_save_and_load(tmp_path):
    family = FAMILIES["llama"]
    inp = inputs_of(family)
    model = get_peft_model(fresh(family), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "other" / "adapter_config.json").exists()
    model.set_adapter("other")
    want_other = logits(model, inp)
    loaded = PeftModel.from_pretrained(fresh(family), tmp_path)
    loaded.load_adapter(tmp_path / "other", "other")
    loaded.set_adapter("other")
    torch.testing.assert_close(logits(loaded, inp), want_other)
    theirs = peft.PeftModel.from_pretrained(fresh(family), tmp_path)
    theirs.load_adapter(tmp_path / "other", "other")
    theirs.set_adapter("other")
    torch.testing.assert_close(logits(theirs, inp), want_other)


# ---------------------------------------------------------------------------------------- config


def test_overlapping_patterns_mean_the_same_after_a_reload(tmp_path):
    """The first matching key of rank_pattern/alpha_pattern wins; the saved config sorted the keys, so after a reload
    another one won: a scaling of 8 instead of 0.25 in silence, or ranks that no longer fit the saved tensors."""
    family = FAMILIES["llama"]
    inp = inputs_of(family)
    later = r"layers\.1\..*"  # sorts before q_proj
    config = LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False,
                        rank_pattern={"q_proj": 2, later: 3}, alpha_pattern={"q_proj": 2, later: 64})
    model = get_peft_model(fresh(family), config)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(fresh(family), tmp_path)
    layer = loaded.base_model.model.model.layers[1].self_attn.q_proj
    assert (layer.r["default"], layer.scaling["default"]) == (2, 1.0)
    torch.testing.assert_close(logits(loaded, inp), logits(model, inp))


def test_all_linear_in_any_case_as_hf_peft():
    """HF PEFT compares the shorthand lower-cased; "All-Linear" was taken here as a regex that matched nothing."""
    family = FAMILIES["llama"]
    ours = get_peft_model(fresh(family), LoraConfig(target_modules="All-Linear"))
    theirs = peft.get_peft_model(fresh(family), peft.LoraConfig(target_modules="All-Linear"))
    assert ({n for n, p in ours.named_parameters() if p.requires_grad}
            == {n for n, p in theirs.named_parameters() if p.requires_grad} != set())


def test_autocast_adapter_dtype_as_hf_peft():
    """(IA)^3, SSF and bottleneck adapters made float32 parameters in a bf16 model whatever autocast_adapter_dtype
    said; add_adapter took the model's setting, not its own argument (which it refused, with low_cpu_mem_usage)."""
    from pefttorch import AdapterConfig, IA3Config, SsfConfig

    base = fresh(FAMILIES["llama"]).to(torch.bfloat16)

    def dtypes(model, part=""):
        return {p.dtype for n, p in model.named_parameters() if p.requires_grad and part in n}

    ia3 = dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    for autocast in (True, False):
        want = {torch.float32 if autocast else torch.bfloat16}
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**ia3), autocast_adapter_dtype=autocast)
        assert dtypes(theirs) == want
        for config in (IA3Config(**ia3), SsfConfig(target_modules=["k_proj"]), AdapterConfig(bottleneck=4)):
            assert dtypes(get_peft_model(copy.deepcopy(base), config, autocast_adapter_dtype=autocast)) == want
    lora = dict(r=2, target_modules=["q_proj"])
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(**lora), autocast_adapter_dtype=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**lora), autocast_adapter_dtype=False)
    for model, config in ((ours, LoraConfig(**lora)), (theirs, peft.LoraConfig(**lora))):
        model.add_adapter("two", config)  # its own default, True: float32
        model.add_adapter("three", config, low_cpu_mem_usage=False, autocast_adapter_dtype=False)
        for name, want in (("two", torch.float32), ("three", torch.bfloat16)):
            assert {p.dtype for n, p in model.named_parameters() if f".{name}." in n} == {want}, name


@pytest.mark.parametrize("how", ["assign", "to_empty"])
@pytest.mark.parametrize("extra", [{}, {"target_modules": ["q_proj", "lm_head"]}, {"modules_to_save": ["lm_head"]}])
def test_a_state_dict_loads_into_a_model_whose_tied_weights_are_not_one_yet(how, extra):
    """The state dict keeps one key of tied tensors; a model built under accelerate's init_empty_weights has lm_head
    and the embeddings as separate meta tensors: its lm_head key was missing (strict), or lm_head stayed on meta or
    uninitialised (strict=False, a Trainer's resume): logits off by 0.7 to 1e32."""
    init_empty_weights = pytest.importorskip("accelerate").init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, tie_word_embeddings=True)
    torch.manual_seed(0)
    lora = {"r": 2, "target_modules": ["q_proj"], "init_lora_weights": False, **extra}  # (lm_head wrapped: its base's)
    trained = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(**lora))
    state = trained.state_dict()
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config)
    model = get_peft_model(empty, LoraConfig(**lora))
    if how == "to_empty":
        model.to_empty(device="cpu")
        with torch.no_grad():  # the rotary embedding's non-persistent buffers, which no state dict carries
            buffers = dict(trained.named_buffers())
            for name, buffer in model.named_buffers():
                buffer.copy_(buffers[name])
    model.load_state_dict(state, strict=True, assign=how == "assign")
    ids = torch.randint(3, 90, (1, 6))
    torch.testing.assert_close(logits(model, {"input_ids": ids}), logits(trained, {"input_ids": ids}))


def test_target_selection_options():
    family = FAMILIES["llama"]
    model = fresh(family)

    def adapted(config):
        m = get_peft_model(copy.deepcopy(model), config)
        return {n.removeprefix("base_model.model."): mod for n, mod in m.named_modules() if isinstance(mod, LoraLayer)}

    everything = adapted(LoraConfig(target_modules="all-linear"))
    assert "lm_head" not in everything and "model.layers.0.mlp.down_proj" in everything
    assert len(everything) == 2 * 7  # q k v o gate up down per layer
    assert set(adapted(LoraConfig(target_modules=r".*\.(q|k)_proj"))) == {
        f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qk"}
    assert set(adapted(LoraConfig(target_modules=["q_proj"], layers_to_transform=[1]))) == {
        "model.layers.1.self_attn.q_proj"}
    assert "model.layers.0.mlp.down_proj" not in adapted(LoraConfig(target_modules="all-linear",
                                                                    exclude_modules=["down_proj"]))
    ranks = adapted(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                               alpha_pattern={r"layers\.1\.self_attn\.q_proj": 32}))
    assert ranks["model.layers.0.self_attn.v_proj"].r["default"] == 2
    assert ranks["model.layers.0.self_attn.q_proj"].scaling["default"] == 2.0
    assert ranks["model.layers.1.self_attn.q_proj"].scaling["default"] == 8.0
    assert adapted(LoraConfig(target_modules=["q_proj"], use_rslora=True, r=4, lora_alpha=8))[
        "model.layers.0.self_attn.q_proj"].scaling["default"] == 4.0


def test_set_adapter_does_not_reach_into_the_users_model():
    """A tuner forwards missing attributes to the wrapped model: set_adapter's switch was looked up there (a model's
    own set_trainable was called, its `_trainable` attribute read and written). And adapter names given as an
    iterator were consumed by the first use, so inference_mode froze nothing."""
    family = FAMILIES["llama"]
    base = fresh(family)
    calls = []
    base.set_trainable = lambda *args: calls.append(args)
    base._trainable = True
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["v_proj"]))
    model.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"]))
    model.set_adapter(iter(["default", "b"]), inference_mode=True)
    assert not any(p.requires_grad for p in model.parameters())
    model.set_adapter(["default", "b"])
    assert sum(p.requires_grad for p in model.parameters()) == 8
    assert calls == [] and base._trainable is True


def test_default_targets_per_model_type():
    model = get_peft_model(fresh(FAMILIES["llama"]), LoraConfig())
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert names == {"q_proj", "v_proj"}
    # HF PEFT's choice wherever both have one (Qwen3, OPT, Gemma2... had none here: a ported script stopped)
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as theirs

    from pefttorch.tuners.lora.config import DEFAULT_TARGET_MODULES as ours
    assert {"qwen3", "opt", "gemma2", "falcon", "phi"} <= set(ours)
    for model_type in set(ours) & set(theirs):
        assert ours[model_type] == theirs[model_type], model_type
    # and AdaLoRA's, which HF PEFT keeps apart: wider for T5, BART, OPT, RoBERTa, DeBERTa-v2 (q and v alone were
    # adapted here, with a third of HF PEFT's budget)
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING as theirs_ada

    from pefttorch import AdaLoraConfig

    ours_ada = AdaLoraConfig.default_target_modules
    assert ours_ada["opt"] != ours["opt"]
    for model_type in set(ours_ada) & set(theirs_ada):
        assert ours_ada[model_type] == theirs_ada[model_type], model_type
    hf = peft.get_peft_model(fresh(FAMILIES["t5"]), peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10))
    ada = get_peft_model(fresh(FAMILIES["t5"]), AdaLoraConfig(init_r=4, target_r=2, total_step=10))
    assert sorted(ada.base_model.rank_pattern()) == sorted(n.removeprefix("base_model.model.")
                                                           for n, m in hf.named_modules() if hasattr(m, "lora_E"))


def test_hf_peft_code_runs_unchanged(tmp_path):
    """HF PEFT's spelled-out defaults (use_dora=False...), keyword arguments (subfolder=, config=, revision=...)
    and set_adapter semantics: each once raised, or (set_adapter) left a loaded adapter frozen, so a ported
    training script trained nothing."""
    family = FAMILIES["llama"]
    inp = inputs_of(family)
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False, use_dora=False,
                        lora_bias=False, layer_replication=None, target_parameters=None, ensure_weight_tying=False)
    with pytest.raises(ValueError, match="use_dora=True is an HF PEFT feature"):
        LoraConfig(use_dora=True)
    with pytest.raises(ValueError, match="trainable_token_indices=.* is an HF PEFT feature"):
        LoraConfig(trainable_token_indices=torch.tensor([1, 2]))
    # fields that change nothing pefttorch computes, at HF PEFT's own defaults (not None)
    hf = peft.LoraConfig()
    LoraConfig(qalora_group_size=hf.qalora_group_size, megatron_core=hf.megatron_core, runtime_config=hf.runtime_config)
    model = get_peft_model(fresh(family), config, revision="main")
    model.add_adapter("second", LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    model.set_adapter("second")
    want = logits(model, inp)
    model.save_pretrained(tmp_path)  # the second adapter in tmp_path/second
    assert json.loads((tmp_path / "adapter_config.json").read_text())["revision"] == "main"

    loaded = PeftModel.from_pretrained(fresh(family), tmp_path, subfolder="second", revision="main", token=None)
    torch.testing.assert_close(logits(loaded, inp), want)
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference
    loaded.load_adapter(tmp_path, "first", low_cpu_mem_usage=True, torch_device="cpu", autocast_adapter_dtype=False)
    loaded.load_adapter(tmp_path, "again", subfolder="second")
    for name in ("first", "default", "again"):  # as HF PEFT: the activated adapter trains
        loaded.set_adapter(name)
        trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
        assert trainable and all(f".{name}." in n for n in trainable), (name, trainable)
    loaded.set_adapter("first", inference_mode=True)
    assert not any(p.requires_grad for p in loaded.parameters())
    # the switch is the model's: the adapters' configs (maybe the user's own objects) are left alone, a failed
    # call changes nothing, a later add_adapter keeps it, and inference_mode freezes the adapter alone
    assert all(c.inference_mode for c in loaded.peft_config.values())
    loaded.set_adapter("again")
    with pytest.raises(ValueError, match="unknown adapter"):
        loaded.set_adapter(["again", "typo"], inference_mode=True)
    loaded.add_adapter("fresh", config)
    assert {n.split(".")[-2] for n, p in loaded.named_parameters() if p.requires_grad} == {"again"}
    embedding = loaded.get_input_embeddings().weight.requires_grad_(True)  # unfrozen by the user
    loaded.set_adapter("again", inference_mode=True)
    assert embedding.requires_grad and not config.inference_mode
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == [
        "base_model.model.model.embed_tokens.weight"]

    given = LoraConfig(r=2, target_modules=["v_proj"])
    again = PeftModel.from_pretrained(fresh(family), tmp_path / "second", config=given, is_trainable=True)
    torch.testing.assert_close(logits(again, inp), want)
    assert not given.inference_mode and any(p.requires_grad for p in again.parameters())
    with pytest.raises(TypeError, match="unexpected keyword argument.*'subfoldr'"):
        PeftModel.from_pretrained(fresh(family), tmp_path, subfoldr="second")
    PeftModel.from_pretrained(fresh(family), tmp_path, key_mapping={}, ignore_mismatched_sizes=False,
                              use_safetensors=True)
    with pytest.raises(ValueError, match="ensure_weight_tying=True is an HF PEFT feature"):
        LoraConfig(ensure_weight_tying=True)  # HF PEFT ties a trained embedding copy to lm_head: not ignorable
    with pytest.raises(ValueError, match="key_mapping"):
        PeftModel.from_pretrained(fresh(family), tmp_path, key_mapping={"a": "b"})
    with pytest.raises(ValueError, match="mixed"):
        get_peft_model(fresh(family), LoraConfig(r=2), mixed=True)


def test_bias_options_and_modules_to_save(tmp_path):
    family = FAMILIES["bert"]
    inp = inputs_of(family)
    model = get_peft_model(fresh(family), LoraConfig(r=2, target_modules=["query"], bias="lora_only",
                                                     task_type="SEQ_CLS", init_lora_weights=False))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("query.base_layer.bias") for n in trainable)
    assert any("classifier.modules_to_save.default" in n for n in trainable)
    torch.nn.init.normal_(model.base_model.model.classifier.modules_to_save["default"].weight)
    want = logits(model, inp)
    with model.disable_adapter():  # the original head serves again
        assert not torch.allclose(logits(model, inp), want)
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(fresh(family), tmp_path)
    torch.testing.assert_close(logits(theirs, inp), want)
    again = PeftModel.from_pretrained(fresh(family), tmp_path)
    torch.testing.assert_close(logits(again, inp), want)

    all_bias = get_peft_model(fresh(family), LoraConfig(r=2, target_modules=["query"], bias="all"))
    assert all(p.requires_grad for n, p in all_bias.named_parameters() if n.endswith(".bias")
               and "original_module" not in n)

    # HF PEFT's save of a classifier with bias="all" has the head copy's bias twice (one key we refused)
    theirs = peft.get_peft_model(fresh(family), peft.LoraConfig(r=2, target_modules=["query"], bias="all",
                                                                task_type="SEQ_CLS", init_lora_weights=False))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if n.endswith(".bias") or "modules_to_save" in n:
                p.normal_()
    theirs.save_pretrained(tmp_path / "peft-all")
    ours = PeftModel.from_pretrained(fresh(family), tmp_path / "peft-all")
    torch.testing.assert_close(logits(ours, inp), logits(theirs.eval(), inp))

    # saved from a model where another adapter wrapped a layer this one does not: its bias under
    # <path>.base_layer.bias, which a model without that adapter (plain <path>.bias) refused
    both = get_peft_model(fresh(family), LoraConfig(r=2, target_modules=["query"], bias="all", init_lora_weights=False))
    both.add_adapter("other", LoraConfig(r=2, target_modules=["value"]))
    with torch.no_grad():
        for n, p in both.named_parameters():
            if n.endswith("value.base_layer.bias"):
                p.normal_()
    both.save_pretrained(tmp_path / "two")
    loaded = PeftModel.from_pretrained(fresh(family), tmp_path / "two")
    torch.testing.assert_close(logits(loaded, inp), logits(both, inp))


def test_layers_to_transform_picks_the_layers_hf_peft_picks():
    """In a model numbered twice from its top (timm's Swin: layers.<stage>.blocks.<block>) LoRA must read the index
    as HF PEFT does (the block's), or PEFT loads the save onto other layers, silently."""
    from torch import nn

    def stage():
        s = nn.Module()
        s.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8)) for _ in range(2))
        return s

    def net():
        n = nn.Module()
        n.layers = nn.ModuleList(stage() for _ in range(2))
        return n

    def picked(m):
        return sorted(n.removeprefix("base_model.model.") for n, x in m.named_modules() if isinstance(x, LoraLayer)
                      or type(x).__name__ == "Linear" and hasattr(x, "lora_A"))

    ours = get_peft_model(net(), LoraConfig(r=2, target_modules=["0"], layers_to_transform=[0]))
    theirs = peft.get_peft_model(net(), peft.LoraConfig(r=2, target_modules=["0"], layers_to_transform=[0]))
    assert picked(ours) == picked(theirs) == ["layers.0.blocks.0.0", "layers.1.blocks.0.0"]


def test_config_errors():
    model = fresh(FAMILIES["llama"])
    with pytest.raises(ValueError, match=r"matched no linear layer.*available to match: .*q_proj \(x2\)"):
        get_peft_model(model, LoraConfig(target_modules=["nope"]))
    with pytest.raises(ValueError, match="r must be a positive integer"):
        LoraConfig(r=0)
    with pytest.raises(TypeError, match=r"unknown field\(s\) 'lora_alfa' \(did you mean 'lora_alpha'\?\)"):
        LoraConfig(lora_alfa=16)
    with pytest.raises(ValueError, match="lora_dropout must be in"):
        LoraConfig(lora_dropout=1.0)
    with pytest.raises(ValueError, match="init_lora_weights='pissa' is not supported"):
        LoraConfig(init_lora_weights="pissa")
    with pytest.raises(ValueError, match=r"adapts nn.Linear and transformers Conv1D.*embed_tokens \(Embedding\)"):
        get_peft_model(model, LoraConfig(target_modules=["embed_tokens", "q_proj"]))
    assert not any(isinstance(m, LoraLayer) for m in model.modules())  # failed calls changed nothing
    with pytest.raises(ValueError, match=r"A string is a regular expression over the full module name, as in HF "
                                         r"PEFT: for the layers named q_proj, pass \['q_proj'\] or '\.\*\.q_proj'"):
        get_peft_model(model, LoraConfig(target_modules="q_proj"))
    assert LoraConfig(modules_to_save="lm_head").modules_to_save == ["lm_head"]  # one name, as other configs take it
    with pytest.raises(ValueError, match="no default for model type"):
        get_peft_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), LoraConfig())
    with pytest.raises(TypeError, match=r"takes a pefttorch config \(.*LoraConfig.*\), got peft\..*use pefttorch"):
        get_peft_model(model, peft.LoraConfig(target_modules=["q_proj"]))


def test_config_errors_name_the_field():
    """Each was a bare TypeError from deep inside get_peft_model (or, for the regex with layers_to_transform, a
    saved adapter HF PEFT refuses to load)."""
    for kw, match in [(dict(alpha_pattern={"q_proj": "16"}), r"alpha_pattern\['q_proj'\] must be a finite number"),
                      (dict(layers_to_transform="1"), "layers_to_transform must be a layer index or a list"),
                      (dict(layers_to_transform=[-1]), "layers_to_transform must be a layer index or a list"),
                      (dict(target_modules=5), "target_modules must be a list of module names, a regex or None"),
                      (dict(exclude_modules=5), "exclude_modules must be a list of module names, a regex or None"),
                      (dict(lora_dropout=None), "lora_dropout must be a number, got None"),
                      (dict(target_modules=r".*\.q_proj", layers_to_transform=[0]),
                       "layers_to_transform cannot be used with target_modules='.*"),
                      (dict(target_modules="all-linear", layers_to_transform=0),
                       "layers_to_transform cannot be used with target_modules='all-linear'")]:
        with pytest.raises(ValueError, match=match):
            LoraConfig(**kw)
    assert LoraConfig(target_modules=("q_proj", "v_proj")).target_modules == ["q_proj", "v_proj"]
    assert LoraConfig(target_modules=["q_proj"], layers_to_transform=1).layers_to_transform == [1]


def test_numpy_scalars_are_taken_as_plain_numbers():
    """As HF PEFT and the functional ops: np.int64 (a sweep over a numpy grid) and np.float32 were refused as not
    numbers. They are stored as Python numbers (the saved config is plain JSON); a bool is still refused."""
    import numpy as np

    from pefttorch import AdaLoraConfig, IncreLoraConfig

    config = LoraConfig(r=np.int64(4), lora_alpha=np.int64(8), lora_dropout=np.float32(0.25),
                        rank_pattern={"q_proj": np.int64(2)}, alpha_pattern={"q_proj": np.float32(0.5)})
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8, 0.25) and config.scaling == 2
    assert [type(v) for v in (config.r, config.lora_alpha, config.lora_dropout, config.rank_pattern["q_proj"],
                              config.alpha_pattern["q_proj"])] == [int, int, float, int, float]
    json.dumps(config.to_dict())
    assert peft.LoraConfig(r=np.int64(4), lora_alpha=np.int64(8)).lora_alpha == config.lora_alpha
    ada = AdaLoraConfig(init_r=np.int64(6), target_r=np.int64(2), total_step=np.int64(10), beta1=np.float32(0.5))
    incre = IncreLoraConfig(target_rank=np.int64(4), init_rank=np.int64(1), top_h=np.int64(1))
    assert (type(ada.init_r), type(ada.total_step), type(ada.beta1), type(incre.incre_rank_num)) == (
        int, int, float, int)
    json.dumps(ada.to_dict()), json.dumps(incre.to_dict())
    for kw, match in [(dict(r=True), "r must be a positive integer, got True"),
                      (dict(r=np.float32(4)), "r must be a positive integer"),
                      (dict(rank_pattern={"q_proj": True}), r"rank_pattern\['q_proj'\] must be a positive integer")]:
        with pytest.raises(ValueError, match=match):
            LoraConfig(**kw)


@pytest.mark.parametrize("name, kwargs, plain", [
    ("AdapterConfig", {"bottleneck": "i", "reduction_factor": "f", "scaling": "f"}, {}),
    ("ScaLearnConfig", {"omega_init_scale": "f"}, {"source_adapters": "src"}),
    ("IA3Config", {"layers_to_transform": "i"}, {}),
    ("PromptTuningConfig", {"num_virtual_tokens": "i", "token_dim": "i"}, {}),
    ("PrefixTuningConfig", {"num_virtual_tokens": "i", "encoder_hidden_size": "i"}, {}),
    ("DeptConfig", {"num_virtual_tokens": "i", "r": "i", "max_length": "i"}, {}),
    *[(name, {"layers_to_transform": "list"}, {"target_modules": ["q"]} if name == "LoraConfig" else {})
      for name in ("LoraConfig", "IA3Config", "SsfConfig", "BitFitConfig", "LNTuningConfig", "AdapterConfig")],
])
def test_numpy_numbers_are_taken_by_every_config(name, kwargs, plain):
    """Not LoRA's alone: np.int64 / np.float32 fields, and a list of numpy layer indices (``list(np.arange(2))``),
    were refused by the other configs; they are stored as Python numbers (the saved config is plain JSON)."""
    import numpy as np

    import pefttorch

    cls = getattr(pefttorch, name)
    numpy = {"i": np.int64(2), "f": np.float32(0.5), "list": list(np.arange(2))}
    config = cls(**plain, **{k: numpy[v] for k, v in kwargs.items()})
    for k, v in kwargs.items():
        value = getattr(config, k)
        assert all(type(x) is {"i": int, "f": float, "list": int}[v] for x in (value if isinstance(value, list)
                                                                                 else [value]))
    json.dumps(config.to_dict())
    for k, v in kwargs.items():  # a bool is still refused
        with pytest.raises(ValueError, match=k):
            cls(**plain, **{k: [True] if v == "list" else True})


@pytest.mark.parametrize("name", ["eval", "float", "training"])
def test_adapter_names_that_clash_with_module_dict_attributes_are_refused(name):
    base = fresh(FAMILIES["llama"])
    with pytest.raises(ValueError, match=f"adapter name '{name}' is taken by an attribute of torch's nn.ModuleDict"):
        get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"]), adapter_name=name)
    assert not any(isinstance(m, LoraLayer) for m in base.modules())


def _structure(model):
    """What injection may change: each module's type and adapters, and what requires grad."""
    modules = [(n, type(m).__name__, sorted(getattr(m, "lora_A", {})),
                sorted(getattr(m, "modules_to_save", None) or {}))  # (a PeftModel's is None without any)
               for n, m in model.named_modules()]
    return modules, {n: p.requires_grad for n, p in model.named_parameters()}


def _fail_at(monkeypatch, k):
    """Makes the k-th change injection makes (a layer's adapter added, a modules_to_save copy made) raise, as an out
    of memory error would."""
    from pefttorch.tuners.lora.layer import ModulesToSaveWrapper

    calls = []

    def failing(real):
        def call(self, *args, **kwargs):
            calls.append(None)
            if len(calls) == k + 1:
                raise torch.OutOfMemoryError("simulated")
            return real(self, *args, **kwargs)
        return call

    for cls, method in ((LoraLayer, "update_layer"), (ModulesToSaveWrapper, "add_adapter")):
        monkeypatch.setattr(cls, method, failing(getattr(cls, method)))
    return calls


@pytest.mark.parametrize("k", range(6))
def test_a_failed_add_adapter_leaves_the_model_as_it_was(monkeypatch, k):
    """An error halfway left the new adapter's layers and copies in the model although it was not in peft_config
    (and, from get_peft_model, LoRA layers in the user's model, which a second get_peft_model then refused)."""
    family = FAMILIES["llama"]
    model = get_peft_model(fresh(family), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                                     init_lora_weights=False))
    x = inputs_of(family)
    before, out = _structure(model), model(**x).logits
    calls = _fail_at(monkeypatch, k)
    # 4 layers (q_proj, v_proj of 2 decoder layers), then a copy of embed_tokens (new wrapper) and of lm_head
    with pytest.raises(torch.OutOfMemoryError):
        model.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                          modules_to_save=["lm_head", "embed_tokens"]))
    assert len(calls) == k + 1
    assert _structure(model) == before and list(model.peft_config) == ["default"]
    torch.testing.assert_close(model(**x).logits, out, rtol=0, atol=0)
    monkeypatch.undo()
    model.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))  # the name is free


def test_a_failed_load_adapter_or_density_loss_leaves_the_model_as_it_was(tmp_path):
    """load_adapter undid a file that did not fit by deleting the adapter, which left empty LoRA layers (other state
    dict keys), the classifier wrapped and an embedding the user had unfrozen frozen; add_adapter kept an adapter
    whose density loss was refused."""
    from safetensors.torch import load_file, save_file

    import pefttorch

    family = FAMILIES["bert"]
    src = get_peft_model(fresh(family), LoraConfig(r=2, target_modules=["value"], modules_to_save=["classifier"]))
    src.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    save_file({k: v for k, v in saved.items() if "layer.1." not in k}, tmp_path / "adapter_model.safetensors")
    model = get_peft_model(fresh(family), LoraConfig(r=2, target_modules=["query"],
                                                     density_loss=pefttorch.DensityLossConfig(weight=0.5)))
    embedding = model.get_base_model().bert.embeddings.word_embeddings.weight
    embedding.requires_grad_(True)
    before = _structure(model)
    with pytest.raises(ValueError, match="does not fit this model"):
        model.load_adapter(tmp_path, "b")
    assert _structure(model) == before and list(model.peft_config) == ["default"]
    with pytest.raises(ValueError, match="a density loss with another config is attached already"):
        model.add_adapter("c", LoraConfig(r=2, target_modules=["value"],
                                          density_loss=pefttorch.DensityLossConfig(weight=1.0)))
    assert _structure(model) == before and list(model.peft_config) == ["default"]


@pytest.mark.parametrize("method", ["lora", "ia3"])
@pytest.mark.parametrize("names", [["score|classifier"], ["classif.*"], ["pooler.dens"]])
def test_modules_to_save_that_wrap_nothing_are_refused(method, names):
    """An entry is a module's name or its last dotted parts, as the wrapping matches it: a regular expression passed
    the "matched nothing" check of LoRA once, wrapped nothing and left the head frozen."""
    import pefttorch

    config = (LoraConfig(r=2, target_modules=["query"], modules_to_save=names) if method == "lora"
              else pefttorch.IA3Config(target_modules=["value", "output.dense"], feedforward_modules=["output.dense"],
                                       modules_to_save=names))
    with pytest.raises(ValueError, match=r"matched no module of the model: each entry .* e\.g\. one of \['bert'"):
        get_peft_model(fresh(FAMILIES["bert"]), config)
    kept = get_peft_model(fresh(FAMILIES["bert"]), dataclasses.replace(config, modules_to_save=["classifier"]))
    assert any("classifier.modules_to_save" in n for n, p in kept.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("task, kind, head", [("TOKEN_CLS", "ForTokenClassification", "score"),
                                              ("QUESTION_ANS", "ForQuestionAnswering", "qa_outputs"),
                                              ("SEQ_CLS", "ForSequenceClassification", "score")])
def test_a_tasks_new_head_trains_and_is_saved_as_hf_peft_does(task, kind, head, tmp_path):
    """HF PEFT trains and saves the new head of TOKEN_CLS (classifier/score) and QUESTION_ANS (qa_outputs) models, and
    adds the task's heads to a modules_to_save the user gives: only SEQ_CLS without a list did here (the head stayed
    frozen, random and unsaved)."""
    import transformers

    def build():
        torch.manual_seed(0)
        config = transformers.Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
        return getattr(transformers, f"Qwen2{kind}")(config)

    # dotted: HF PEFT matches "norm" as any name ending so (input_layernorm too)
    for extra in (None, [f"{build().base_model_prefix}.norm"]):
        config = dict(r=2, target_modules=["q_proj"], task_type=task, modules_to_save=extra)
        ours = get_peft_model(build(), LoraConfig(**config))
        theirs = peft.get_peft_model(build(), peft.LoraConfig(**copy.deepcopy(config)))

        def trained(model):
            return sorted({n.split(".modules_to_save.")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters()
                           if p.requires_grad and ".modules_to_save." in n})

        assert trained(ours) == trained(theirs) == sorted({head, *(["norm"] if extra else [])})
        ours.save_pretrained(tmp_path / task)
        with safe_open(tmp_path / task / "adapter_model.safetensors", "pt") as f:
            assert any(f".{head}." in k for k in f.keys())


def test_all_linear_leaves_the_head_alone_when_another_adapter_is_on_it():
    """The output head is compared with the layer found: once a first adapter wrapped lm_head, a second all-linear
    adapter took it too (HF PEFT's does not), and its own saved adapter then failed to load."""
    model = get_peft_model(fresh(FAMILIES["llama"]), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    model.add_adapter("second", LoraConfig(r=2, target_modules="all-linear"))
    assert sorted(model.base_model.model.lm_head.lora_A) == ["default"]


def test_all_linear_warns_of_weights_it_leaves_alone():
    """A transformers-5 mixture of experts keeps its experts as 3-D parameters, which HF PEFT's all-linear adapts
    through target_parameters: left alone without a word, most of the model went without an adapter."""

    class MixtureExperts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.randn(4, 8, 6))

    class Embeddings(torch.nn.Module):  # ViT's class token and position embeddings are 3-D too
        def __init__(self):
            super().__init__()
            self.cls_token = torch.nn.Parameter(torch.randn(1, 1, 6))

    model = torch.nn.Sequential(torch.nn.Linear(6, 6), MixtureExperts(), torch.nn.Conv1d(2, 2, 3), Embeddings())
    with pytest.warns(UserWarning, match=r'"all-linear" adapts linear layers only; 1 weight\(s\) of other layers '
                                         r"are left alone \(1\.gate_up_proj: a mixture of experts"):
        get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the conv's 3-D weight and the class token are not experts
        get_peft_model(torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Conv1d(2, 2, 3), Embeddings()),
                       LoraConfig(r=2, target_modules="all-linear"))


def test_modules_to_save_match_as_in_hf_peft_and_only_task_heads_may_match_nothing(tmp_path):
    """HF PEFT 0.22 adds pre_classifier to a SEQ_CLS adapter's modules_to_save: its DistilBERT adapter holds it, which
    pefttorch once refused to load; a task's heads named otherwise (BART's classification_head) were refused
    (HF PEFT loads them, the head frozen: a warning now); and a typo beside a task head that matched passed."""
    import transformers

    def distilbert():
        torch.manual_seed(0)
        return transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
            vocab_size=96, dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_position_embeddings=64, num_labels=3))

    theirs = peft.get_peft_model(distilbert(), peft.LoraConfig(r=2, target_modules=["q_lin"], task_type="SEQ_CLS",
                                                                init_lora_weights=False))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.5)
    theirs.save_pretrained(tmp_path / "distilbert")
    batch = {"input_ids": torch.randint(1, 95, (2, 7))}
    ours = PeftModel.from_pretrained(distilbert(), tmp_path / "distilbert")
    torch.testing.assert_close(logits(ours, batch), logits(theirs, batch))
    trained = get_peft_model(distilbert(), LoraConfig(r=2, target_modules=["q_lin"], task_type="SEQ_CLS"))
    assert {n.split(".modules_to_save")[0].rsplit(".", 1)[-1] for n, p in trained.named_parameters()
            if p.requires_grad and ".modules_to_save." in n} == {"pre_classifier", "classifier"}

    bart = transformers.BartForSequenceClassification(transformers.BartConfig(
        vocab_size=96, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64))
    with pytest.warns(UserWarning, match=r"\['classifier', 'score', 'pre_classifier'\] \(the task's heads\) names no "
                                         r"module of "
                                         r"BartForSequenceClassification"):
        get_peft_model(bart, LoraConfig(r=2, target_modules=["q_proj"], task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match=r"\['pooler\.dens'\] matched no module"):
        get_peft_model(fresh(FAMILIES["bert"]), LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS",
                                                           modules_to_save=["pooler.dens"]))


@pytest.mark.parametrize("method", ["ia3", "bitfit"])
def test_a_module_to_save_inside_another_is_trained_with_it(method, tmp_path):
    """["pooler", "pooler.dense"]: the inner module was wrapped again inside the outer copy, never called, and its
    untrained copy was saved under the outer copy's key (the reload lost the training), as LoRA does not."""
    import pefttorch

    config = (pefttorch.IA3Config(target_modules=["value"], feedforward_modules=[], modules_to_save=["pooler",
                                                                                                    "pooler.dense"])
              if method == "ia3" else pefttorch.BitFitConfig(modules_to_save=["pooler", "dense"]))
    family = FAMILIES["bert"]
    model = get_peft_model(fresh(family), config)
    batch = inputs_of(family)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).zero_grad()
    model(**batch).logits.sum().backward()
    assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    wrappers = [n for n, m in model.named_modules() if type(m).__name__ == "ModulesToSaveWrapper"]
    assert "base_model.model.bert.pooler" in wrappers
    assert not [(a, b) for a in wrappers for b in wrappers if b.startswith(a + ".")]  # none inside another
    with torch.no_grad():
        model.base_model.model.bert.pooler.modules_to_save["default"].dense.weight.add_(1.0)
        want = logits(model, batch)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(logits(PeftModel.from_pretrained(fresh(family), tmp_path), batch), want)


def test_modules_to_save_naming_an_adapter_is_refused():
    """An adapter named like a module to save: LoRA's own factors (query.lora_A.classifier) were wrapped and trained
    in full as "modules to save" (HF PEFT refuses it); the model is left as it was."""
    family = FAMILIES["bert"]
    base = fresh(family)
    before = {n: p.clone() for n, p in base.state_dict().items()}
    with pytest.raises(ValueError, match=r"matches .*query\.lora_A\.classifier, part of a LoRA layer: an adapter's "
                                         r"name is also a name in modules_to_save"):
        get_peft_model(base, LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]),
                       adapter_name="classifier")
    assert {n: p for n, p in base.state_dict().items()}.keys() == before.keys()
    model = get_peft_model(fresh(family), LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(ValueError, match=r"lora_A\.default, part of a LoRA layer"):
        model.add_adapter("two", LoraConfig(r=2, target_modules=["query"], modules_to_save=["default"]))
    assert "two" not in model.peft_config


def test_a_failed_modules_to_save_copy_gives_the_head_back_trainable():
    """The wrapper freezes the original before copying it: a copy that failed left the user's head frozen."""
    import threading

    base = fresh(FAMILIES["bert"])
    base.classifier.lock = threading.Lock()  # deepcopy refuses it (as an out-of-memory error while copying would)
    with pytest.raises(TypeError, match="pickle"):
        get_peft_model(base, LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    assert all(p.requires_grad for p in base.parameters())
    assert not any(isinstance(m, LoraLayer) for m in base.modules())


@pytest.mark.parametrize("k", [0, 2])
def test_a_failed_get_peft_model_leaves_the_model_as_it_was(monkeypatch, k):
    family = FAMILIES["llama"]
    base = fresh(family)
    before = _structure(base)
    _fail_at(monkeypatch, k)
    with pytest.raises(torch.OutOfMemoryError):
        get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert _structure(base) == before
    monkeypatch.undo()
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"]))  # not refused as holding adapters already


def test_gaussian_initialisation_has_hf_pefts_spread():
    """init_lora_weights="gaussian": A ~ N(0, 1/r) as in HF PEFT, B zero (the output starts as the base's)."""
    r = 8
    model = get_peft_model(fresh(FAMILIES["llama"]), LoraConfig(r=r, target_modules=["q_proj", "v_proj", "down_proj"],
                                                               init_lora_weights="gaussian"))
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    a = torch.cat([m.lora_A["default"].weight.flatten() for m in layers])
    assert a.numel() > 2000 and abs(a.std().item() * r - 1.0) < 0.1 and abs(a.mean().item()) < 0.01
    assert all((m.lora_B["default"].weight == 0).all() for m in layers)


def test_meta_device_models_are_refused_not_silently_emptied(tmp_path):
    """Copying into a meta tensor does nothing: loading into a model built on the meta device once reported success
    and kept none of the saved values, and saving one failed deep inside safetensors."""
    family = FAMILIES["llama"]
    get_peft_model(fresh(family), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "a")
    with torch.device("meta"):
        meta = family.build()
    with pytest.raises(ValueError, match=r"adapter tensors are on the meta device .* materialize the model first"):
        PeftModel.from_pretrained(meta, tmp_path / "a")
    assert not any(isinstance(m, LoraLayer) for m in meta.modules())  # given back as it came
    with pytest.raises(ValueError, match=r"cannot save the adapter: .* on the meta device"):
        get_peft_model(meta, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "b")
    assert not (tmp_path / "b").exists()


def _snapshot(model):
    return ({n: type(m) for n, m in model.named_modules()}, {k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def test_load_errors_leave_the_model_unchanged(tmp_path):
    family = FAMILIES["llama"]
    model = fresh(family)
    before = _snapshot(model)

    with pytest.raises(FileNotFoundError, match="no such adapter directory"):
        PeftModel.from_pretrained(model, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        PeftModel.from_pretrained(model, tmp_path / "empty")

    # keys that do not fit: an adapter of another architecture
    get_peft_model(fresh(FAMILIES["gpt2"]), LoraConfig(target_modules=["c_attn"])).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="matched no linear layer"):
        PeftModel.from_pretrained(model, tmp_path / "gpt2")
    # same targets, other shapes
    import json

    get_peft_model(fresh(family), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "r4")
    cfg = json.loads((tmp_path / "r4" / "adapter_config.json").read_text())
    cfg["r"] = 8  # config and weights disagree
    (tmp_path / "r4" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="(?s)does not fit this model.*shape mismatches"):
        PeftModel.from_pretrained(model, tmp_path / "r4")
    # an adapter type pefttorch does not load
    cfg.update(r=4, peft_type="BOFT")
    (tmp_path / "r4" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="adapter type 'BOFT' is not supported.*IA3.*PROMPT_TUNING"):
        PeftModel.from_pretrained(model, tmp_path / "r4")
    cfg.update(peft_type="LORA", use_dora=True)
    (tmp_path / "r4" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="use_dora=True, which pefttorch does not support"):
        PeftModel.from_pretrained(model, tmp_path / "r4")
    cfg.update(use_dora=False, kasa_config={"svd_reg_weight": 1e-3})  # a LoRA variant with extra tensors
    (tmp_path / "r4" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="kasa_config=.*which pefttorch does not support"):
        PeftModel.from_pretrained(model, tmp_path / "r4")
    # initialisations after which HF PEFT's loading also changes the base weights (its PiSSA reload once came out
    # 1.6e-3 off HF PEFT's with no word): refused, pointing at HF PEFT's conversion to a plain LoRA
    del cfg["kasa_config"]
    for init in ("pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga"):
        cfg.update(init_lora_weights=init)
        (tmp_path / "r4" / "adapter_config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=f"init_lora_weights='{init}'.*path_initial_model_for_weight_conversion"):
            PeftModel.from_pretrained(model, tmp_path / "r4")

    after = _snapshot(model)
    assert before[0] == after[0] and before[2] == after[2]
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])


def test_saved_config_fields_pefttorch_does_not_know_are_warned_of(tmp_path):
    """A newer HF PEFT's field was dropped without a word; a field that changed the computation would have made the
    outputs differ silently. Initialisation-only fields (the weights are loaded) and bookkeeping say nothing."""
    import json

    import pefttorch

    family = FAMILIES["llama"]
    for config in (LoraConfig(r=4, target_modules=["q_proj"]), pefttorch.IA3Config()):
        directory = tmp_path / type(config).__name__
        get_peft_model(fresh(family), config).save_pretrained(directory)
        saved = json.loads((directory / "adapter_config.json").read_text())
        quiet = {**saved, "peft_version": "0.99.0", "auto_mapping": None}
        if isinstance(config, LoraConfig):
            quiet.update(init_lora_weights="eva", eva_config={"rho": 2.0}, velora_config=None)
        (directory / "adapter_config.json").write_text(json.dumps(quiet))
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            PeftModel.from_pretrained(fresh(family), directory)
        (directory / "adapter_config.json").write_text(json.dumps({**saved, "use_shiny_new_thing": True}))
        with pytest.warns(UserWarning, match=r"\['use_shiny_new_thing'\] that pefttorch does not know"):
            PeftModel.from_pretrained(fresh(family), directory)


def test_deepcopy_and_pickle(tmp_path):
    family = FAMILIES["llama"]
    inp = inputs_of(family)
    model = get_peft_model(fresh(family), LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    want = logits(model, inp)
    torch.testing.assert_close(logits(copy.deepcopy(model), inp), want)
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert type(loaded).__name__ == type(model).__name__
    torch.testing.assert_close(logits(loaded, inp), want)
    # A copy's state dict hooks pointed to a second copy, garbage at once: its load_state_dict failed ("hook of a
    # dead Module").
    for twin in (copy.deepcopy(model), loaded):
        other = get_peft_model(fresh(family, seed=1), LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
        twin.load_state_dict(other.state_dict())
        torch.testing.assert_close(logits(twin, inp), logits(other, inp))


def test_bias_all_is_a_tensor_named_bias_as_in_hf_peft(tmp_path):
    """Marian's (and BART's) `final_logits_bias` buffer ends in "bias" but is not named bias: pefttorch saved and
    trained it under bias="all", HF PEFT does neither, and HF PEFT's save then failed to load here."""
    family = FAMILIES["marian"]
    config = dict(r=2, target_modules=["q_proj"], bias="all", init_lora_weights=False)
    theirs = peft.get_peft_model(fresh(family), peft.LoraConfig(**config))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if n.endswith(".bias"):
                p.normal_()
    theirs.save_pretrained(tmp_path / "peft")
    ours = get_peft_model(fresh(family), LoraConfig(**config))
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {n for n, p in theirs.named_parameters() if p.requires_grad}
    ours.save_pretrained(tmp_path / "ours")
    from safetensors.torch import load_file

    assert load_file(tmp_path / "ours" / "adapter_model.safetensors").keys() == \
        load_file(tmp_path / "peft" / "adapter_model.safetensors").keys()
    inp = inputs_of(family)
    loaded = PeftModel.from_pretrained(fresh(family), tmp_path / "peft")
    torch.testing.assert_close(logits(loaded, inp), logits(theirs.eval(), inp))


def test_hf_peft_saves_with_the_embedding_layers_load(tmp_path):
    """HF PEFT saves a targeted lm_head's (or embed_tokens') own weight next to the adapter and loads it back
    (save_embedding_layers="auto", also after a vocabulary resize); pefttorch refused the file for that key."""
    family = FAMILIES["llama"]
    theirs = peft.get_peft_model(fresh(family), peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"],
                                                                init_lora_weights=False))
    with torch.no_grad():  # a fine-tuned head: the saved weight must reach the model, not just pass the check
        theirs.base_model.model.lm_head.base_layer.weight.mul_(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HF PEFT says it saves the embedding layers
        theirs.save_pretrained(tmp_path)
    inp = inputs_of(family)
    loaded = PeftModel.from_pretrained(fresh(family), tmp_path)
    torch.testing.assert_close(logits(loaded, inp), logits(theirs.eval(), inp))


def test_save_embedding_layers_writes_a_resized_vocabulary_as_hf_peft_does(tmp_path):
    """save_embedding_layers=True was accepted and ignored: an adapter trained with new tokens was saved without
    their embeddings, and reloaded into a freshly resized base (random new rows) it gave other outputs. Now the
    files hold what HF PEFT's hold, for True and for "auto" (which saves a targeted embedding layer's base weights),
    and load in both libraries to the saved model's outputs."""
    from hf_models import VOCAB, fresh

    def base():
        torch.manual_seed(0)
        model = fresh("llama")
        model.resize_token_embeddings(VOCAB + 10)  # new rows sampled: a fresh base differs from the trained one
        return model

    ids = torch.tensor([[1, VOCAB + 5, VOCAB + 7, 3]])
    for setting, targets in ((True, ["q_proj"]), ("auto", ["q_proj", "lm_head"]), ("auto", ["q_proj"])):
        keys, outputs = [], []
        for lib in (__import__("pefttorch"), peft):
            model = lib.get_peft_model(base(), lib.LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
            with torch.no_grad():
                torch.manual_seed(1)
                model.get_base_model().model.embed_tokens.weight[VOCAB:] = torch.randn(10, 32)
                model.get_base_model().lm_head.weight[VOCAB:] = torch.randn(10, 32)
                want = model.eval()(input_ids=ids).logits
            path = tmp_path / f"{lib.__name__}-{setting}-{len(targets)}"
            model.save_pretrained(path, save_embedding_layers=setting)
            with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
                keys.append(sorted(f.keys()))
            outputs.append((path, want))
        assert keys[0] == keys[1], setting
        # a targeted embedding layer's base weights alone, else (with True) both layers' (a resized vocabulary)
        assert ("base_model.model.lm_head.base_layer.weight" in keys[0]) == ("lm_head" in targets)
        saves_embeddings = setting is True
        assert ("base_model.model.model.embed_tokens.weight" in keys[0]) == saves_embeddings
        path, want = outputs[0]
        for loader in (PeftModel, peft.PeftModel):
            with torch.no_grad():
                got = loader.from_pretrained(base(), path).eval()(input_ids=ids).logits
            assert torch.equal(got, want) == saves_embeddings, (setting, loader)
    with pytest.raises(ValueError, match="save_embedding_layers is True, False or 'auto'"):
        get_peft_model(fresh("llama"), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
            tmp_path / "x", save_embedding_layers="yes")


def test_embedding_layers_saved_beside_modules_to_save_copies_load_both_ways(tmp_path):
    """modules_to_save on the embeddings with save_embedding_layers=True: HF PEFT's file (which also holds
    <path>.modules_to_save.weight and <path>.original_module.weight) was refused as not fitting, and pefttorch wrote
    the whole wrapper keyed with the adapter's name, which no other name (and not HF PEFT) could load."""
    import warnings

    family = FAMILIES["llama"]
    ids = inputs_of(family)["input_ids"]

    def trained(model):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
        return model

    config = {"r": 4, "target_modules": ["q_proj"], "modules_to_save": ["embed_tokens", "lm_head"]}
    hf = trained(peft.get_peft_model(fresh(family), peft.LoraConfig(**config)))
    hf.save_pretrained(tmp_path / "hf", save_embedding_layers=True)
    ours = trained(get_peft_model(fresh(family), LoraConfig(**config), adapter_name="mine"))
    ours.save_pretrained(tmp_path / "ours", save_embedding_layers=True)
    for path, model in ((tmp_path / "hf", hf), (tmp_path / "ours" / "mine", ours)):
        want = logits(model, {"input_ids": ids})
        for loader in (PeftModel, peft.PeftModel):
            with warnings.catch_warnings():
                if loader is PeftModel:  # (an HF PEFT save's fields are all known; HF PEFT warns of its own keys)
                    warnings.simplefilter("error", UserWarning)
                loaded = loader.from_pretrained(fresh(family), path)
            torch.testing.assert_close(logits(loaded, {"input_ids": ids}), want, rtol=0, atol=0)


def test_an_hf_adapter_with_ensure_weight_tying_is_refused_by_name(tmp_path):
    """HF PEFT's ensure_weight_tying=True ties a trained embedding copy to lm_head; its save holds an lm_head that
    was loaded into the (tied) base embedding here in silence, so disable_adapter() and unload() no longer gave the
    base model, and a re-save dropped the setting."""
    family = FAMILIES["llama"]
    base = fresh(family)
    base.config.tie_word_embeddings = True
    base.tie_weights()
    peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                              ensure_weight_tying=True)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="this LoRA adapter uses ensure_weight_tying=True, which pefttorch does not"):
        PeftModel.from_pretrained(fresh(family), tmp_path)


def test_a_corrupt_adapter_file_is_named(tmp_path):
    """A config that is not JSON or not an object, and a truncated weights file, raised JSONDecodeError,
    AttributeError ('list' object has no attribute 'get') and SafetensorError, none naming the file."""
    from hf_models import fresh

    get_peft_model(fresh("llama"), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    weights = (tmp_path / "adapter_model.safetensors").read_bytes()
    for name, data, message in (("adapter_config.json", b"{oops", "not a JSON adapter config"),
                                ("adapter_config.json", b"[]", "an adapter config is a JSON object, got a list"),
                                ("adapter_model.safetensors", weights[:40], "not a readable safetensors file")):
        broken = tmp_path / f"broken-{len(data)}"
        broken.mkdir()
        for saved in tmp_path.iterdir():
            if saved.is_file():
                (broken / saved.name).write_bytes(saved.read_bytes())
        (broken / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"{name}: {message}"):
            PeftModel.from_pretrained(fresh("llama"), broken)


@pytest.mark.parametrize("method", ["lora", "ia3", "adalora"])
def test_merging_into_a_computed_weight_is_refused(method):
    """A base layer whose weight a parametrization computes (weight_norm here): merging wrote the update into a fresh
    tensor, lost, while the adapter counted as merged and was skipped: the merged model was the base model. The
    refusal changes nothing: merge_and_unload had detached the density loss (and AdaLoRA's orthogonality term)
    before it, and training went on with another loss."""
    from torch.nn.utils.parametrizations import weight_norm

    from pefttorch import AdaLoraConfig, DensityLossConfig, IA3Config

    family = FAMILIES["llama"]
    base = fresh(family)
    weight_norm(base.model.layers[0].self_attn.q_proj, "weight")
    config = {"lora": LoraConfig(r=2, target_modules=["q_proj"], density_loss=DensityLossConfig()),
              "ia3": IA3Config(target_modules=["q_proj"], feedforward_modules=[]),
              "adalora": AdaLoraConfig(init_r=4, target_r=2, total_step=100, target_modules=["q_proj"])}[method]
    model = get_peft_model(base, config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)  # an adapter that changes the output
    inp = inputs_of(family)
    before = logits(model, inp)
    model.train()
    loss = model(**inp, labels=inp["input_ids"]).loss.detach()
    for call in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(RuntimeError, match=r"merging: the weight of .*q_proj.* is not a parameter of it: a "
                                               r"parametrization \(_WeightNorm\)"):
            call()
        torch.testing.assert_close(logits(model, inp), before, rtol=0, atol=0)  # nothing merged, still adapted
        model.train()
        torch.testing.assert_close(model(**inp, labels=inp["input_ids"]).loss.detach(), loss, rtol=0, atol=0)


def two_adapter_models(family):
    """HF PEFT's and pefttorch's model with adapters "default" (with a trained lm_head copy) and "b", same weights."""
    models = []
    for lib in (peft, None):
        make = LoraConfig if lib is None else peft.LoraConfig
        model = (get_peft_model if lib is None else peft.get_peft_model)(
            fresh(family), make(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False))
        model.add_adapter("b", make(r=2, target_modules=["v_proj"], init_lora_weights=False))
        models.append(model)
    models[1].load_state_dict(models[0].state_dict(), strict=False)
    return models


def test_mixed_batch_adapter_names_is_refused():
    """adapter_names= (HF PEFT's per-row adapters) went into the wrapped model's **kwargs and was dropped: every row
    ran the active adapter, in silence."""
    family = FAMILIES["llama"]
    _, model = two_adapter_models(family)
    inp = inputs_of(family)
    rows = inp["input_ids"].shape[0]
    for call in (model, model.forward, model.generate):
        with pytest.raises(ValueError, match=r"adapter_names= .* is not supported by pefttorch"):
            call(**inp, adapter_names=["b"] * rows)
    torch.testing.assert_close(model(**inp, adapter_names=None).logits, model(**inp).logits)


def test_hf_peft_methods_that_pefttorch_has_behave_as_hf_peft():
    """Each went on to the wrapped transformers model: "'LlamaForCausalLM' object has no attribute ...", or its own
    methods of the name (disable_adapters: "No adapter loaded")."""
    family = FAMILIES["llama"]
    theirs, ours = two_adapter_models(family)
    inp = inputs_of(family)
    for model in (theirs, ours):
        model.disable_adapter_layers()
    torch.testing.assert_close(logits(ours, inp), logits(theirs, inp))
    torch.testing.assert_close(logits(ours, inp), logits(fresh(family), inp))
    for model in (theirs, ours):
        model.enable_adapter_layers()
    torch.testing.assert_close(logits(ours, inp), logits(theirs, inp))
    assert ours.active_peft_config is ours.peft_config["default"]
    assert ours.modules_to_save == theirs.modules_to_save == {"lm_head"}
    assert ours.base_model_torch_dtype == theirs.base_model_torch_dtype == torch.float32

    def trainable(model):
        return sorted(n for n, p in model.named_parameters() if p.requires_grad)

    for names, flag in ((["b"], True), ("default", False), (["b", "default"], True)):
        for model in (theirs, ours):
            model.set_requires_grad(names, requires_grad=flag)
        assert trainable(ours) == trainable(theirs), (names, flag)
    with pytest.raises(ValueError, match="unknown adapter"):
        ours.set_requires_grad("nope")
    for name in ("disable_adapters", "add_weighted_adapter", "get_model_status"):
        with pytest.raises(AttributeError, match=rf"pefttorch's PeftModel has no {name} \(HF PEFT's\)"):
            getattr(ours, name)


def test_save_pretrained_takes_hf_peft_arguments(tmp_path):
    """save_pretrained(d, True) failed ("'bool' object is not iterable": the second slot was selected_adapters, HF
    PEFT's is safe_serialization); selected_adapters=[] wrote every adapter; a PiSSA conversion path was ignored."""
    _, model = two_adapter_models(FAMILIES["llama"])
    model.save_pretrained(tmp_path / "positional", True, ["b"])
    assert sorted(p.name for p in (tmp_path / "positional").iterdir()) == ["b"]
    with pytest.raises(TypeError, match=r"safe_serialization \(the second argument, as in HF PEFT\) is True or False, "
                                        r"got \['b'\]; pass the adapters as selected_adapters="):
        model.save_pretrained(tmp_path / "old_order", ["b"])  # pefttorch's order before: it saved every adapter
    model.save_pretrained(tmp_path / "none", selected_adapters=[])
    assert not (tmp_path / "none").exists() or not any((tmp_path / "none").iterdir())
    with pytest.raises(ValueError, match="path_initial_model_for_weight_conversion=.... converts PiSSA/OLoRA"):
        model.save_pretrained(tmp_path / "pissa", path_initial_model_for_weight_conversion=str(tmp_path))
    model.save_pretrained(tmp_path / "all")
    for check in ("warn", "error", "ignore"):  # HF PEFT 0.22's; pefttorch refuses keys that do not fit, always
        PeftModel.from_pretrained(fresh(FAMILIES["llama"]), tmp_path / "all", strict_adapter_check=check)
        model.load_adapter(tmp_path / "all" / "b", f"b_{check}", strict_adapter_check=check)
    with pytest.raises(ValueError, match="strict_adapter_check must be one of"):
        model.load_adapter(tmp_path / "all" / "b", "c", strict_adapter_check="strict")
    model.merge_adapter()
    model.unmerge_adapter(force_reshard=False)


def test_push_to_hub_uploads_the_adapter(tmp_path, monkeypatch):
    """It reached the wrapped transformers model's push_to_hub, which uploaded the whole model (LoRA-renamed keys)."""
    import types

    import huggingface_hub

    _, model = two_adapter_models(FAMILIES["llama"])
    uploaded = {}

    def upload_folder(*, repo_id, folder_path, **kwargs):
        uploaded.update(repo=repo_id, files=sorted(str(p.relative_to(folder_path))
                                                   for p in Path(folder_path).rglob("*") if p.is_file()),
                        description=kwargs.get("commit_description"))
        return "https://hub/commit"

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: types.SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    assert model.push_to_hub("me/adapter", selected_adapters=["default"], commit_description="why") \
        == "https://hub/commit"
    assert uploaded == {"repo": "me/adapter", "files": ["adapter_config.json", "adapter_model.safetensors"],
                        "description": "why"}
    with pytest.raises(ValueError, match=r"push_to_hub\(tags=...\): pefttorch writes no model card"):
        model.push_to_hub("me/adapter", tags=["t"])  # (they went into save_pretrained's **kwargs, unused)


class _Heads(torch.nn.Module):
    """Heads whose names end with another's: cls_classifier, distillation_classifier (DeiT with a teacher) and
    pre_classifier (DistilBERT) beside classifier; `again` is `shared` registered a second time."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(8, 8)
        self.shared = torch.nn.Linear(8, 8)
        self.again = self.shared
        self.pre_classifier = torch.nn.Linear(8, 8)
        self.classifier = torch.nn.Linear(8, 3)
        self.cls_classifier = torch.nn.Linear(8, 3)
        self.distillation_classifier = torch.nn.Linear(8, 3)

    def forward(self, x):
        h = self.again(torch.relu(self.shared(self.body(x))))
        h = torch.relu(self.pre_classifier(h))
        return self.classifier(h) + self.cls_classifier(h) + self.distillation_classifier(h)


def _heads():
    torch.manual_seed(0)
    return _Heads().eval()


def _wrapped(model):
    return sorted(n.split(".modules_to_save.")[0].removeprefix("base_model.model.") for n, p in
                  model.named_parameters() if p.requires_grad and n.endswith(".modules_to_save.default.bias"))


@pytest.mark.parametrize("method", ["lora", "ia3"])
@pytest.mark.parametrize("names", [["classifier"], ["again"], ["shared", "again"]])
def test_modules_to_save_wrap_what_hf_peft_wraps_and_its_adapters_load(method, names, tmp_path):
    """HF PEFT's rule is the name or its end after a dot, over every name of every module: a bare suffix took
    cls_classifier, distillation_classifier and pre_classifier for "classifier" (trained and saved beside what HF PEFT
    trains, its adapters refused as missing them), and the second name of a module registered twice matched nothing
    (HF PEFT wraps it there, and its adapters were refused: "matched no module")."""
    import pefttorch

    def config(lib):
        if method == "lora":
            return lib.LoraConfig(r=2, target_modules=["body"], modules_to_save=names, init_lora_weights=False)
        return lib.IA3Config(target_modules=["body"], feedforward_modules=[], modules_to_save=names,
                             init_ia3_weights=False)

    x = torch.randn(3, 8)
    theirs = peft.get_peft_model(_heads(), config(peft))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if ".modules_to_save." in n:
                p.add_(0.5)
    ours = get_peft_model(_heads(), config(pefttorch))
    assert _wrapped(ours) == _wrapped(theirs) == sorted(names)
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = PeftModel.from_pretrained(_heads(), tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), theirs(x))
    loaded.save_pretrained(tmp_path / "ours")
    keys = []
    for d in ("theirs", "ours"):
        with safe_open(tmp_path / d / "adapter_model.safetensors", "pt") as f:
            keys.append(sorted(f.keys()))
    assert keys[0] == keys[1]
    with torch.no_grad():
        torch.testing.assert_close(loaded.unload()(x), _heads()(x))  # the original back under each name


@pytest.mark.parametrize("container", ["ModuleDict", "ModuleList"])
@pytest.mark.parametrize("method", ["lora", "ia3", "bitfit"])
def test_modules_to_save_refuse_containers_as_hf_peft(container, method):
    """A ModuleDict or ModuleList is indexed or iterated by the model, never called: wrapped, the model's forward
    failed ("'ModulesToSaveWrapper' object is not subscriptable"); HF PEFT refuses it at get_peft_model, and so does
    every tuner that wraps modules_to_save here, the model left as it came."""
    import pefttorch

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(8, 8)
            heads = [torch.nn.Linear(8, 2), torch.nn.Linear(8, 3)]
            self.heads = (torch.nn.ModuleDict({"a": heads[0], "b": heads[1]}) if container == "ModuleDict"
                          else torch.nn.ModuleList(heads))

        def forward(self, x):
            return self.heads["a" if container == "ModuleDict" else 0](self.body(x))

    def config(lib):
        if method == "lora":
            return lib.LoraConfig(r=2, target_modules=["body"], modules_to_save=["heads"])
        if method == "ia3":
            return lib.IA3Config(target_modules=["body"], feedforward_modules=[], modules_to_save=["heads"])
        return lib.BitFitConfig(target_modules=["body"], modules_to_save=["heads"])

    if method != "bitfit":  # (HF PEFT has no BitFit)
        with pytest.raises(TypeError, match=f"cannot be applied to modules of type .*{container}"):
            peft.get_peft_model(Model(), config(peft))
    base = Model()
    with pytest.raises(TypeError, match=rf"modules_to_save cannot be applied to modules of type {container} \(heads"):
        get_peft_model(base, config(pefttorch))
    assert type(base.heads).__name__ == container and all(p.requires_grad for p in base.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in base.modules())
    model = get_peft_model(Model(), dataclasses.replace(config(pefttorch), modules_to_save=["heads.0" if container ==
                                                                                             "ModuleList" else "a"]))
    model(torch.randn(2, 8)).sum().backward()  # the heads inside it are wrapped, as named


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt"])
def test_an_offloaded_model_is_refused(method):
    """🤗 Accelerate's offloaded weights sit on the meta device, loaded per call: adapters were created there too and
    never loaded, so the outputs were uninitialised memory (changing from call to call, NaN with disk offload)."""
    accelerate = pytest.importorskip("accelerate")
    from pefttorch import IA3Config, PromptTuningConfig

    model = fresh(FAMILIES["llama"])
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    config = {"lora": LoraConfig(r=4, target_modules=["q_proj"]),
              "ia3": IA3Config(target_modules=["q_proj"], feedforward_modules=[]),
              "prompt": PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM")}[method]
    with pytest.raises(ValueError, match="offloaded by 🤗 Accelerate .* where an adapter cannot be created"):
        get_peft_model(model, config)
    # offloading after the adapter is in works (LoRA: its layers are called, and the hook loads their weights)
    model = get_peft_model(fresh(FAMILIES["llama"]), LoraConfig(r=4, target_modules=["q_proj"]))
    inp = inputs_of(FAMILIES["llama"])
    want = logits(model, inp)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    torch.testing.assert_close(logits(model, inp), want)
    with pytest.raises(ValueError, match="offloaded by 🤗 Accelerate"):  # ... but no new adapter goes onto it
        model.add_adapter("b", LoraConfig(r=4, target_modules=["k_proj"]))
    assert "b" not in model.peft_config


@pytest.mark.parametrize("method", ["lora", "ia3", "adalora"])
def test_an_offloaded_model_refuses_merges_and_ranked_layers_say_why_they_fail(method):
    """Offloaded after get_peft_model: a merge wrote into the meta placeholders and the merged model computed the
    base model in silence; AdaLoRA/IncreLoRA factors are never loaded by the hooks, and the op failed naming neither
    the cause nor a way out."""
    accelerate = pytest.importorskip("accelerate")
    from pefttorch import AdaLoraConfig, IA3Config

    config = {"lora": LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False),
              "ia3": IA3Config(target_modules=["q_proj"], feedforward_modules=[], init_ia3_weights=False),
              "adalora": AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj"])}[method]
    model = get_peft_model(fresh(FAMILIES["llama"]), config)
    inp = inputs_of(FAMILIES["llama"])
    want = logits(model, inp)
    accelerate.cpu_offload(model.get_base_model(), execution_device=torch.device("cpu"))
    if method == "adalora":
        with pytest.raises(RuntimeError, match="the adapter's factors are on the meta device: the model is offloaded "
                                               "by 🤗 Accelerate"):
            logits(model, inp)
    else:
        torch.testing.assert_close(logits(model, inp), want)
    for merge in (model.merge_adapter, model.merge_and_unload, model.base_model.merge_adapter):
        with pytest.raises(ValueError, match="offloaded by 🤗 Accelerate .* where a merge cannot happen"):
            merge()
    if method != "adalora":
        torch.testing.assert_close(logits(model, inp), want)
    # merged first, as the message advises, then offloaded: unmerging or disabling (which unmerges) is refused too
    # (both wrote into the placeholders: the adapter stayed in, or was applied twice)
    model = get_peft_model(fresh(FAMILIES["llama"]), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_E" in name:
                p.fill_(1.0)  # (AdaLoRA starts at zero: a merge would change nothing to see)
    with model.disable_adapter():
        base_logits = logits(model, inp)
    model.merge_adapter()
    want = logits(model, inp)
    accelerate.cpu_offload(model.get_base_model(), execution_device=torch.device("cpu"))
    unmerges = [model.unmerge_adapter, model.base_model.unmerge_adapter, model.disable_adapter().__enter__,
                model.disable_adapter_layers, model.unload]
    if method != "ia3":  # (LoRA's layers unmerge in forward once disabled, or for set_adapter)
        unmerges += [lambda: model.base_model.set_adapters_disabled(True), lambda: model.set_adapter("default")]
    for unmerge in unmerges:
        with pytest.raises(ValueError, match="offloaded by 🤗 Accelerate .* cannot happen"):
            unmerge()
    torch.testing.assert_close(logits(model, inp), want)
    assert not torch.allclose(want, base_logits, atol=1e-4)
    # merged before offloading, as advised, it merges and unloads (nothing left to write)
    torch.testing.assert_close(logits(model.merge_and_unload(), inp), want)


def test_offload_refusals_go_by_the_modules_written(tmp_path):
    """Merged and disabled before offloading, the LoRA layers unmerged lazily in their forward into the placeholders
    (the output stayed adapted, then the adapter applied twice); refusals went by the whole model, so offloading the
    embeddings alone refused LayerNorm tuning's disable and LoRA's merge; safe_merge of a model merged before
    offloading failed on meta weights."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.utils import offload_state_dict

    from pefttorch import LNTuningConfig

    family = FAMILIES["llama"]
    inp = inputs_of(family)
    model = get_peft_model(fresh(family), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.merge_adapter()
    model.disable_adapter_layers()
    accelerate.cpu_offload(model.get_base_model(), execution_device=torch.device("cpu"))
    with pytest.raises(ValueError, match="offloaded by 🤗 Accelerate .* where an unmerge cannot happen"):
        logits(model, inp)
    model = get_peft_model(fresh(family), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    want = logits(model, inp)
    model.merge_adapter()
    accelerate.cpu_offload(model.get_base_model(), execution_device=torch.device("cpu"))
    torch.testing.assert_close(logits(model.merge_and_unload(safe_merge=True), inp), want)
    for i, config in enumerate((LNTuningConfig(), LoraConfig(r=4, target_modules=["q_proj"],
                                                                init_lora_weights=False))):
        base = fresh(family)
        base_logits = logits(base, inp)
        model = get_peft_model(base, config)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.3)
        want = logits(model, inp)
        tmp_folder = tmp_path / str(i)
        offload_state_dict(tmp_folder, {"model.embed_tokens.weight": base.model.embed_tokens.weight.detach()})
        accelerate.dispatch_model(base, device_map={"model.embed_tokens": "disk", "model.layers": "cpu",
                                                    "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"},
                                  main_device="cpu", offload_dir=tmp_folder)
        with model.disable_adapter():
            torch.testing.assert_close(logits(model, inp), base_logits, rtol=1e-5, atol=1e-5)
        model.merge_adapter()  # the adapted modules are in memory: written as usual
        torch.testing.assert_close(logits(model, inp), want, rtol=1e-4, atol=1e-4)
    # preload_module_classes hooks the decoder layers and nothing below them: the modules written have no hook of
    # their own, but their weights are placeholders on the meta device (a merge or a disable went through, wrong, in
    # silence; LayerNorm tuning's targets inside the layers alone, as model.norm has a hook of its own)
    for config in (LNTuningConfig(target_modules=["input_layernorm", "post_attention_layernorm"]),
                   LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)):
        model = get_peft_model(fresh(family), config)
        layer_class = type(model.get_base_model().model.layers[0]).__name__
        accelerate.cpu_offload(model.get_base_model(), execution_device=torch.device("cpu"),
                               preload_module_classes=[layer_class])
        write = model.disable_adapter().__enter__ if isinstance(config, LNTuningConfig) else model.merge_adapter
        with pytest.raises(ValueError, match=r"offloaded by 🤗 Accelerate \(at model.layers.0.* on the meta device\)"):
            write()
    # a model on the meta device alone (built there, no hooks) is no concern of these checks, as in HF PEFT
    for config in (LNTuningConfig(), LoraConfig(r=4, target_modules=["q_proj"])):
        with torch.device("meta"):
            model = get_peft_model(family.build(), config)
        with model.disable_adapter():
            pass
        model.merge_and_unload()


def test_an_offloaded_bitfit_model_refuses_to_swap_its_parameters():
    """BitFit and LayerNorm tuning disable and unload by putting the original parameters back in the modules; an
    offload hook loads its own copy of the tuned ones for each call, so the "base model" was the tuned one."""
    accelerate = pytest.importorskip("accelerate")
    from pefttorch import BitFitConfig

    model = get_peft_model(fresh(FAMILIES["gpt2"]), BitFitConfig())
    with torch.no_grad():
        for p in model.base_model.adapter_parameters():
            p.add_(0.5)
    inp = inputs_of(FAMILIES["gpt2"])
    want = logits(model, inp)
    accelerate.cpu_offload(model.get_base_model(), execution_device=torch.device("cpu"))
    for swap in (model.disable_adapter().__enter__, model.unload, model.merge_and_unload):
        with pytest.raises(ValueError, match="offloaded by 🤗 Accelerate .* cannot happen"):
            swap()
    torch.testing.assert_close(logits(model, inp), want)


def test_a_pruned_ranked_module_on_an_offloaded_model_says_why_it_fails():
    """A module pruned to rank 0 joins its factors to the output by an empty sum: on the meta placeholders that
    failed with torch's device error before the offload check was reached."""
    accelerate = pytest.importorskip("accelerate")
    from pefttorch import AdaLoraConfig

    model = get_peft_model(fresh(FAMILIES["llama"]), AdaLoraConfig(init_r=4, target_r=2, total_step=10,
                                                                    target_modules=["q_proj"])).train()
    for layer in (m for m in model.modules() if hasattr(m, "lora_components")):
        layer.lora_components["default"].rank = 0
    accelerate.cpu_offload(model.get_base_model(), execution_device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match="the adapter's factors are on the meta device"):
        model(**inputs_of(FAMILIES["llama"]))


def test_a_shape_only_meta_forward_measures_no_density():
    """A dry run on meta tensors added meta densities to the running sums: every later sum was meta, and
    densities() failed on .item() for good."""
    import pefttorch

    family = FAMILIES["llama"]
    model = get_peft_model(fresh(family), LoraConfig(r=2, target_modules=["q_proj"],
                                                     density_loss=pefttorch.DensityLossConfig(weight=1.0))).train()
    meta = copy.deepcopy(model).to("meta")
    ids = inputs_of(family)["input_ids"]
    meta(input_ids=ids.to("meta"), labels=ids.to("meta"))
    assert meta.density_loss.densities() == {}
    meta.to_empty(device="cpu").load_state_dict(model.state_dict())
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, b in meta.named_buffers():  # (the rotary frequencies are not in the state dict)
            b.copy_(buffers[name])
    meta(input_ids=ids, labels=ids).loss.backward()
    model(input_ids=ids, labels=ids).loss.backward()
    assert meta.density_loss.densities() == model.density_loss.densities() != {}


def test_a_model_with_an_hf_peft_adapter_is_refused_with_the_way_out():
    """A named target was refused as "(Linear)" (HF PEFT's layer's class name) and "all-linear" put LoRA on HF PEFT's
    base layers and its own lora_A/lora_B (LoRA on LoRA), in silence."""
    from pefttorch import IA3Config

    model = fresh(FAMILIES["llama"])
    model.add_adapter(peft.LoraConfig(r=4, target_modules=["q_proj"]))  # transformers' PeftAdapterMixin
    for config in (LoraConfig(r=4, target_modules=["q_proj"]), LoraConfig(r=4, target_modules="all-linear"),
                   IA3Config(target_modules=["q_proj"], feedforward_modules=[])):
        with pytest.raises(ValueError, match=r"the model carries an HF PEFT adapter \(at .*q_proj.*\).*"
                                             r"pefttorch\.accelerate\(model\)"):
            get_peft_model(model, config)


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_an_adapter_on_multihead_attentions_out_proj_is_warned_of(method):
    """nn.MultiheadAttention reads its out_proj's weight instead of calling it: an adapter there has no effect (as in
    HF PEFT) and its factors got no gradient, in silence. A warning (refusing it refused SigLIP-like models)."""
    from pefttorch import IA3Config

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = torch.nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(self.attn(x, x, x)[0])

    config = (LoraConfig(r=2, target_modules="all-linear") if method == "lora"
              else IA3Config(target_modules=["out_proj", "fc"], feedforward_modules=[]))
    with pytest.warns(UserWarning, match=r"on \['attn\.out_proj'\]: nn\.MultiheadAttention reads its out_proj's "
                                         r"weight instead of calling the layer"):
        model = get_peft_model(Model(), config)
    model(torch.randn(2, 3, 8)).sum().backward()  # it still runs (and fc's adapter trains)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_peft_model(Model(), dataclasses.replace(config, exclude_modules=["attn.out_proj"]))


def test_an_adapter_saved_from_a_compiled_base_loads_into_a_plain_one_and_back(tmp_path):
    """torch.compile(model) before get_peft_model: the saved keys held the wrapper's `_orig_mod.`, which HF PEFT
    does not load (it kept its own init) and pefttorch refused on a plain base; a plain save was refused on a compiled
    base. The keys are written without it, and read either way, embedding tensors too."""
    from safetensors.torch import load_file

    llama = FAMILIES["llama"]
    config = LoraConfig(r=2, target_modules=["q_proj"])
    compiled = get_peft_model(torch.compile(fresh(llama), backend="eager"), config)
    with torch.no_grad():
        for n, p in compiled.named_parameters():
            if "lora_B" in n:
                p.normal_()  # trained: not what any init gives
    batch = inputs_of(llama)
    want = logits(compiled, batch)
    compiled.save_pretrained(tmp_path / "compiled", save_embedding_layers=True)
    assert not any("_orig_mod" in k for k in load_file(tmp_path / "compiled" / "adapter_model.safetensors"))
    plain = PeftModel.from_pretrained(fresh(llama), tmp_path / "compiled")
    plain.save_pretrained(tmp_path / "plain", save_embedding_layers=True)
    again = PeftModel.from_pretrained(torch.compile(fresh(llama), backend="eager"), tmp_path / "plain")
    hf = peft.PeftModel.from_pretrained(fresh(llama), tmp_path / "compiled")
    for model in (plain, again, hf):
        torch.testing.assert_close(logits(model, batch), want, rtol=0, atol=0)
    # a file written with the wrapper's segments (earlier pefttorch) still loads
    old = {k.replace("base_model.model.", "base_model.model._orig_mod.", 1): v
           for k, v in load_file(tmp_path / "plain" / "adapter_model.safetensors").items()}
    from safetensors.torch import save_file

    save_file(old, tmp_path / "plain" / "adapter_model.safetensors")
    torch.testing.assert_close(logits(PeftModel.from_pretrained(fresh(llama), tmp_path / "plain"), batch), want,
                               rtol=0, atol=0)


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt"])
def test_a_task_type_set_after_the_config_was_made_trains_and_saves_the_head(tmp_path, method):
    """HF PEFT derives the new head from task_type when the model is built; pefttorch only when the config was
    made, so `config.task_type = "SEQ_CLS"` afterwards left the classifier frozen and unsaved, and the save (whose
    config says SEQ_CLS) did not load. HF PEFT's fields given to the config are kept."""
    import pefttorch

    bert = FAMILIES["bert"]
    config = {"lora": LoraConfig(r=2, target_modules=["query"], loftq_config={"loftq_bits": 4}),
              "ia3": pefttorch.IA3Config(), "prompt": pefttorch.PromptTuningConfig(num_virtual_tokens=2)}[method]
    config.task_type = "SEQ_CLS"
    model = get_peft_model(fresh(bert), config)
    assert any(p.requires_grad for n, p in model.named_parameters() if "classifier" in n)
    if method == "lora":
        assert model.peft_config["default"].loftq_config == {"loftq_bits": 4}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "classifier" in n and p.requires_grad:
                p.add_(0.1)
    batch = inputs_of(bert)
    want = logits(model, batch)
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(fresh(bert), tmp_path), batch), want, rtol=0, atol=0)


def test_load_adapter_of_another_method_is_refused_as_add_adapter_is(tmp_path):
    """An (IA)^3 folder loaded into a LoRA model failed with "'IA3Config' object has no attribute 'bias'"."""
    import pefttorch

    llama = FAMILIES["llama"]
    get_peft_model(fresh(llama), pefttorch.IA3Config()).save_pretrained(tmp_path)
    model = get_peft_model(fresh(llama), LoraConfig(r=2, target_modules=["q_proj"]))
    batch = inputs_of(llama)
    want = logits(model, batch)
    with pytest.raises(TypeError, match="load_adapter: this model's adapters are LoraModel's; an adapter of "
                                        "IA3Config cannot join"):
        model.load_adapter(tmp_path, adapter_name="ia3")
    assert list(model.peft_config) == ["default"]
    torch.testing.assert_close(logits(model, batch), want, rtol=0, atol=0)


def test_a_whole_models_state_dict_as_the_adapter_file_is_named_as_such(tmp_path):
    """torch.save(model.state_dict()) as adapter_model.bin: the error listed the factors as missing (they are there,
    under the adapter's name) and the base weights as unexpected, without saying what the file is."""
    llama = FAMILIES["llama"]
    model = get_peft_model(fresh(llama), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"of the file's tensors are the base model's own: it looks like a whole "
                                         r"model's state dict"):
        PeftModel.from_pretrained(fresh(llama), tmp_path)
