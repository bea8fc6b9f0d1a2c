"""torch.compile of a transformers model patched with pefttorch LoRA layers."""

from __future__ import annotations

import pytest
import torch
from hf_models import FAMILIES

from pefttorch import LoraConfig, get_peft_model

pytest.importorskip("transformers")


@pytest.mark.slow
def test_compiled_llama_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = get_peft_model(FAMILIES["llama"].build(), LoraConfig(r=4, target_modules="all-linear",
                                                                 init_lora_weights=False)).train()
    ids = torch.randint(1, 95, (2, 9), generator=torch.Generator().manual_seed(1))
    # our op must not be the cause of any graph break
    explanation = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons

    compiled = torch.compile(model)
    loss_c = compiled(input_ids=ids, labels=ids).loss
    grads_c = torch.autograd.grad(loss_c, [p for p in model.parameters() if p.requires_grad])
    loss = model(input_ids=ids, labels=ids).loss
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_c, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["adapter", "adalora", "increlora"])
def test_one_graph_with_dynamic_shapes_and_labels(method):
    """fullgraph=True and dynamic=True on a training forward with labels: bottleneck adapters broke the graph at
    math.isfinite of their (symbolic) scale, AdaLoRA/IncreLoRA at creating the orthogonality term's mask cache."""
    from hf_models import fresh, inputs

    import pefttorch

    configs = {"adapter": pefttorch.AdapterConfig(),
               "adalora": pefttorch.AdaLoraConfig(init_r=6, target_r=4, tinit=2, tfinal=4, deltaT=1, total_step=10,
                                                  target_modules=["query", "value"]),
               "increlora": pefttorch.IncreLoraConfig(target_rank=3, init_rank=1, incre_interval=2, init_warmup=2,
                                                      top_h=2, target_modules=["query", "value"])}
    model = pefttorch.get_peft_model(fresh("bert"), configs[method]).train()
    batch = inputs("bert")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(**batch).loss, model(**batch).loss)


def _method(name):
    import peft

    import pefttorch

    if name == "hf-peft+accelerate":
        model = peft.get_peft_model(FAMILIES["llama"].build(), peft.LoraConfig(r=4, target_modules="all-linear",
                                                                              init_lora_weights=False))
        pefttorch.accelerate(model)
        return model
    configs = {"lora+modules_to_save": LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False,
                                                  modules_to_save=["lm_head"]),
               "ia3": pefttorch.IA3Config(), "ssf": pefttorch.SsfConfig(), "ln_tuning": pefttorch.LNTuningConfig(),
               "prompt": pefttorch.PromptTuningConfig(num_virtual_tokens=3),
               "dept": pefttorch.DeptConfig(num_virtual_tokens=3)}
    return get_peft_model(FAMILIES["llama"].build(), configs[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora+modules_to_save", "ia3", "ssf", "ln_tuning", "prompt", "dept",
                                  "hf-peft+accelerate", "fused norms and rotary"])
def test_every_method_compiles_in_one_graph_with_eagers_gradients(name):
    """The README's promise for the other methods (and for accelerate, fuse_norms and fuse_rotary): no graph break,
    and eager's gradients. Only LoRA, prefix tuning, the density loss and the ranked methods were tested."""
    import pefttorch

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _method("lora+modules_to_save" if name == "fused norms and rotary" else name).train()
    if name == "fused norms and rotary":
        pefttorch.fuse_norms(model)
        pefttorch.fuse_rotary(model)
    try:
        ids = torch.randint(1, 95, (2, 9), generator=torch.Generator().manual_seed(1))
        params = [p for p in model.parameters() if p.requires_grad]
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        grads_c = torch.autograd.grad(compiled(input_ids=ids, labels=ids).loss, params)
        grads = torch.autograd.grad(model(input_ids=ids, labels=ids).loss, params)
        for a, b in zip(grads_c, grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    finally:
        pefttorch.unfuse_rotary()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ia3", "ssf", "adapter"])
def test_a_hooked_adapter_added_to_a_model_compiled_in_place_is_not_left_out(method):
    """torch.compile does not guard on module hooks by default: a base model compiled in place and run once (a
    baseline evaluation) kept its graph once (IA)^3, SSF or adapter hooks were added, and computed the base model in
    silence. The hooked methods make it guard, as the density loss does."""
    import pefttorch

    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=True):  # torch's default
        torch.compiler.reset()
        fam = FAMILIES["llama"]
        base = fam.build().eval()
        ids = fam.inputs(torch.Generator().manual_seed(0))["input_ids"]
        base.compile(backend="eager")
        with torch.no_grad():
            plain = base(input_ids=ids).logits
        config = {"ia3": pefttorch.IA3Config, "ssf": pefttorch.SsfConfig, "adapter": pefttorch.AdapterConfig}[method]()
        model = pefttorch.get_peft_model(base, config)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.5 * torch.randn_like(p))
            got = model(input_ids=ids).logits
            base._compiled_call_impl = None  # the same model, eager
            want = model(input_ids=ids).logits
        assert not torch.allclose(want, plain, atol=1e-3)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_model_without_hooks_leaves_the_compile_guards_alone():
    """BitFit and LayerNorm tuning swap parameters and add no hooks: copying such a model set the hook guards and
    reset every compiled graph of the process all the same."""
    import copy

    import pefttorch

    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=True):
        model = pefttorch.get_peft_model(FAMILIES["llama"].build(), pefttorch.LNTuningConfig())
        copy.deepcopy(model)
        assert torch._dynamo.config.skip_nnmodule_hook_guards is True
        copy.deepcopy(pefttorch.get_peft_model(FAMILIES["llama"].build(), pefttorch.IA3Config()))
        assert torch._dynamo.config.skip_nnmodule_hook_guards is False
