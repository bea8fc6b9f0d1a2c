"""Every config as an object and as a file: the checks all configs share (task type, flags, numbers), and the
to_dict/from_dict round trip of each."""

from __future__ import annotations

import json

import pytest

import pefttorch

# the configs and the fields each needs to be built
CONFIGS = {
    "LoraConfig": {}, "IncreLoraConfig": {}, "AdaLoraConfig": {"total_step": 10}, "IA3Config": {},
    "SsfConfig": {}, "BitFitConfig": {}, "LNTuningConfig": {}, "AdapterConfig": {},
    "ScaLearnConfig": {"source_adapters": ["somewhere"]}, "PromptTuningConfig": {"num_virtual_tokens": 2},
    "DeptConfig": {"num_virtual_tokens": 2}, "PrefixTuningConfig": {"num_virtual_tokens": 2}, "MeftConfig": {},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_task_type_must_be_hf_peft_s(name):
    """Only LoraConfig checked it: "seq_cls" added no new head (it stayed frozen and unsaved), "BOGUS" passed."""
    cls = getattr(pefttorch, name)
    for task_type in ("seq_cls", "BOGUS"):
        with pytest.raises(ValueError, match=rf"{name}: task_type must be one of .*SEQ_CLS.* got '{task_type}'"):
            cls(task_type=task_type, **CONFIGS[name])
    assert cls(task_type="SEQ_CLS", **CONFIGS[name]).modules_to_save[:2] == ["classifier", "score"]


@pytest.mark.parametrize("name, field", [
    ("LoraConfig", "use_rslora"), ("LoraConfig", "fan_in_fan_out"), ("LoraConfig", "inference_mode"),
    ("IA3Config", "init_ia3_weights"), ("SsfConfig", "init_ssf_weights"),
    ("PrefixTuningConfig", "prefix_projection"), ("MeftConfig", "debug_reconstruction"),
    ("IncreLoraConfig", "advance_learning"),
])
def test_a_flag_given_as_a_string_is_refused(name, field):
    """"false" was stored and read as true: use_rslora="false" turned rsLoRA on."""
    with pytest.raises(ValueError, match=rf"{name}: {field} must be True or False, got 'false'"):
        getattr(pefttorch, name)(**{field: "false"}, **CONFIGS[name])


@pytest.mark.parametrize("name, field, value", [
    ("IncreLoraConfig", "beta1", "0.85"), ("AdaLoraConfig", "orth_reg_weight", None),
    ("MeftConfig", "adapter_dropout", None), ("MeftConfig", "adapter_dropout", "0.1"),
])
def test_a_number_given_as_something_else_is_refused_in_words(name, field, value):
    """Each failed in a comparison naming nothing: "'<' not supported between instances of 'float' and 'str'"."""
    with pytest.raises(ValueError, match=rf"{name}: {field} must be a number"):
        getattr(pefttorch, name)(**{field: value}, **CONFIGS[name])


@pytest.mark.parametrize("name, kwargs", [
    ("IA3Config", {"target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"],
                   "layers_to_transform": [1]}),
    ("LNTuningConfig", {"target_modules": ["input_layernorm"], "layers_to_transform": [1]}),
    ("IncreLoraConfig", {"target_rank": 4, "init_rank": 2, "target_modules": ["q_proj"]}),
    ("AdaLoraConfig", {"target_r": 2, "init_r": 4, "total_step": 10}),
    ("MeftConfig", {"variant": "meft3", "bottleneck": 32}),
])
def test_to_dict_and_back_is_the_same_config(name, kwargs, tmp_path):
    """IA3's and LN tuning's to_dict dropped layers_to_transform (read back, every layer was adapted); IncreLoRA's
    and AdaLoRA's from_dict refused their own peft_type."""
    cls = getattr(pefttorch, name)
    config = cls(**kwargs)
    assert cls.from_dict(config.to_dict()) == config
    config.save(tmp_path)
    assert cls.from_pretrained(tmp_path) == config if hasattr(cls, "from_pretrained") else True


