"""Prefix tuning through get_peft_model: against the base model run on a real token prefix (whose keys and values
are the learned ones), against HF PEFT's own forward, generation with and without the cache, the folded
reparameterisation, training only the prefix, save/load both ways, budgets and errors."""

from __future__ import annotations

import copy
import inspect
import json
import re

import pytest
import torch
from helpers import run_in_threads
from hf_models import check_generate_with_and_without_cache, fresh, inputs, loss

from pefttorch import PeftModel, PrefixTuningConfig, config_for_budget, get_peft_model
from pefttorch.tuners._cache import cache_key

N = 3
TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM", "marian": "SEQ_2_SEQ_LM"}


def prefixed(family, n=N, **kw):
    base = fresh(family)
    return base, get_peft_model(copy.deepcopy(base), PrefixTuningConfig(num_virtual_tokens=n, **kw))


def cache_as_prefix(cache, n: int) -> torch.Tensor:
    """A model's cache of n tokens as a flat prefix, (n, layers * 2 * heads * head width), written here by hand
    in HF PEFT's layout: per token, layer by layer, its keys then its values, head by head."""
    rows = []
    for layer in range(len(cache.layers)):
        key, value = cache.layers[layer].keys[0], cache.layers[layer].values[0]  # (heads, n, head width)
        rows += [key.permute(1, 0, 2).reshape(n, -1), value.permute(1, 0, 2).reshape(n, -1)]
    return torch.cat(rows, dim=1)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_prefix_of_real_keys_equals_the_base_model_on_those_tokens(family):
    """Keys and values a causal model computes for tokens P, used as the prefix, must give what the model gives
    for P followed by the input, at the input's positions (the positions after a prefix count from its end)."""
    base, model = prefixed(family)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, 90, (1, N), generator=g)
    ids = torch.randint(3, 90, (2, 6), generator=g)
    with torch.no_grad():
        out = base(input_ids=prompt, use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values  # transformers 5.24 renamed it
        model.base_model.prefix_embeddings.copy_(cache_as_prefix(cache, N))
        want = base(input_ids=torch.cat([prompt.expand(2, -1), ids], dim=1)).logits[:, N:]
        ours = model(input_ids=ids).logits
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
        # an attention mask and explicit positions of the input alone are made to cover the prefix
        ours = model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(6)[None]).logits
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)


