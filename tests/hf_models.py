"""Tiny transformers models of each family the integration supports, built from configs (no hub)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

VOCAB = 96


@dataclass
class Family:
    name: str
    build: Callable[[], torch.nn.Module]
    targets: list[str]  # typical LoRA targets in this family
    inputs: Callable[[torch.Generator], dict]
    generative: bool


def _ids(g, batch=2, length=7):
    return torch.randint(1, VOCAB - 1, (batch, length), generator=g)


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2))


def bert():
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64, num_labels=3,
                                                    max_position_embeddings=64, hidden_dropout_prob=0.0,
                                                    attention_probs_dropout_prob=0.0))


def t5():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                               num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                                               dropout_rate=0.0))


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0))


def marian():
    from transformers import MarianConfig, MarianMTModel

    return MarianMTModel(MarianConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                                      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                      decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=VOCAB - 1,
                                      decoder_start_token_id=VOCAB - 1, eos_token_id=0, dropout=0.0,
                                      attention_dropout=0.0, activation_dropout=0.0))


def _lm_inputs(g):
    return {"input_ids": _ids(g)}


def _bert_inputs(g):
    ids = _ids(g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 2])}


def _seq2seq_inputs(g):
    return {"input_ids": _ids(g), "labels": _ids(g, length=5)}


FAMILIES = {
    "llama": Family("llama", llama, ["q_proj", "v_proj", "down_proj"], _lm_inputs, True),
    "bert": Family("bert", bert, ["query", "value", "dense"], _bert_inputs, False),
    "t5": Family("t5", t5, ["q", "v", "wo"], _seq2seq_inputs, True),
    "gpt2": Family("gpt2", gpt2, ["c_attn", "c_fc", "c_proj"], _lm_inputs, True),  # c_proj: square in attention
    "marian": Family("marian", marian, ["q_proj", "v_proj", "fc1"], _seq2seq_inputs, True),
}


# ---- what the method tests share: a fresh model of a family, its inputs, and a loss whatever the head

def fresh(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return FAMILIES[family].build().eval()


def inputs(family: str, seed: int = 1) -> dict:
    return FAMILIES[family].inputs(torch.Generator().manual_seed(seed))


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def loss(out) -> torch.Tensor:
    """The model's own loss where the batch has labels, else one that reaches every logit."""
    return out.loss if out.loss is not None else out.logits.float().square().mean()


def check_generate_with_and_without_cache(model, family: str) -> None:
    """For a method that puts virtual tokens in the cache (prompt, prefix tuning): greedy generation with the
    cache equals generation that recomputes the whole sequence every step (scores too), with left padding in a
    decoder-only batch, and differs from the base model's (the method is really there)."""
    ids = inputs(family)["input_ids"]
    mask = torch.ones_like(ids)
    if family in ("llama", "gpt2"):
        mask[0, :2] = 0
    kw = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 5, "do_sample": False,
          "output_scores": True, "return_dict_in_generate": True}
    cached = model.generate(**kw)
    uncached = model.generate(**kw, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(uncached.scores), rtol=1e-4, atol=1e-5)
    with model.disable_adapter():
        plain = model.generate(**kw)
    assert not torch.allclose(plain.scores[0], cached.scores[0])
