"""A pefttorch LoRA model in the HF Trainer: it trains, only the adapters move, checkpointing works."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from hf_models import FAMILIES
from safetensors.torch import load_file

from pefttorch import BitFitConfig, IA3Config, LNTuningConfig, LoraConfig, get_peft_model

transformers = pytest.importorskip("transformers")


class Texts(torch.utils.data.Dataset):
    def __init__(self, n=32, length=12):
        g = torch.Generator().manual_seed(0)
        # four sequences to memorise, repeated
        self.ids = torch.randint(3, 90, (4, length), generator=g).repeat(n // 4, 1)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_trainer_trains_the_adapters(tmp_path, checkpointing):
    torch.manual_seed(0)
    # a tiny random model's frozen head caps how confident it can get: train the head too (modules_to_save)
    model = get_peft_model(FAMILIES["llama"].build(), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                                 modules_to_save=["lm_head"]))
    # the Trainer keeps the dataset columns that forward accepts: it must see the wrapped model's signature
    assert {"input_ids", "attention_mask", "labels"} <= set(inspect.signature(model.forward).parameters)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=8, learning_rate=1e-2,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, gradient_checkpointing=checkpointing,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Texts())
    result = trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 30 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5]), losses
    assert result.global_step == 30
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
        else:
            assert not torch.equal(p, adapters[n]), n


@pytest.mark.parametrize("family, config", [
    ("gpt2", LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True)),  # tied input and output embeddings
    ("marian", BitFitConfig()),  # the tuned biases are held by the tuner and by their modules
    ("llama", LNTuningConfig()),
], ids=["gpt2-lora", "marian-bitfit", "llama-ln"])
def test_trainer_checkpoints_of_shared_tensors_save_and_resume(tmp_path, family, config):
    """The Trainer writes a PeftModel's checkpoint as its state dict with safetensors, which refuses a tensor held
    under two keys: once a crash at the first checkpoint. A tensor is listed once, and resuming from the checkpoint
    ends where the uninterrupted run does."""
    def run(out, steps, resume=None):
        torch.manual_seed(0)
        model = get_peft_model(FAMILIES[family].build(), copy.deepcopy(config))
        args = transformers.TrainingArguments(
            output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
            save_strategy="steps", save_steps=2, use_cpu=True, disable_tqdm=True, logging_steps=1,
            lr_scheduler_type="constant")
        data = Texts(n=16)
        if family == "marian":  # an encoder-decoder: its decoder reads the labels shifted
            data = [{k: v for k, v in data[i].items() if k != "attention_mask"} for i in range(len(data))]
        transformers.Trainer(model=model, args=args, train_dataset=data).train(resume_from_checkpoint=resume)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    whole = run(tmp_path / "whole", 4)
    run(tmp_path / "cut", 2)  # stops after its checkpoint at step 2
    state = load_file(tmp_path / "cut" / "checkpoint-2" / "model.safetensors")
    assert len({t.data_ptr() for t in state.values()}) == len(state)
    resumed = run(tmp_path / "cut", 4, resume=str(tmp_path / "cut" / "checkpoint-2"))
    assert whole.keys() == resumed.keys() and whole
    for n in whole:
        torch.testing.assert_close(resumed[n], whole[n], rtol=0, atol=0, msg=n)


def test_state_dict_lists_a_tied_tensor_once_and_loads_strictly():
    torch.manual_seed(0)
    model = get_peft_model(FAMILIES["gpt2"].build(), LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    state = model.state_dict()
    tied = [k for k in ("base_model.model.transformer.wte.weight", "base_model.model.lm_head.weight") if k in state]
    assert len(tied) == 1
    other = get_peft_model(FAMILIES["gpt2"].build(), LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    result = other.load_state_dict(state, strict=True)  # the dropped alias is not missing: it shares the storage
    assert not result.missing_keys and not result.unexpected_keys
    base = other.get_base_model()
    assert base.lm_head.weight is base.transformer.wte.weight and torch.equal(base.lm_head.weight, state[tied[0]])
    outer = torch.nn.ModuleDict({"inner": other})  # keys under a prefix: the same
    assert not outer.load_state_dict({f"inner.{k}": v for k, v in state.items()}, strict=True).missing_keys
    with pytest.raises(RuntimeError, match="Missing key"):  # a key that is nobody's alias is still missing
        other.load_state_dict({k: v for k, v in state.items() if "lora_A" not in k}, strict=True)


def test_a_meta_built_model_loads_the_state_dict_with_assign_and_stays_tied():
    """accelerate's init_empty_weights pattern: the dropped alias once stayed on the meta device (and a strict load
    failed on it), the tie broken."""
    def build():
        torch.manual_seed(0)
        return get_peft_model(FAMILIES["gpt2"].build(),
                              LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))

    source = build()
    with torch.no_grad():
        source.get_base_model().transformer.wte.weight.normal_()
    state = source.state_dict()
    with torch.device("meta"):
        empty = build()
    result = empty.load_state_dict(state, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    base = empty.get_base_model()
    assert base.lm_head.weight is base.transformer.wte.weight
    assert not any(t.is_meta for t in empty.state_dict().values())
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(empty(input_ids=ids).logits, source(input_ids=ids).logits, rtol=0, atol=0)


def test_a_non_persistent_buffer_aliasing_a_saved_weight_gets_no_key_on_load():
    """Such a buffer (a cached handle on a weight) is out of the state dict by design: the load once filled its
    key in as a dropped alias and then failed on it as unexpected."""
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.head = torch.nn.Module()
            self.head.register_buffer("w", self.lin.weight, persistent=False)

        def forward(self, x):
            return self.lin(x) @ self.head.w

    torch.manual_seed(0)
    state = get_peft_model(Model(), LoraConfig(r=2, target_modules=["lin"])).state_dict()
    assert "base_model.model.head.w" not in state
    result = get_peft_model(Model(), LoraConfig(r=2, target_modules=["lin"])).load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_from_pretrained_on_a_trainer_save_of_the_whole_model_says_what_it_is(tmp_path):
    from safetensors.torch import save_file

    from pefttorch import PeftModel

    model = get_peft_model(FAMILIES["gpt2"].build(), LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    save_file(model.state_dict(), tmp_path / "model.safetensors")  # what trainer.save_model() writes for it
    with pytest.raises(FileNotFoundError, match=r"HF Trainer's save of the whole model .* model.save_pretrained"):
        PeftModel.from_pretrained(FAMILIES["gpt2"].build(), tmp_path)
    model.load_state_dict(load_file(tmp_path / "model.safetensors"))  # how it loads instead


@pytest.mark.parametrize("method", ["increlora", "adalora"])
def test_rank_allocation_resumes_from_a_trainer_checkpoint_where_it_was(tmp_path, method):
    """The allocator's statistics, history and sampling were in no checkpoint: a resumed run scored from fresh
    averages and grew or pruned other modules than the uninterrupted run. They travel in the state dict now."""
    from pefttorch import AdaLoraConfig, IncreLoraConfig, RankAllocationCallback
    from pefttorch.optim import RankAwareAdamW

    def run(out, resume=None):
        torch.manual_seed(0)
        config = (IncreLoraConfig(target_rank=3, init_rank=1, incre_interval=2, init_warmup=1, top_h=2,
                                  incre_rank_num=1, target_modules="all-linear", lora_alpha=8, score_sample=4)
                  if method == "increlora" else
                  AdaLoraConfig(init_r=6, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=12,
                                target_modules="all-linear", lora_alpha=8))
        model = get_peft_model(FAMILIES["llama"].build(), config)
        args = transformers.TrainingArguments(
            output_dir=str(out), max_steps=12, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
            save_strategy="steps", save_steps=5, use_cpu=True, disable_tqdm=True, lr_scheduler_type="constant")
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Texts(n=16),
                                       optimizers=(RankAwareAdamW(model.parameters(), lr=1e-2), None),
                                       callbacks=[RankAllocationCallback()])
        trainer.train(resume_from_checkpoint=resume)
        return model

    whole = run(tmp_path / "whole")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "whole" / "checkpoint-5"))
    assert resumed.base_model.allocator.events == whole.base_model.allocator.events
    assert resumed.rank_pattern() == whole.rank_pattern()
    mine = dict(resumed.named_parameters())
    for name, p in whole.named_parameters():
        torch.testing.assert_close(mine[name], p, rtol=0, atol=0, msg=name)


CONFIGS = {"lora": lambda: LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "ia3": IA3Config,
           "ln": LNTuningConfig}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_the_trainer_sees_the_wrapped_models_config_and_class(method, tmp_path):
    """Two ways the Trainer read the PeftModel wrong: its name ("PeftModelFor...") is not a causal LM's, so label
    smoothing smoothed the current token instead of the next; and for the methods other than LoRA `model.config` was
    the PEFT config, so the Trainer's pad_token_id, problem_type and use_cache reads and writes missed the model."""
    torch.manual_seed(0)
    base = FAMILIES["llama"].build()
    model = get_peft_model(copy.deepcopy(base), CONFIGS[method]())
    assert model.config is model.get_base_model().config
    args = transformers.TrainingArguments(output_dir=str(tmp_path), label_smoothing_factor=0.1, report_to=[],
                                          use_cpu=True)
    batch = {k: torch.stack([v[k] for v in Texts(n=4)]) for k in ("input_ids", "attention_mask", "labels")}
    losses = [transformers.Trainer(model=m, args=args).compute_loss(m, dict(batch)) for m in (base, model)]
    torch.testing.assert_close(losses[1], losses[0])  # the adapters start as the identity
    assert repr(model).startswith("PeftModelForLlamaForCausalLM(")
