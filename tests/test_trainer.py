"""A pefttorch LoRA model in the HF Trainer: it trains, only the adapters move, checkpointing works."""

from __future__ import annotations

import inspect

import pytest
import torch
from hf_models import FAMILIES

from pefttorch import LoraConfig, get_peft_model

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