def test_bert_attends_to_the_prefix_with_the_padding_mask_grown():
    base, model = prefixed("bert")
    batch = inputs("bert")
    batch["attention_mask"][1, -2:] = 0  # padding in the second row
    pm = model.base_model
    from transformers import DynamicCache

    cache = DynamicCache()  # the prefix by hand: layer i's keys are rows 2i, its values 2i+1
    rows = pm.prefix_embeddings.detach().view(N, 2 * pm.layers, pm.heads, pm.head_dim).permute(1, 2, 0, 3)
    for i in range(pm.layers):
        cache.update(rows[2 * i].expand(2, -1, -1, -1), rows[2 * i + 1].expand(2, -1, -1, -1), i)
    mask = torch.cat([torch.ones(2, N, dtype=batch["attention_mask"].dtype), batch["attention_mask"]], dim=1)
    with torch.no_grad():
        key = cache_key({}, inspect.signature(type(base.bert).forward).parameters)
        want = base(input_ids=batch["input_ids"], attention_mask=mask, labels=batch["labels"], **{key: cache})
        ours = model(**batch)
        plain = base(**batch)
    torch.testing.assert_close(ours.logits, want.logits, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours.logits, plain.logits, atol=1e-3)  # the prefix is really there


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5", "marian"])
def test_equals_hf_peft_forward_on_the_same_prefix(family):
    peft = pytest.importorskip("peft")
    base, model = prefixed(family)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(task_type=TASKS[family],
                                                                              num_virtual_tokens=N))
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(model.base_model.prefix_embeddings)
    batch = inputs(family)
    with torch.no_grad():
        ours, want = model(**batch), theirs(**batch)
    torch.testing.assert_close(ours.logits, want.logits, rtol=0, atol=0)
    if want.loss is not None:
        torch.testing.assert_close(ours.loss, want.loss, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5", "marian"])
def test_generate_with_the_cache_equals_without(family):
    check_generate_with_and_without_cache(prefixed(family)[1], family)


@pytest.mark.parametrize(("family", "projection"), [("llama", False), ("t5", False), ("bert", True),
                                                    ("gpt2", True)])
def test_only_the_prefix_trains(family, projection):
    _, model = prefixed(family, prefix_projection=projection, encoder_hidden_size=16)
    model.train()
    batch = inputs(family)
    if family in ("llama", "gpt2"):
        batch["labels"] = batch["input_ids"]
    model(**batch).loss.backward()
    trained = sorted(n for n, p in model.named_parameters() if p.grad is not None)
    pm = model.base_model
    width = 2 * pm.layers * pm.heads * pm.head_dim
    if projection:
        assert trained == ["base_model.prefix_mlp.0.bias", "base_model.prefix_mlp.0.weight",
                           "base_model.prefix_mlp.2.bias", "base_model.prefix_mlp.2.weight", "base_model.prefix_tokens"]
        count = N * pm.heads * pm.head_dim + sum(p.numel() for p in pm.prefix_mlp.parameters())
    else:
        assert trained == ["base_model.prefix_embeddings"]
        count = N * width
    assert all(p.grad.abs().sum() > 0 for p in model.parameters() if p.grad is not None)
    assert model.get_nb_trainable_parameters()[0] == count


def test_an_encoder_decoder_prefix_uses_hf_pefts_rows():
    """HF PEFT's seq2seq layout: the decoder's layer i reads rows 4i and 4i+1 of the prefix repeated twice; the
    other rows get no gradient (they are saved, and HF PEFT reads them the same way)."""
    _, model = prefixed("t5")
    model.train()
    model(**inputs("t5")).loss.backward()
    pm = model.base_model
    grad = pm.prefix_embeddings.grad.view(N, 2 * pm.layers, -1).abs().sum(dim=(0, 2))
    used = {(4 * i + j) % (2 * pm.layers) for i in range(pm.layers) for j in (0, 1)}
    assert {r for r in range(2 * pm.layers) if grad[r] > 0} == used


# a module trained in full in the encoder, where an encoder-decoder model has one: its gradient comes through the
# decoder's cross-attention
SAVED = {"llama": None, "t5": ["encoder.final_layer_norm"], "marian": ["model.encoder.layers.1.final_layer_norm"]}


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("family", list(SAVED))
def test_gradient_checkpointing_gives_the_gradients_of_plain_training(family, reentrant):
    """On T5 and Marian, the cross-attention's cache once kept the first forward's keys and values of the encoder
    output and the recomputation read them back: under reentrant checkpointing the encoder got no gradient through
    them (silently), under the non-reentrant one torch failed on a different count of saved tensors."""
    _, model = prefixed(family, modules_to_save=SAVED[family])
    batch = inputs(family)
    model.train()
    loss(model(**batch)).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert len(want) > (family != "llama") and all(g.abs().sum() > 0 for g in want.values())
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    loss(model(**batch)).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, want[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_on_a_model_that_hands_its_layers_no_cache_says_so(reentrant):
    """GPT-2 hands its blocks no cache under gradient checkpointing: the attention failed on the mask's size."""
    _, model = prefixed("gpt2")
    ids = inputs("gpt2")["input_ids"]
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    with pytest.raises(RuntimeError, match="GPT2LMHeadModel hands its layers no key/value cache under gradient "
                                           "checkpointing"):
        model(input_ids=ids, labels=ids)
    model.gradient_checkpointing_disable()
    model(input_ids=ids, labels=ids).loss.backward()  # the failed call left nothing behind


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_with_the_projection_mlp(reentrant):
    """Non-reentrant checkpointing trains the MLP as without checkpointing. Reentrant checkpointing, where each
    layer runs its own backward through the MLP that all layers' keys come from, failed in the second layer's
    backward with autograd's "backward through the graph a second time": now a clear error before the forward."""
    _, model = prefixed("llama", prefix_projection=True, encoder_hidden_size=8)
    ids = inputs("llama")["input_ids"]
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    want = [p.grad.clone() for p in model.base_model.adapter_parameters()]
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        with pytest.raises(RuntimeError, match="reentrant gradient checkpointing: use .*use_reentrant': False"):
            model(input_ids=ids, labels=ids)
        return
    model(input_ids=ids, labels=ids).loss.backward()
    for p, g in zip(model.base_model.adapter_parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


def test_fold_prefix_keeps_the_output_and_drops_the_mlp(tmp_path):
    _, model = prefixed("llama", prefix_projection=True, encoder_hidden_size=8)
    batch = inputs("llama")
    with torch.no_grad():
        before = model(**batch).logits
    saved = tmp_path / "unfolded"
    model.save_pretrained(saved)  # writes the prefix the MLP computes
    pm = model.base_model
    trainable_before = model.get_nb_trainable_parameters()[0]
    pm.fold_prefix()
    assert not hasattr(pm, "prefix_mlp") and pm.prefix_embeddings.requires_grad
    assert model.peft_config["default"].prefix_projection is False
    assert model.get_nb_trainable_parameters()[0] == N * 2 * pm.layers * pm.heads * pm.head_dim < trainable_before
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before, rtol=1e-6, atol=1e-6)
    loaded = PeftModel.from_pretrained(fresh("llama"), saved)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, before, rtol=1e-6, atol=1e-6)
    # the training config handed back in: the file holds the prefix, not the MLP (a fresh MLP computed a prefix
    # the saved one was copied into and lost; the model ran on a random prefix)
    config = PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=True, encoder_hidden_size=8)
    for trainable in (False, True):
        loaded = PeftModel.from_pretrained(fresh("llama"), saved, config=config, is_trainable=trainable)
        assert loaded.base_model.prefix_embeddings.requires_grad is trainable
        assert config.prefix_projection  # the user's config is left as it was
        with torch.no_grad():
            torch.testing.assert_close(loaded(**batch).logits, before, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "bert", "t5", "marian"])
