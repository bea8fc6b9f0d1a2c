"""pefttorch.accelerate on models built by HF PEFT: same outputs and gradients, shared parameters, PEFT's
own features still working, and unsupported layers left alone."""

from __future__ import annotations

import copy
import functools
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


def test_a_dropout_of_one_is_left_to_peft():
    """HF PEFT takes lora_dropout=1 (the LoRA term is zero in training); the fused op's dropout takes p < 1, so those
    layers stay PEFT's (switched, every forward raised, in eval too)."""
    family = FAMILIES["llama"]
    model = peft_model(family, lora_dropout=1.0).eval()
    inputs = family.inputs(torch.Generator().manual_seed(1))
    want = model(**inputs).logits
    report = pefttorch.accelerate(model)
    assert not report.switched and all(r == "lora_dropout=1, beyond the fused op's p < 1"
                                       for r in report.skipped.values())
    torch.testing.assert_close(model(**inputs).logits, want, rtol=0, atol=0)


def test_pefts_compiled_hotswap_scaling_stays_a_tensor_in_one_graph():
    """peft's prepare_model_for_compiled_hotswap makes each scaling a 0-d tensor, changed in place by a hotswap so
    that the compiled model need not recompile: read as a float it was a graph break per layer (an error with
    fullgraph) and, compiled, a constant that a hotswap would not change."""
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap

    family = FAMILIES["llama"]
    model = peft_model(family).eval()
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    inputs = family.inputs(torch.Generator().manual_seed(1))
    reference = copy.deepcopy(model)
    assert pefttorch.accelerate(model).switched
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    scalings = [m.scaling["default"] for m in model.modules() if is_accelerated(m)]
    assert scalings and all(isinstance(s, torch.Tensor) for s in scalings)
    with torch.no_grad():
        for factor in (1.0, 3.0):  # a hotswap writes new scalings in place
            for m in (model, reference):
                for layer in (x for x in m.modules() if isinstance(getattr(x, "scaling", None), dict)):
                    layer.scaling["default"].fill_(factor)
            torch.testing.assert_close(compiled(**inputs).logits, reference(**inputs).logits, rtol=1e-5, atol=1e-5)
    model.train()
    y, grads = run(model, inputs)
    reference.train()
    y0, grads0 = run(reference, inputs)
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-5)
    for n in grads0:
        torch.testing.assert_close(grads[n], grads0[n], rtol=1e-4, atol=1e-6, msg=n)


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


class _FakeQuantLinear(torch.nn.Linear):
    """A Linear with a forward of its own (quantization-aware training rounds the weight)."""

    def forward(self, x):
        return torch.nn.functional.linear(x, torch.round(self.weight * 4) / 4, self.bias)


def _one_projection(linear=torch.nn.Linear):
    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.add_module("proj", linear(17, 9))
    return net


def test_base_layers_that_must_be_called_are_called():
    """A hook on the base layer (input steering, DeepSpeed ZeRO-3 gathering) and a Linear subclass with its own
    forward were skipped: the fused op read the weight, as if the base were a plain Linear. HF PEFT calls it."""
    x = torch.randn(3, 5, 17, generator=torch.Generator().manual_seed(1))
    config = dict(r=2, target_modules=["proj"], init_lora_weights=False)
    model = peft.get_peft_model(_one_projection(), peft.LoraConfig(**config))
    base = model.base_model.model.proj.base_layer
    calls = []
    base.register_forward_pre_hook(lambda module, args: (calls.append(1) or args[0] * 0.5,))
    want = model(x)
    assert pefttorch.accelerate(model).switched
    torch.testing.assert_close(model(x), want)
    assert len(calls) == 2

    model = peft.get_peft_model(_one_projection(_FakeQuantLinear), peft.LoraConfig(**config))
    want = model(x)
    report = pefttorch.accelerate(model)
    assert report.skipped == {"base_model.model.proj": "base layer _FakeQuantLinear has a forward of its own"}
    torch.testing.assert_close(model(x), want)


