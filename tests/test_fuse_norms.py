"""pefttorch.fuse_norms: transformers' RMSNorms switched to ATen's fused rms_norm, in place. The switched module
must compute what the original does (within one rounding: checked against a float64 oracle, as accurate as the
original or better), forward and backward, and fall back to the original wherever the fused kernel would not
reproduce it; modules with other arithmetic must be left alone."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from helpers import DEVICES, assert_close_to_oracle, rand
from hf_models import FAMILIES, fresh, inputs, logits, loss

import pefttorch
from pefttorch.integrations.norms import is_fused_norm

LlamaRMSNorm = pytest.importorskip("transformers.models.llama.modeling_llama").LlamaRMSNorm
HALF = [torch.bfloat16, torch.float16]


def norm_module(d, dtype, device, eps=1e-6, weight_grad=False, seed=0):
    torch.manual_seed(seed)
    module = LlamaRMSNorm(d, eps=eps).to(device=device, dtype=dtype)
    with torch.no_grad():
        module.weight.copy_(rand(d, dtype=dtype, device=device))  # not the init's ones: the weight must show
    module.weight.requires_grad_(weight_grad)
    return module


def oracle(x, weight, eps):
    """x * rsqrt(mean(x^2) + eps) * weight in float64, no intermediate rounding."""
    x64 = x.detach().double().requires_grad_(x.requires_grad)
    w64 = weight.detach().double().requires_grad_(weight.requires_grad)
    return x64, w64, x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w64


def grads(y, dy, tensors):
    return torch.autograd.grad(y, [t for t in tensors if t.requires_grad], dy)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, *HALF, torch.float64])
@pytest.mark.parametrize("shape", [(1, 17), (3, 64), (2, 5, 48), (17, 3, 1)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen", "trained"])
def test_fused_norm_matches_the_module_within_one_rounding(device, dtype, shape, layout, weight_grad):
    d = shape[-1]
    module = norm_module(d, dtype, device, weight_grad=weight_grad)
    fused = copy.deepcopy(module)
    assert pefttorch.fuse_norms(fused).switched == [""]
    if layout == "strided":  # every other element of a wider tensor: a non-contiguous last dimension
        x = rand(*shape[:-1], 2 * d, dtype=dtype, device=device)[..., ::2].requires_grad_(True)
        assert not x.is_contiguous()
    else:
        x = rand(*shape, dtype=dtype, device=device, requires_grad=True)
    dy = rand(*shape, dtype=dtype, device=device)
    x64, w64, y64 = oracle(x, module.weight, module.variance_epsilon)
    y_mod, y_fused = module(x), fused(x)
    assert y_fused.dtype == y_mod.dtype == dtype and y_fused.shape == x.shape
    assert_close_to_oracle("y", y_fused, y_mod, y64)
    names = ["dx", "dweight"] if weight_grad else ["dx"]
    for name, got, base, want in zip(names, grads(y_fused, dy, [x, fused.weight]),
                                     grads(y_mod, dy, [x, module.weight]), grads(y64, dy.double(), [x64, w64]),
                                     strict=True):
        assert_close_to_oracle(name, got, base, want)


@pytest.mark.parametrize("device", DEVICES)
def test_the_fused_forward_is_one_op_and_keeps_no_float32_copy(device):
    # What the switch is for: the module's seven operations become one, and backward keeps the bf16 input and a
    # float32 scale per row instead of float32 copies of the activations (on the CPU, ATen decomposes rms_norm,
    # so only the op count is checked there)
    module = norm_module(256, torch.bfloat16, device)
    fused = copy.deepcopy(module)
    pefttorch.fuse_norms(fused)
    x = rand(64, 256, dtype=torch.bfloat16, device=device, requires_grad=True)

    def saved_bytes(m):
        total = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: total.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            m(x)
        return sum(total)

    with torch.profiler.profile() as prof:
        fused(x)
    ops = [e.name for e in prof.events() if e.name.startswith("aten::") and "rms_norm" in e.name]
    assert ops and ops[0] == "aten::rms_norm"
    if device == "cuda":
        assert saved_bytes(fused) < saved_bytes(module) / 2


@pytest.mark.parametrize("device", DEVICES)
def test_what_the_fused_kernel_would_not_reproduce_runs_the_modules_own_forward(device):
    module = norm_module(24, torch.bfloat16, device)
    fused = copy.deepcopy(module)
    pefttorch.fuse_norms(fused)
    # an input dtype other than the weight's: the module promotes (float32 out), so must the switched one
    x = rand(3, 24, device=device)
    assert torch.equal(fused(x), module(x)) and fused(x).dtype == torch.float32
    wide = norm_module(24, torch.float32, device)  # a norm kept in float32 in a bf16 model
    wide_fused = copy.deepcopy(wide)
    pefttorch.fuse_norms(wide_fused)
    xb = rand(3, 24, dtype=torch.bfloat16, device=device)
    assert torch.equal(wide_fused(xb), wide(xb)) and wide_fused(xb).dtype == torch.float32
    # a half input under autocast: exactly the module's result and dtype
    xh = rand(3, 24, dtype=torch.bfloat16, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        assert torch.equal(fused(xh), module(xh))
    # NaN propagates, as in the module
    xn = xh.clone()
    xn[1, 3] = float("nan")
    assert torch.isnan(fused(xn)[1]).all() and not torch.isnan(fused(xn)[0]).any()
    # a wrong width is an error, not a broadcast
    with pytest.raises(RuntimeError):
        fused(rand(3, 23, dtype=torch.bfloat16, device=device))
    # empty input: empty output
    assert fused(xh[:0]).shape == (0, 24)


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_models_rmsnorms_are_switched_and_undone(name):
    model = fresh(name)
    batch = inputs(name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = logits(model, batch)
    norms = [n for n, m in model.named_modules() if "RMSNorm" in type(m).__name__ or "T5LayerNorm" in type(m).__name__]
    report = pefttorch.fuse_norms(model)
    assert sorted(report.switched) == sorted(norms) and norms and not report.skipped
    assert "RMSNorm(s) switched" in str(report)
    torch.testing.assert_close(logits(model, batch), before, rtol=1e-5, atol=1e-5)
    # in place: same keys, same values, the same modules
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    # switching twice changes nothing; a deep copy is switched on its own modules
    assert sorted(pefttorch.fuse_norms(model).switched) == sorted(norms)
    twin = copy.deepcopy(model)
    # a whole-model torch.save loads again (a bound method was pickled by a name no attribute has)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for copied in (twin, loaded):
        assert all(copied.get_submodule(n).forward.args[0] is copied.get_submodule(n) for n in norms)
    assert pefttorch.unfuse_norms(model) == len(norms)
    assert not any(is_fused_norm(m) for m in model.modules())
    assert torch.equal(logits(model, batch), before)
    for copied in (twin, loaded):
        assert all(is_fused_norm(copied.get_submodule(n)) for n in norms)
        torch.testing.assert_close(logits(copied, batch), before, rtol=1e-5, atol=1e-5)


def test_models_without_rmsnorm_are_untouched():
    for name in ("bert", "gpt2", "marian"):  # nn.LayerNorm: already one fused op, with a bias
        report = pefttorch.fuse_norms(fresh(name))
        assert not report.switched and not report.skipped, name


def test_rmsnorms_with_other_arithmetic_are_left_alone():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    # Gemma's RMSNorm multiplies by (1 + weight): the probe must catch it, whatever the class is called
    model = transformers.GemmaForCausalLM(transformers.GemmaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16))
    ids = torch.randint(0, 64, (2, 5))
    before = model(input_ids=ids).logits
    report = pefttorch.fuse_norms(model)
    assert not report.switched and len(report.skipped) == 3
    assert all("not x * rsqrt(mean(x^2) + eps) * weight" in why for why in report.skipped.values())
    assert "left as they were" in str(report)
    assert torch.equal(model(input_ids=ids).logits, before)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_a_layernorm_without_bias_is_left_alone_at_any_width(dtype):
    """Cohere's CohereLayerNorm subtracts the mean (a LayerNorm with no bias): on a zero-mean probe it was within
    bf16's tolerance of an RMSNorm at Command-R's widths, and was switched, off by half its output."""
    cohere = pytest.importorskip("transformers.models.cohere.modeling_cohere")
    torch.manual_seed(0)
    module = cohere.CohereLayerNorm(2048, eps=1e-5).to(dtype)
    with torch.no_grad():
        module.weight.copy_(rand(2048, dtype=dtype))
    x = rand(2, 5, 2048, dtype=dtype) + 1.0
    before = module(x)
    report = pefttorch.fuse_norms(torch.nn.Sequential(module))
    assert not report.switched and "not x * rsqrt" in report.skipped["0"]
    assert torch.equal(module(x), before)


def test_modules_the_probe_cannot_run_are_left_alone():
    class GatedRMSNorm(torch.nn.Module):  # a forward with a second required input
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(8))
            self.eps = 1e-6

        def forward(self, x, gate):
            return x * gate

    class NoEpsRMSNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(8))

    model = torch.nn.ModuleDict({"gated": GatedRMSNorm(), "noeps": NoEpsRMSNorm(),
                                 "meta": LlamaRMSNorm(8).to("meta")})
    report = pefttorch.fuse_norms(model)
    assert not report.switched
    assert "TypeError" in report.skipped["gated"]
    assert "no float eps" in report.skipped["noeps"]
    assert "meta device" in report.skipped["meta"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_lora_training_step_is_the_same_with_fused_norms(device, dtype):
    # pefttorch LoRA and HF PEFT's after accelerate: loss and every trainable gradient within the dtype's
    # tolerance of the same model without the switch, and the model trains (gradient checkpointing on, too)
    peft = pytest.importorskip("peft")
    family = FAMILIES["llama"]
    config = dict(r=4, lora_alpha=8, target_modules=family.targets, init_lora_weights=False)
    batch = {k: v.to(device) for k, v in inputs("llama").items()}
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=5e-2, atol=2e-2)
    def accelerated(base):
        model = peft.get_peft_model(base, peft.LoraConfig(**config))
        pefttorch.accelerate(model)
        return model

    for make in (lambda base: pefttorch.get_peft_model(base, pefttorch.LoraConfig(**config)), accelerated):
        for checkpointing in (False, True):
            results = []
            for switch in (False, True):
                model = make(fresh("llama").to(device=device, dtype=dtype)).train()
                if checkpointing:
                    model.gradient_checkpointing_enable()
                if switch:
                    assert len(pefttorch.fuse_norms(model).switched) == 5
                out = loss(model(**batch, labels=batch["input_ids"]))
                out.backward()
                results.append((out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
            (l0, g0), (l1, g1) = results
            torch.testing.assert_close(l1, l0, **tol)
            assert g0.keys() == g1.keys() and g0
            for n in g0:
                torch.testing.assert_close(g1[n], g0[n], **tol, msg=n)


def test_compiles_without_graph_break():
    module = norm_module(32, torch.float32, "cpu")
    pefttorch.fuse_norms(module)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    x = rand(4, 32, requires_grad=True)
    torch.testing.assert_close(compiled(x), module(x))


def test_the_probes_run_on_the_cpu_whatever_the_default_device():
    """fuse_norms' and fuse_rotary's probes drew their inputs on torch's default device: under torch.device("meta")
    (or a CUDA default with its CPU generator) they failed, fuse_rotary's outside its guard."""
    model = fresh("llama")
    try:
        with torch.device("meta"):
            assert pefttorch.fuse_norms(model).switched
            assert pefttorch.fuse_rotary(model).switched
    finally:
        pefttorch.unfuse_rotary()