def test_hf_peft_adalora_config_reads():
    peft = pytest.importorskip("peft")
    data = peft.AdaLoraConfig(target_r=2, init_r=4, total_step=10, target_modules=["q_proj"]).to_dict()
    data["peft_type"] = "ADALORA"
    config = pefttorch.AdaLoraConfig.from_dict(data)
    assert (config.target_r, config.init_r, config.total_step) == (2, 4, 10)


def test_meft_config_warns_of_an_unknown_field():
    """It was dropped without a word (every other config warns): a misspelt bottleneck silently became 8."""
    with pytest.warns(UserWarning, match=r"MeftConfig: the saved config has field\(s\) \['bottlenek'\]"):
        pefttorch.MeftConfig.from_dict({"peft_type": "MEFT", "variant": "meft3", "bottlenek": 32})


def test_hf_peft_fields_read_back_as_given_or_at_hf_peft_defaults():
    """LoraConfig accepts HF PEFT's fields it lacks at their defaults (use_dora=False); code written for HF PEFT
    reads them back (`if config.use_dora:`), which raised AttributeError."""
    peft = pytest.importorskip("peft")
    config = pefttorch.LoraConfig(use_dora=False, loftq_config={"loftq_bits": 4})
    hf = peft.LoraConfig()
    assert config.use_dora is False and config.loftq_config == {"loftq_bits": 4}
    for name in ("lora_bias", "target_parameters", "layer_replication", "trainable_token_indices", "eva_config",
                 "megatron_core", "qalora_group_size", "ensure_weight_tying"):
        assert getattr(pefttorch.LoraConfig(), name) == getattr(hf, name), name
    assert pefttorch.LoraConfig().runtime_config.ephemeral_gpu_offload is False  # HF PEFT's LoRA code reads it
    fresh = pefttorch.LoraConfig()
    fresh.loftq_config["loftq_bits"] = 4  # a mutable default of its own, kept: not shared with other configs
    assert fresh.loftq_config == {"loftq_bits": 4} and pefttorch.LoraConfig().loftq_config == {}
    assert pefttorch.AdaLoraConfig(total_step=10).use_dora is False  # the subclasses read them too
    with pytest.raises(AttributeError, match="no attribute 'no_such_field'"):
        config.no_such_field  # noqa: B018 - the attribute access is the test
    assert "use_dora" not in config.to_dict()  # nothing new in the saved file


def test_patterns_given_as_none_are_empty():
    """HF PEFT takes rank_pattern=None and alpha_pattern=None for none; pefttorch refused them at construction."""
    config = pefttorch.LoraConfig(rank_pattern=None, alpha_pattern=None)
    assert config.rank_pattern == {} and config.alpha_pattern == {}
    assert pefttorch.AdaLoraConfig(total_step=10, rank_pattern=None).rank_pattern == {}
    assert pefttorch.LoraConfig.from_dict({"r": 4, "rank_pattern": None}).rank_pattern == {}


@pytest.mark.parametrize("name", ["LoraConfig", "IA3Config", "PromptTuningConfig", "AdapterConfig"])
def test_modules_to_save_given_as_a_set_is_saved(name, tmp_path):
    """HF PEFT takes a set of names; kept as given, it failed in json.dumps when the adapter was saved, after the
    training (a task head added to it turned it into a list, hiding the bug for classifiers)."""
    config = getattr(pefttorch, name)(modules_to_save={"lm_head", "embed_tokens"}, task_type="CAUSAL_LM")
    assert config.modules_to_save == ["embed_tokens", "lm_head"]
    config.save(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert type(config).from_dict(saved).modules_to_save == ["embed_tokens", "lm_head"]


def test_replace_derives_incre_lora_s_defaults_again():
    """incre_rank_num and new_rank_warmup left None are derived from target_rank and incre_interval; replace() passed
    the old derived values back in, so a sweep built with base.replace(target_rank=r) grew by the base's rank step."""
    base = pefttorch.IncreLoraConfig(target_rank=8, incre_interval=100)
    assert base.replace(target_rank=16, incre_interval=10) == pefttorch.IncreLoraConfig(target_rank=16,
                                                                                       incre_interval=10)
    given = pefttorch.IncreLoraConfig(target_rank=8, incre_rank_num=3, new_rank_warmup=7)
    assert (given.replace(target_rank=16).incre_rank_num, given.replace(incre_interval=2).new_rank_warmup) == (3, 7)