def test_save_and_load_round_trip(family, tmp_path):
    _, model = prefixed(family)
    batch = inputs(family)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(fresh(family), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    trainable = PeftModel.from_pretrained(fresh(family), tmp_path, is_trainable=True)
    assert trainable.base_model.prefix_embeddings.requires_grad


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_the_whole_model_pickles(family, tmp_path):
    """torch.save of the model failed: the cache classes it held are made by functions, which pickle cannot name."""
    _, model = prefixed(family)
    batch = inputs(family)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    check_generate_with_and_without_cache(loaded, family)  # the hooks build their caches again


def test_bfloat16_model_keeps_a_float32_prefix():
    base = fresh("llama").to(torch.bfloat16)
    model = get_peft_model(base, PrefixTuningConfig(num_virtual_tokens=N))
    assert model.base_model.prefix_embeddings.dtype == torch.float32
    ids = inputs("llama")["input_ids"]
    model.train()
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.base_model.prefix_embeddings.grad.dtype == torch.float32


def test_the_prefix_follows_the_model_dtype_after_to():
    """The prefix was cast to the dtype the model had at get_peft_model: after .to(torch.bfloat16) attention met
    float32 keys and failed; after .float() a model built in bfloat16 went on rounding its prefix to bfloat16."""
    ids = inputs("llama")["input_ids"]
    built_fp32 = get_peft_model(fresh("llama"), PrefixTuningConfig(num_virtual_tokens=N))
    with torch.no_grad():
        want = built_fp32(input_ids=ids).logits
        halved = copy.deepcopy(built_fp32).to(torch.bfloat16)(input_ids=ids).logits
    assert halved.dtype == torch.bfloat16
    torch.testing.assert_close(halved.float(), want, rtol=0.05, atol=0.05)

    built_bf16 = get_peft_model(fresh("llama").to(torch.bfloat16), PrefixTuningConfig(num_virtual_tokens=N)).float()
    same = get_peft_model(fresh("llama").to(torch.bfloat16).float(), PrefixTuningConfig(num_virtual_tokens=N))
    with torch.no_grad():
        same.base_model.prefix_embeddings.copy_(torch.randn_like(same.base_model.prefix_embeddings))
        built_bf16.base_model.prefix_embeddings.copy_(same.base_model.prefix_embeddings)
        torch.testing.assert_close(built_bf16(input_ids=ids).logits, same(input_ids=ids).logits, rtol=0, atol=0)


# ---------------------------------------------------------------- HF PEFT both ways

@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])
def test_hf_peft_loads_ours(family, tmp_path):
    peft = pytest.importorskip("peft")
    base, model = prefixed(family, prefix_projection=True, encoder_hidden_size=8)  # saved folded
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == TASKS[family]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    batch = inputs(family)
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch).logits, model(**batch).logits, rtol=1e-6, atol=1e-6)
    # (generate is not compared: with peft 0.21.2 and transformers 5.25, HF PEFT's own prefix generate scores its
    # first token 0.4-0.5 away from its forward's logits, where ours agree to 1e-7; test_generate_... covers ours)


