"""ScaLearn through get_peft_model: the mix of frozen source adapters against the sources run by hand, one source at
scale 1 against the source adapter model itself, only the scales training, the variants, save/load without the
source folders, and errors."""

from __future__ import annotations

import copy
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F
from hf_models import fresh, inputs, logits

from pefttorch import AdapterConfig, LoraConfig, PeftModel, ScaLearnConfig, get_peft_model


def source(tmp_path, name, family="bert", seed=0, **kw):
    """A bottleneck adapter with random (trained-looking) weights, saved to tmp_path/name."""
    model = get_peft_model(fresh(family), AdapterConfig(bottleneck=kw.pop("bottleneck", 4), **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.base_model.adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(tmp_path / name)
    return model, tmp_path / name


def by_hand(base, pm, batch):
    """The base model with a forward hook at each site computing h + sum_i omega_i * delta_i(h) in plain PyTorch."""
    base = copy.deepcopy(base)
    modules = dict(base.named_modules())

    def delta(adapter, h):
        a = F.linear(h, adapter.down.weight, adapter.down.bias)
        a = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[adapter.activation](a)
        return adapter.scale * F.linear(a, adapter.up.weight, adapter.up.bias)

    for site in pm.sites:
        omega = pm.omega["shared" if pm.method_config.shared else site.key].detach()

        def hook(module, args, out, site=site, omega=omega):
            return out + sum(omega[i] * delta(s[site.key], out) for i, s in enumerate(pm.sources))

        modules[site.output].register_forward_hook(hook)
    return logits(base, batch)


@pytest.mark.parametrize(("shape", "shared"), [("vector", False), ("scalar", False), ("vector", True),
                                               ("scalar", True)])
def test_mix_equals_the_sources_by_hand(tmp_path, shape, shared):
    _, a = source(tmp_path, "a", seed=1)
    _, b = source(tmp_path, "b", seed=2, activation="gelu", scaling=0.5, bottleneck=3)
    base = fresh("bert")
    model = get_peft_model(copy.deepcopy(base), ScaLearnConfig(source_adapters=[a, b], omega_shape=shape,
                                                               shared=shared))
    pm = model.base_model
    with torch.no_grad():  # scales away from their start, different per source and feature
        for p in pm.omega.values():
            p.copy_(torch.randn(p.shape) * 0.7)
    assert len(pm.omega) == (1 if shared else len(pm.sites))
    assert all(p.shape == (2, 32 if shape == "vector" else 1) for p in pm.omega.values())
    batch = inputs("bert")
    torch.testing.assert_close(logits(model, batch), by_hand(base, pm, batch), rtol=1e-5, atol=1e-5)


def test_one_source_at_scale_one_is_that_adapter(tmp_path):
    adapter_model, a = source(tmp_path, "a", family="llama", style="parallel")
    model = get_peft_model(fresh("llama"), ScaLearnConfig(source_adapters=[a], omega_shape="scalar"))
    with torch.no_grad():
        for p in model.base_model.omega.values():
            p.fill_(1.0)
    batch = inputs("llama")
    torch.testing.assert_close(logits(model, batch), logits(adapter_model, batch), rtol=1e-5, atol=1e-5)


def test_scales_start_at_the_average_and_only_they_train(tmp_path):
    paths = [source(tmp_path, n, seed=i)[1] for i, n in enumerate("abc")]
    model = get_peft_model(fresh("bert"), ScaLearnConfig(source_adapters=paths))
    pm = model.base_model
    start = torch.cat([p.detach().flatten() for p in pm.omega.values()])
    # the noise of 0.001: there, and small
    assert abs(start.mean().item() - 1 / 3) < 1e-3 and 1e-4 < start.std().item() < 0.003
    model.train()
    model(**inputs("bert")).loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {f"base_model.omega.{s.key}" for s in pm.sites}
    assert all(p.grad.abs().sum() > 0 for p in pm.omega.values())
    assert model.get_nb_trainable_parameters()[0] == 3 * 32 * len(pm.sites)


def test_save_and_load_without_the_source_folders(tmp_path):
    _, a = source(tmp_path, "a", seed=1)
    _, b = source(tmp_path, "b", seed=2)
    model = get_peft_model(fresh("bert"), ScaLearnConfig(source_adapters=[a, b], modules_to_save=["classifier"]))
    with torch.no_grad():
        for p in model.base_model.omega.values():
            p.add_(torch.randn(p.shape))
        model.base_model.model.classifier.modules_to_save["default"].bias.add_(1.0)
    batch = inputs("bert")
    want = logits(model, batch)
    model.save_pretrained(tmp_path / "mix")
    shutil.rmtree(a)
    shutil.rmtree(b)
    loaded = PeftModel.from_pretrained(fresh("bert"), tmp_path / "mix")
    torch.testing.assert_close(logits(loaded, batch), want, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_one_config_for_two_models(tmp_path):
    # a sweep reuses the config: each model reads the source folders (the config is not turned into a saved mix's)
    _, a = source(tmp_path, "a", seed=1)
    config = ScaLearnConfig(source_adapters=[a])
    first, second = (get_peft_model(fresh("bert"), config) for _ in range(2))
    want = first.base_model.sources.state_dict()
    got = second.base_model.sources.state_dict()
    assert any(v.abs().max() > 0 for k, v in want.items() if ".up." in k)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)
    assert config.source_configs is None
    # the model's own copy carries the sources' configs, so its save loads without the folders
    assert second.peft_config["default"].source_configs is not None
    # ... and given to get_peft_model again, it reads the folders too (its sources came up untrained: the base model)
    third = get_peft_model(fresh("bert"), second.peft_config["default"])
    for key, value in want.items():
        torch.testing.assert_close(third.base_model.sources.state_dict()[key], value, rtol=0, atol=0, msg=key)
    second.save_pretrained(tmp_path / "mix")
    shutil.rmtree(a)
    batch = inputs("bert")
    torch.testing.assert_close(logits(PeftModel.from_pretrained(fresh("bert"), tmp_path / "mix"), batch),
                               logits(second, batch), rtol=0, atol=0)


def test_errors(tmp_path):
    _, a = source(tmp_path, "a")
    _, p = source(tmp_path, "p", style="pfeiffer")
    with pytest.raises(ValueError, match="source_adapters is empty"):
        ScaLearnConfig()
    with pytest.raises(ValueError, match="omega_shape must be one of"):
        ScaLearnConfig(source_adapters=[a], omega_shape="matrix")
    for kw, match in [(dict(source_adapters=None), "source_adapters must be a folder or a list of folders"),
                      (dict(source_adapters=[a, 3]), "source_adapters must be"),
                      (dict(source_adapters=[a], shared="no"), "shared must be True or False"),
                      (dict(source_adapters=[a], inference_mode=1), "inference_mode must be True or False"),
                      (dict(source_adapters=[a], omega_init_scale=float("nan")), "omega_init_scale must be a finite"),
                      (dict(source_adapters=[a], omega_init_scale=float("inf")), "omega_init_scale must be a finite"),
                      (dict(source_adapters=[a], omega_init_scale="0.5"), "omega_init_scale must be a number"),
                      (dict(source_configs={"a": 1}), "source_configs must be None or a list")]:
        with pytest.raises(ValueError, match=match):
            ScaLearnConfig(**kw)
    with pytest.raises(ValueError, match="other places than source 0"):
        get_peft_model(fresh("bert"), ScaLearnConfig(source_adapters=[a, p]))
    # a difference the style and layers do not show is named (the two sides once read the same)
    _, a2 = source(tmp_path, "a2", after_ffn=False)
    with pytest.raises(ValueError, match=r"source 1 \(.*after_ffn=False.*\) .* source 0 \(.*after_ffn=True"):
        get_peft_model(fresh("bert"), ScaLearnConfig(source_adapters=[a, a2]))
    with pytest.raises(FileNotFoundError, match="not a saved adapter"):
        get_peft_model(fresh("bert"), ScaLearnConfig(source_adapters=[tmp_path]))
    lora = get_peft_model(fresh("bert"), LoraConfig(target_modules=["query"]))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="ScaLearn mixes bottleneck adapters"):
        get_peft_model(fresh("bert"), ScaLearnConfig(source_adapters=[tmp_path / "lora"]))
    model = get_peft_model(fresh("bert"), ScaLearnConfig(source_adapters=[a]))
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    assert not any(m._forward_hooks for m in model.unload().modules())


def test_modules_to_save_holding_a_site_is_refused(tmp_path):
    """The wrapper ran a trained deep copy of the module, with copies of the sources and scales in its hooks: the real
    scales there never ran nor trained, yet were saved, and all scales at 0 was not the base model."""
    _, a = source(tmp_path, "a")
    with pytest.raises(ValueError, match=r"ScaLearn: modules_to_save \['layer.1'\] holds the sources' adapter sites"):
        get_peft_model(fresh("bert"), ScaLearnConfig(source_adapters=[a], modules_to_save=["layer.1"]))
    get_peft_model(fresh("bert"), ScaLearnConfig(source_adapters=[a], modules_to_save=["pooler"]))


@pytest.mark.parametrize("autocast", [True, False])
def test_autocast_adapter_dtype(tmp_path, autocast):
    """autocast_adapter_dtype=False was ignored: float32 sources and scales in a bfloat16 model, unlike
    AdapterConfig's."""
    _, a = source(tmp_path, "a")
    model = get_peft_model(fresh("bert").to(torch.bfloat16), ScaLearnConfig(source_adapters=[a]),
                           autocast_adapter_dtype=autocast)
    want = torch.float32 if autocast else torch.bfloat16
    assert {p.dtype for p in model.base_model.sources.parameters()} == {want}
    assert {p.dtype for p in model.base_model.omega.parameters()} == {want}


def test_a_source_s_other_tensors_are_named_as_unused(tmp_path):
    """ScaLearn mixes the sources' adapters only: a source's trained head (modules_to_save) was dropped in silence,
    so the model with the source at scale 1 differed from the source's; it is said, and the adapters still load."""
    model, a = source(tmp_path, "a", modules_to_save=["classifier"])
    with pytest.warns(UserWarning, match=r"only its adapters are mixed; its file also holds \['.*classifier.*'\]"):
        mixed = get_peft_model(fresh("bert"), ScaLearnConfig(source_adapters=[a]))
    for name, p in mixed.base_model.sources[0].state_dict().items():
        torch.testing.assert_close(p, model.base_model.adapters.state_dict()[name], rtol=0, atol=0)
    with warnings.catch_warnings():  # the advice followed: the head is this model's own to train, nothing to say
        warnings.simplefilter("error")
        get_peft_model(fresh("bert"), ScaLearnConfig(source_adapters=[a], modules_to_save=["classifier"]))