@pytest.mark.parametrize("method", ["lora", "increlora"])
def test_pefttorch_layers_call_a_hooked_base_layer(method):
    """pefttorch's own LoRA layers follow the same rule: a hooked base layer is called, the adapter's term added;
    the unhooked layer still takes the fused op (the profile shows it)."""
    x = torch.randn(3, 5, 17, generator=torch.Generator().manual_seed(1), requires_grad=True)
    if method == "lora":
        config = pefttorch.LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False)
    else:
        config = pefttorch.IncreLoraConfig(target_modules=["proj"], init_rank=2, target_rank=2, top_h=1)
    model = pefttorch.get_peft_model(_one_projection(), config)
    layer = model.base_model.model.proj
    if method == "increlora":
        with torch.no_grad():  # B starts at zero: give the adapter's term a value
            for p in layer.factors("default"):
                p.normal_()
    y_fused = model(x)
    (g_fused,) = torch.autograd.grad(y_fused.sum(), x)
    layer.base_layer.register_forward_pre_hook(lambda module, args: (args[0] * 0.5,))
    y = model(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    with torch.no_grad():
        base = layer.base_layer.weight
        half_base = torch.nn.functional.linear(x * 0.5, base, layer.base_layer.bias)
        full_base = torch.nn.functional.linear(x, base, layer.base_layer.bias)
    torch.testing.assert_close(y, y_fused - full_base + half_base, rtol=1e-5, atol=1e-5)
    # d/dx: the base's share halves
    torch.testing.assert_close(g, g_fused - 0.5 * base.sum(0), rtol=1e-5, atol=1e-5)


def _lora_or_increlora(method, net=None):
    if method == "lora":
        config = pefttorch.LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False)
    else:
        config = pefttorch.IncreLoraConfig(target_modules=["proj"], init_rank=2, target_rank=2, top_h=1)
    model = pefttorch.get_peft_model(_one_projection() if net is None else net, config)
    if method == "increlora":
        with torch.no_grad():
            for p in model.base_model.model.proj.factors("default"):
                p.normal_()
    return model


@pytest.mark.parametrize("method", ["lora", "increlora"])
def test_a_base_layer_with_only_backward_hooks_is_called(method):
    """Backward hooks (gradient attribution, probing) fire only for a module that is called: a base layer with
    nothing but those was read by the fused op, and they never fired."""
    model = _lora_or_increlora(method)
    x = torch.randn(3, 5, 17, generator=torch.Generator().manual_seed(1), requires_grad=True)
    want = model(x)
    fired = []
    base = model.base_model.model.proj.base_layer
    base.register_full_backward_pre_hook(lambda module, grad_output: fired.append("pre") and None)
    base.register_full_backward_hook(lambda module, grad_input, grad_output: fired.append("post") and None)
    y = model(x)
    y.sum().backward()
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    assert fired == ["pre", "post"]


@pytest.mark.parametrize("method", ["lora", "increlora"])
def test_a_base_weight_gathered_by_hooks(method):
    """DeepSpeed ZeRO-3's pattern: the weight is a 0-element placeholder outside the base layer's call, gathered by
    a forward pre-hook and released by a forward hook. The ranked layer's zero stand-in weight took the
    placeholder's shape, and its op refused a 1-D weight."""
    model = _lora_or_increlora(method)
    x = torch.randn(3, 5, 17, generator=torch.Generator().manual_seed(1))
    want = model(x)
    base = model.base_model.model.proj.base_layer
    full = base.weight.data

    def gather(module, args):
        module.weight.data = full

    def release(module, args, output):
        module.weight.data = torch.empty(0)

    base.register_forward_pre_hook(gather)
    base.register_forward_hook(release)
    base.weight.data = torch.empty(0)
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