@pytest.mark.parametrize(("family", "projection"), [("llama", False), ("llama", True), ("t5", True),
                                                    ("marian", False)])
def test_we_load_hf_peft_prefixes(family, projection, tmp_path):
    peft = pytest.importorskip("peft")
    base = fresh(family)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(
        task_type=TASKS[family], num_virtual_tokens=4, prefix_projection=projection, encoder_hidden_size=8))
    theirs.save_pretrained(tmp_path)  # HF PEFT saves the prefix its MLP computes
    ours = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert ours.peft_config["default"].prefix_projection is False
    batch = inputs(family)
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- budgets and errors

def test_budget_chooses_the_number_of_virtual_tokens():
    model = fresh("llama")
    total = sum(p.numel() for p in model.parameters())
    config = config_for_budget(model, "prefix", 0.05, verbose=False)
    per_token = 2 * 2 * 2 * 8  # layers x (key, value) x key/value heads x head width

    def count(n):
        return n * per_token

    target = 0.05 * total
    assert abs(count(config.num_virtual_tokens) - target) <= per_token / 2
    got = get_peft_model(model, config).get_nb_trainable_parameters()[0]
    assert got == count(config.num_virtual_tokens)
    target = 0.02 * total  # with the MLP (a fixed 404 - 16 parameters here) 5% is out of reach
    projected = config_for_budget(fresh("llama"), "prefix", 0.02, verbose=False, prefix_projection=True,
                                  encoder_hidden_size=4)
    got = get_peft_model(fresh("llama"), projected).get_nb_trainable_parameters()[0]
    neighbours = [get_peft_model(fresh("llama"), projected.replace(num_virtual_tokens=projected.num_virtual_tokens + d))
                  .get_nb_trainable_parameters()[0] for d in (-1, 1)]
    assert all(abs(got - target) <= abs(other - target) for other in neighbours)
    with pytest.raises(ValueError, match="cannot reach"):
        config_for_budget(fresh("llama"), "prefix", 0.9, verbose=False)


@pytest.mark.parametrize(("kw", "match"), [
    ({"num_virtual_tokens": 0}, "positive integer"),
    ({"init_weights": "ones"}, "None or 'zero'"),
    ({"token_dim": 10, "num_attention_heads": 4}, "not a multiple"),
    ({"prefix_projections": True}, "did you mean 'prefix_projection'"),
])
def test_config_errors(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        PrefixTuningConfig(**kw)


def test_model_errors_leave_the_model_as_it_was():
    base = fresh("llama")
    state = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=r"num_layers=5 \(the model has 2\)"):
        get_peft_model(base, PrefixTuningConfig(num_layers=5))
    with pytest.raises(ValueError, match=r"token_dim=32 \(the model has 16\)"):  # 2 key/value heads x 8
        get_peft_model(base, PrefixTuningConfig(token_dim=32))
    assert not base._forward_pre_hooks and all(torch.equal(v, state[k]) for k, v in base.state_dict().items())
    model = get_peft_model(base, PrefixTuningConfig())
    with pytest.raises(ValueError, match="one adapter set"):
        model.add_adapter("other", PrefixTuningConfig())
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    unloaded = model.unload()
    assert not unloaded._forward_pre_hooks


