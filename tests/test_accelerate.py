"""pefttorch.accelerate on models built by HF PEFT: same outputs and gradients, shared parameters, PEFT's
own features still working, and unsupported layers left alone."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from helpers import DEVICES
from hf_models import FAMILIES

import pefttorch
from pefttorch.integrations.peft import is_accelerated

peft = pytest.importorskip("peft")


def peft_model(family, seed=0, **config):
    torch.manual_seed(seed)
    base = family.build()
    config.setdefault("target_modules", family.targets)
    config.setdefault("init_lora_weights", False)
    return peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, **config))


def run(model, inputs):
    model.zero_grad()
    kwargs = dict(inputs)
    kwargs.setdefault("labels", kwargs["input_ids"])
    out = model(**kwargs)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_same_outputs_and_gradients_as_hf_peft(name):
    family = FAMILIES[name]
    model = peft_model(family).train()  # dropout 0: deterministic
    inputs = family.inputs(torch.Generator().manual_seed(1))
    y0, g0 = run(model, inputs)
    params_before = {n: p for n, p in model.named_parameters()}
    report = pefttorch.accelerate(model)
    assert report.switched and not report.skipped
    assert all(is_accelerated(model.get_submodule(n)) for n in report.switched)
    y1, g1 = run(model, inputs)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    assert g1.keys() == g0.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=n)
    # in place: the very same parameter objects, so an optimizer built before keeps working
    assert all(p is params_before[n] for n, p in model.named_parameters())
    assert pefttorch.deaccelerate(model) == len(report.switched)
    assert not any(is_accelerated(m) for m in model.modules())


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_base_with_fp32_adapters(device):
    # HF PEFT's default for 16-bit models: fp32 adapter weights. The accelerated layer computes the
    # low-rank path in bf16 (fp32 accumulation); the result must stay within bf16 tolerance of PEFT's.
    family = FAMILIES["llama"]
    model = peft_model(family).to(device=device, dtype=torch.bfloat16)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()
    inputs = {k: v.to(device) for k, v in family.inputs(torch.Generator().manual_seed(1)).items()}
    y0, g0 = run(model, inputs)
    pefttorch.accelerate(model)
    y1, g1 = run(model, inputs)
    assert y1.dtype == y0.dtype == torch.bfloat16
    torch.testing.assert_close(y1.float(), y0.float(), rtol=3e-2, atol=3e-2)
    for n in g0:
        assert g1[n].dtype == torch.float32  # gradients reach the fp32 master weights
        rel = (g1[n] - g0[n]).norm() / g0[n].norm()
        assert rel < 5e-2, (n, rel.item())


def test_training_save_and_adapter_switching_keep_working(tmp_path):
    family = FAMILIES["llama"]
    model = peft_model(family)
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    pefttorch.accelerate(model)
    inputs = family.inputs(torch.Generator().manual_seed(1))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    run(model, inputs)
    opt.step()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)

    model.save_pretrained(tmp_path)  # PEFT's own save, on accelerated layers
    model.eval()
    want = model(**inputs).logits
    torch.manual_seed(0)
    reloaded = peft.PeftModel.from_pretrained(family.build(), tmp_path).eval()
    torch.testing.assert_close(reloaded(**inputs).logits, want, rtol=1e-5, atol=1e-5)

    # PEFT's adapter switching, disabling and merging act on the accelerated layers as on its own
    model.set_adapter("other")
    y_other = model(**inputs).logits
    pefttorch.deaccelerate(model)
    torch.testing.assert_close(model(**inputs).logits, y_other, rtol=1e-5, atol=1e-5)
    pefttorch.accelerate(model)
    with model.disable_adapter():
        y_base = model(**inputs).logits
    torch.manual_seed(0)  # the base model peft_model() built, before any adapter
    torch.testing.assert_close(y_base, family.build().eval()(**inputs).logits, rtol=1e-5, atol=1e-5)
    model.merge_adapter()
    torch.testing.assert_close(model(**inputs).logits, y_other, rtol=1e-5, atol=1e-5)


def test_unsupported_layers_are_left_alone_and_reported():
    family = FAMILIES["llama"]
    torch.manual_seed(0)
    model = peft.get_peft_model(family.build(), peft.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"],
                                                                init_lora_weights=False))
    model.add_adapter("dora", peft.LoraConfig(r=2, target_modules=["v_proj"], use_dora=True))
    report = pefttorch.accelerate(model)
    assert any(n.endswith("q_proj") for n in report.switched)
    assert any(n.endswith("embed_tokens") and "Embedding" in r for n, r in report.skipped.items())
    assert any(n.endswith("v_proj") and r == "DoRA" for n, r in report.skipped.items())
    text = str(report)
    assert "switched to pefttorch kernels" in text and "DoRA" in text
    inputs = family.inputs(torch.Generator().manual_seed(1))
    reference = copy.deepcopy(model)
    pefttorch.deaccelerate(reference)
    model.eval()
    reference.eval()
    torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits, rtol=1e-5, atol=1e-5)
    buffer = io.BytesIO()  # a whole-model torch.save of an accelerated model loads, accelerated
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert pefttorch.deaccelerate(copy.deepcopy(loaded)) == len(report.switched)  # still accelerated
    torch.testing.assert_close(loaded(**inputs).logits, reference(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_mixed_batch_inference_falls_back_to_peft():
    family = FAMILIES["llama"]
    model = peft_model(family).eval()
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=family.targets, init_lora_weights=False))
    ids = family.inputs(torch.Generator().manual_seed(1))["input_ids"]
    want = model(input_ids=ids, adapter_names=["default", "other"]).logits
    pefttorch.accelerate(model)
    torch.testing.assert_close(model(input_ids=ids, adapter_names=["default", "other"]).logits, want)


def test_needs_peft_for_peft_models_only():
    # a model without HF PEFT layers: nothing to switch, nothing breaks, and a warning says it is the wrong model
    with pytest.warns(UserWarning, match=r"Sequential has no HF PEFT LoRA layer; it serves models built by peft"):
        report = pefttorch.accelerate(torch.nn.Sequential(torch.nn.Linear(3, 3)))
    assert report.switched == [] and report.skipped == {}