def test_accelerate_hooks_keep_running_and_come_back():
    """🤗 Accelerate's hooks (dispatch_model, offloading) hold the module's instance forward; the switch replaced
    them and the undo deleted them, so they stopped running for good. Now the fused forward runs inside the hook,
    and the undo gives the hook its previous computation back; other code's instance forward is left alone."""
    hooks = pytest.importorskip("accelerate.hooks")

    class Count(hooks.ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.calls += 1
            return args, kwargs

    family = FAMILIES["llama"]
    model = peft_model(family).eval()
    inputs = family.inputs(torch.Generator().manual_seed(1))
    layers = model.base_model.model.model.layers
    q, norm = layers[0].self_attn.q_proj, layers[0].input_layernorm
    hooks.add_hook_to_module(q, Count())
    hooks.add_hook_to_module(norm, Count())
    want = model(**inputs).logits
    assert Count.calls == 2
    assert "base_model.model.model.layers.0.self_attn.q_proj" in pefttorch.accelerate(model).switched
    assert "base_model.model.model.layers.0.input_layernorm" in pefttorch.fuse_norms(model).switched
    torch.testing.assert_close(model(**inputs).logits, want, rtol=1e-5, atol=1e-5)
    assert Count.calls == 4 and is_accelerated(q)
    pefttorch.deaccelerate(model)
    pefttorch.unfuse_norms(model)
    assert not is_accelerated(q)
    torch.testing.assert_close(model(**inputs).logits, want, rtol=1e-5, atol=1e-5)
    assert Count.calls == 6
    hooks.remove_hook_from_module(q)  # accelerate's own undo still finds the class's forward
    assert "forward" not in q.__dict__ or q.forward.__func__ is type(q).forward

    # a hook added after the switch wraps the fused forward, and the undo still finds it
    pefttorch.accelerate(model)
    hooks.add_hook_to_module(q, Count())
    assert is_accelerated(q) and pefttorch.deaccelerate(model) == len(family.targets) * 2
    torch.testing.assert_close(model(**inputs).logits, want, rtol=1e-5, atol=1e-5)

    v = layers[1].self_attn.v_proj  # someone else's instance forward: not ours to drop
    v.forward = functools.partial(type(v).forward, v)
    report = pefttorch.accelerate(model)
    assert "already replaced by other code" in report.skipped["base_model.model.model.layers.1.self_attn.v_proj"]


def test_the_report_names_the_lora_variant():
    if not hasattr(peft.LoraConfig(), "alora_invocation_tokens"):
        pytest.skip("this peft has no aLoRA")
    model = peft.get_peft_model(_one_projection(), peft.LoraConfig(r=2, target_modules=["proj"],
                                                                   alora_invocation_tokens=[3]),
                                adapter_name="mine")
    (reason,) = pefttorch.accelerate(model).skipped.values()
    assert reason == "LoRA variant ['ALoraLinearVariant']"


class _Int8Weight(torch.Tensor):
    """A weight kept as int8 values and per-row scales, dequantized inside the aten ops a linear layer uses, as
    torchao's quantized weights are; any other op (pefttorch's among them) is NotImplementedError."""

    @staticmethod
    def __new__(cls, q, scale):
        return torch.Tensor._make_wrapper_subclass(cls, q.shape, dtype=scale.dtype, device=q.device)

    def __init__(self, q, scale):
        self.q, self.scale = q, scale

    def __repr__(self):
        return f"_Int8Weight({list(self.shape)})"

    def dequantize(self):
        return self.q.to(self.scale.dtype) * self.scale

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        aten = torch.ops.aten
        if func in (aten.detach.default, aten.t.default):  # (the scales are transposed along: (1, out) for (in, out))
            return cls(func(args[0].q), func(args[0].scale))
        if func in (aten.mm.default, aten.addmm.default):
            plain = [a.dequantize() if isinstance(a, _Int8Weight) else a for a in args]
            return func(*plain, **(kwargs or {}))
        raise NotImplementedError(f"_Int8Weight: {func}")


def _quantized_projection():
    """_one_projection with its weight quantized, and the same projection with the dequantized weight."""
    net = _one_projection()
    w = net.proj.weight.detach()
    scale = w.abs().amax(1, keepdim=True) / 127
    quantized = _Int8Weight(torch.round(w / scale).to(torch.int8), scale)
    plain = copy.deepcopy(net)
    plain.proj.weight.data = quantized.dequantize()
    net.proj.weight = torch.nn.Parameter(quantized, requires_grad=False)
    return net, plain


def test_accelerate_leaves_a_quantized_base_weight_to_peft():
    """A base weight that is a tensor subclass (torchao's quantized weights) implements the ops nn.Linear calls, not
    pefttorch's: the switched layer failed at its first forward with the subclass's NotImplementedError."""
    net, _ = _quantized_projection()
    config = peft.LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False)
    model = peft.get_peft_model(net, config)
    x = torch.randn(3, 5, 17, generator=torch.Generator().manual_seed(1))
    want = model(x)
    report = pefttorch.accelerate(model)
    reason = "base weight is a _Int8Weight, a tensor subclass (e.g. quantized)"
    assert report.skipped == {"base_model.model.proj": reason}
    torch.testing.assert_close(model(x), want)


@pytest.mark.parametrize("method", ["lora", "increlora"])
def test_pefttorch_layers_call_a_base_layer_with_a_quantized_weight(method):
    """pefttorch's own layers call such a base layer and add the adapter's term (they failed as accelerate did);
    outputs and gradients are those of the same model with the weight dequantized. Merging into it, or wrapping it
    in LoRALinear (which reads the weight), is refused by name."""
    torch.manual_seed(0)
    quantized, plain = (_lora_or_increlora(method, net) for net in _quantized_projection())
    with torch.no_grad():
        for p, q in zip(plain.parameters(), quantized.parameters(), strict=True):
            if p.requires_grad:
                q.copy_(p)
    x = torch.randn(3, 5, 17, generator=torch.Generator().manual_seed(1), requires_grad=True)
    grads = []
    for model in (quantized, plain):
        y = model(x)
        trainable = [p for p in model.parameters() if p.requires_grad]
        grads.append((y, *torch.autograd.grad(y.square().sum(), [x, *trainable])))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="_Int8Weight, a tensor subclass"):
        quantized.merge_and_unload()
    with pytest.raises(TypeError, match="_Int8Weight, a tensor subclass"):
        pefttorch.nn.LoRALinear.from_linear(_quantized_projection()[0].proj)