@pytest.mark.parametrize("cls", ["T5EncoderModel", "T5ForTokenClassification", "T5ForQuestionAnswering",
                                 "LongT5EncoderModel"])
def test_t5_models_that_hand_their_layers_no_cache_are_refused(cls):
    """T5's encoder stack reads no cache and its QA model gives its decoder cache=None: the prefix reached no layer,
    and the call failed inside T5 (on the grown padding mask, or with "multiple values for keyword argument")."""
    import transformers

    config = (transformers.LongT5Config if cls.startswith("LongT5") else transformers.T5Config)(
        d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=100, decoder_start_token_id=0,
        pad_token_id=0, num_labels=3)  # (LongT5 by its model type: the refusal is not by class name alone)
    base = getattr(transformers, cls)(config)
    with pytest.raises(ValueError, match=f"prefix tuning cannot adapt {cls}: its attention layers are handed no "
                                         "key/value cache"):
        get_peft_model(base, PrefixTuningConfig(num_virtual_tokens=3))
    assert not base._forward_pre_hooks


def test_zero_init_and_disable():
    base, model = prefixed("llama", init_weights="zero")
    assert not model.base_model.prefix_embeddings.any()
    batch = inputs("llama")
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(model(**batch).logits, base(**batch).logits, rtol=0, atol=0)


@pytest.mark.slow
def test_a_compiled_encoder_without_an_attention_mask_gives_the_eager_logits():
    """Traced, BERT derives a mask for the input alone when none is given (eager skips masking): it failed to
    broadcast against the prefixed keys inside scaled_dot_product_attention, naming nothing of prefix tuning."""
    torch._dynamo.reset()
    _, model = prefixed("bert")
    batch = {k: v for k, v in inputs("bert").items() if k != "attention_mask"}
    with torch.no_grad():
        want = model(**batch).logits
        torch.testing.assert_close(torch.compile(model, backend="eager")(**batch).logits, want)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "marian"])
def test_torch_compile_gives_the_eager_logits_and_trains_in_one_graph(family):
    """fullgraph: the hooks import nothing from transformers while traced (an import of its lazy module broke the
    graph at every call before)."""
    _, model = prefixed(family)
    batch = inputs(family)
    with torch.no_grad():
        want = model(**batch).logits
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**batch).logits, want, rtol=1e-5, atol=1e-5)
    model.train()
    prefix = model.base_model.prefix_embeddings
    (got,) = torch.autograd.grad(compiled(**batch).logits.square().mean(), prefix)
    (want,) = torch.autograd.grad(model(**batch).logits.square().mean(), prefix)
    assert want.abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)  # eager's gradient, as the README says


@pytest.mark.parametrize(("version", "name"), [("5.17.0", "past_key_values"), ("5.23.1", "past_key_values"),
                                               ("5.24.0", "cache"), ("5.25.0.dev0", "cache"), ("6.0.0", "cache")])
def test_a_cache_handed_through_kwargs_takes_the_installed_transformers_name(monkeypatch, version, name):
    """BERT's task heads take the cache only through **kwargs and pass on what they get; the layers read one name,
    which transformers 5.24 renamed (before it, the prefix silently went nowhere on BERT)."""
    import transformers

    from pefttorch.tuners import _cache

    assert _cache.TRANSFORMERS_VERSION == transformers.__version__
    monkeypatch.setattr(_cache, "TRANSFORMERS_VERSION", version)
    assert _cache.cache_key({"input_ids": None}, ("input_ids", "kwargs")) == name
    assert _cache.cache_key({}, ("input_ids", "past_key_values")) == "past_key_values"  # the forward's own
    assert _cache.cache_key({"cache": object()}, ()) == "cache"  # the one given


@pytest.mark.parametrize("family", ["llama", "t5"])
@pytest.mark.parametrize("method", ["prefix", "prompt", "dept"])
def test_a_static_cache_is_refused_with_a_clear_error(method, family):
    """generate(cache_implementation="static") sizes and masks the cache without the virtual tokens: prompt tuning
    and DePT overflowed it (an IndexError inside the cache), prefix tuning's own cache no longer matched the mask
    (on a padded batch a silent wrong answer). LoRA, which adds no tokens, works with it. On an encoder-decoder,
    prefix tuning named a 4-D decoder_attention_mask the user never gave (generate's, for the static cache)."""
    from pefttorch import DeptConfig, LoraConfig, PromptTuningConfig

    config = {"prefix": PrefixTuningConfig(num_virtual_tokens=N), "prompt": PromptTuningConfig(num_virtual_tokens=N),
              "dept": DeptConfig(num_virtual_tokens=N, r=2, max_length=16)}[method]
    config.task_type = TASKS[family]
    ids = inputs(family)["input_ids"]
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a padded batch: generate's 4-D mask for the static cache was refused, naming the mask
    model = get_peft_model(fresh(family), config).eval()
    if family == "t5" and method != "prefix":  # the virtual tokens go to the encoder: the decoder's cache is as sized
        static = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, cache_implementation="static")
        assert torch.equal(static, model.generate(input_ids=ids, max_new_tokens=3, do_sample=False))
        return
    for attention_mask in (None, mask):
        with pytest.raises(ValueError, match="does not work with a static key/value cache"):
            model.generate(input_ids=ids, attention_mask=attention_mask, max_new_tokens=3, do_sample=False,
                           cache_implementation="static")
    if family != "llama":
        return
    lora = get_peft_model(fresh("llama"), LoraConfig(r=2, target_modules=["q_proj"])).eval()
    static = lora.generate(input_ids=ids, max_new_tokens=3, do_sample=False, cache_implementation="static")
    assert torch.equal(static, lora.generate(input_ids=ids, max_new_tokens=3, do_sample=False))


@pytest.mark.parametrize("family", ["llama", "t5", "marian"])
def test_an_empty_cache_passed_in_is_filled_in_place(family):
    """A cache the caller passes (as to the base model, to step on with it) holds the prefix and the tokens after
    the call: it was replaced by the hook's own, stayed empty, and the next step with it computed without the
    prefix or the tokens (silently wrong logits)."""
    from transformers import DynamicCache, EncoderDecoderCache

    _, model = prefixed(family)
    enc_dec = family != "llama"
    ids = inputs(family)["input_ids"]
    step = {"decoder_input_ids": ids[:, :5]} if enc_dec else {"input_ids": ids}
    name = next(iter(step))
    with torch.no_grad():
        whole = model(**({"input_ids": ids} if enc_dec else {}), **step).logits[:, -1]
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache()) if enc_dec else DynamicCache()
        first = {name: step[name][:, :-1]}
        out = model(**({"input_ids": ids} if enc_dec else {}), **first, past_key_values=cache, use_cache=True)
        assert cache.get_seq_length() == N + step[name].shape[1] - 1
        assert (out.past_key_values if hasattr(out, "past_key_values") else out.cache) is cache
        extra = {"encoder_outputs": (out.encoder_last_hidden_state,)} if enc_dec else {}
        last = model(**extra, **{name: step[name][:, -1:]}, past_key_values=cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(last, whole, rtol=1e-5, atol=1e-5)


def test_a_cache_passed_in_under_gradient_checkpointing_is_refused():
    """The checkpointed layers get a read-only cache holding the prefix, so one passed in cannot be filled: said,
    not left empty silently."""
    from transformers import DynamicCache

    _, model = prefixed("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    with pytest.raises(ValueError, match="cannot be filled while gradient checkpointing trains"):
        model(**inputs("llama"), past_key_values=DynamicCache())
    # refused before the checkpointed layers were let keep a cache: nothing is left granted, and training goes on
    assert not any("_can_checkpoint_with_cache" in m.__dict__ for m in model.modules())
    loss(model(**inputs("llama"))).backward()


def _bart(cls):
    from transformers import BartConfig

    torch.manual_seed(0)
    return cls(BartConfig(vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                          decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                          max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                          decoder_start_token_id=2, num_labels=3, dropout=0.0, attention_dropout=0.0,
                          activation_dropout=0.0)).eval()


@pytest.mark.parametrize("kind", ["BartForConditionalGeneration", "BartForSequenceClassification"])
def test_a_decoder_input_the_model_makes_from_input_ids(kind):
    """BART-family models (and T5's classification and QA heads) make the decoder input from input_ids when given
    none, and a seq2seq LM from its labels: the hook looked at decoder inputs and labels only, refused the first and
    read a classifier's (batch,) labels as a sequence ("not enough values to unpack"). Now the prefixed model
    equals itself given the decoder input the model makes."""
    import transformers
    from transformers.models.bart.modeling_bart import shift_tokens_right

    model = get_peft_model(_bart(getattr(transformers, kind)), PrefixTuningConfig(num_virtual_tokens=N))
    with torch.no_grad():
        model.base_model.prefix_embeddings.normal_(generator=torch.Generator().manual_seed(4))
    ids = torch.tensor([[0, 5, 6, 7, 2], [0, 4, 3, 2, 1]])
    mask = (ids != 1).long()
    made = shift_tokens_right(ids, 1, 2)
    labels = torch.tensor([0, 2]) if kind.endswith("Classification") else torch.tensor([[5, 6, 2], [4, 2, 1]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask, decoder_input_ids=made).logits)
        ours = model(input_ids=ids, attention_mask=mask, labels=labels)
        made = made if kind.endswith("Classification") else shift_tokens_right(labels, 1, 2)
        want = model(input_ids=ids, attention_mask=mask, decoder_input_ids=made, labels=labels)
    torch.testing.assert_close(ours.logits, want.logits)
    torch.testing.assert_close(ours.loss, want.loss)


def test_a_seq2seq_lm_without_any_decoder_input_gives_its_own_error():
    base, model = prefixed("t5")  # T5ForConditionalGeneration makes its decoder input from labels only
    ids = inputs("t5")["input_ids"]
    with pytest.raises(ValueError) as theirs:
        base(input_ids=ids)
    with pytest.raises(ValueError, match=re.escape(str(theirs.value))):
        model(input_ids=ids)


def test_two_threads_on_one_model_keep_their_own_cache():
    """The cache a call started was kept on the model from its hook to its check: a call in another thread that
    started in between replaced it, and the first call's check read the second's (not yet read by its layers):
    "attention layers [0, 1] did not read the prefix" on a correct call. The hooks below only force that order."""
    import threading

    _, model = prefixed("llama")
    model.eval()
    calls = {"A": torch.randint(1, 95, (2, 7)), "B": torch.randint(1, 95, (3, 5))}
    with torch.no_grad():
        want = {k: model(input_ids=v).logits for k, v in calls.items()}
    b_started, a_done = threading.Event(), threading.Event()

    def a_ends_after_b_starts(*_):
        if threading.current_thread().name == "A":
            assert b_started.wait(10)
        elif not a_done.is_set():
            b_started.set()
            assert a_done.wait(10)

    hook = model.base_model.model.model.layers[0].register_forward_pre_hook(a_ends_after_b_starts)
    got, errors = {}, []

    def run(key):
        try:
            with torch.no_grad():
                got[key] = model(input_ids=calls[key]).logits
        except Exception as e:  # noqa: BLE001 (reported below, from the main thread)
            errors.append(f"{key}: {e}")
        finally:
            if key == "A":
                a_done.set()
            else:
                b_started.set()

    run_in_threads(run, calls)
    hook.remove()
    assert not errors
    for k in calls:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5)
