"""IncreLoRA and AdaLoRA: ranked layers, allocation schedules, importance scores, the rank-aware optimizer,
saving as a plain LoRA (loadable by HF PEFT), and the HF Trainer callback."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import warnings

import pytest
import torch
from helpers import DEVICES, assert_close_to_oracle, rand
from hf_models import FAMILIES
from torch import nn

import pefttorch
from pefttorch import AdaLoraConfig, IncreLoraConfig, LoraConfig, get_peft_model, reference
from pefttorch.optim import RankAwareAdamW
from pefttorch.tuners.rank import RankedLoraLayer

f64 = torch.float64


class Stack(nn.Module):
    """Linear layers of different shapes (none a multiple of 8), named like a transformer's projections."""

    def __init__(self, dims=(13, 17, 11, 19, 7), depth=2):
        super().__init__()
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            block = nn.Module()
            block.up = nn.Linear(dims[0], dims[1])
            block.mid = nn.Linear(dims[1], dims[2])
            block.down = nn.Linear(dims[2], dims[0])
            self.blocks.append(block)
        self.head = nn.Linear(dims[0], dims[4])

    def forward(self, x):
        for b in self.blocks:
            x = x + b.down(torch.tanh(b.mid(torch.tanh(b.up(x)))))
        return self.head(x)


TARGETS = ["up", "mid", "down"]


def incre(**kw):
    defaults = dict(target_modules=TARGETS, target_rank=3, init_rank=1, incre_interval=2, init_warmup=1, top_h=2,
                    incre_rank_num=2, lora_alpha=4)
    return IncreLoraConfig(**{**defaults, **kw})


def ada(**kw):
    defaults = dict(target_modules=TARGETS, init_r=6, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=10,
                    lora_alpha=4)
    return AdaLoraConfig(**{**defaults, **kw})


def build(config, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return get_peft_model(Stack().to(dtype), config)


def ranked_layers(model):
    """(name, layer) of every ranked layer, named as rank_pattern() names them (inside the wrapped model)."""
    inner = model.base_model.model if hasattr(model, "base_model") else model
    return [(n, m) for n, m in inner.named_modules() if isinstance(m, RankedLoraLayer)]


def randomize(model, scale=0.3):
    """Every component of every layer given a random effect (a, e and b all nonzero)."""
    with torch.no_grad():
        for _, layer in ranked_layers(model):
            for p in layer.factors("default"):
                p.copy_(torch.randn_like(p) * scale)


def statistics_tensors(allocator) -> list[torch.Tensor]:
    """The tensors the allocator's statistics live in."""
    if isinstance(allocator.ipt, torch.Tensor):
        return [allocator.ipt, allocator.unc]
    return [allocator._ipt_flat, allocator._unc_flat]


def statistics(allocator) -> torch.Tensor:
    """The allocator's smoothed scores, flat: IncreLoRA's one value per module, AdaLoRA's a tensor per factor."""
    if isinstance(allocator.ipt, torch.Tensor):
        return torch.cat([allocator.ipt, allocator.unc])
    return torch.cat([t.flatten() for ts in (*allocator.ipt, *allocator.unc) for t in ts])


def train_step(model, optimizer, x, step):
    loss = model(x).square().mean()
    loss.backward()
    optimizer.step()
    changed = model.update_and_allocate(step)
    optimizer.zero_grad()
    return changed


# ---------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("kw, match", [
    (dict(target_rank=1, init_rank=2), "target_rank .* below init_rank"),
    (dict(incre_interval=0), "incre_interval must be a positive integer"),
    (dict(top_h=0), "top_h must be a positive integer"),
    (dict(incre_rank_num=0), "incre_rank_num"),
    (dict(beta1=1.0), "beta1 must be in"),
    (dict(max_rank_per_module=2), "max_rank_per_module must be an integer >= target_rank"),
    (dict(score_sample=0), "score_sample"),
    (dict(rank_pattern={"up": 2}), "rank_pattern and alpha_pattern"),
    (dict(use_rslora=True), "use_rslora"),
    (dict(init_warmup=-1), "init_warmup"),
    (dict(lora_alpha=0), "lora_alpha must not be 0"),  # accepted, then save_pretrained divided by it
])
def test_increlora_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        incre(**kw)


def test_increlora_top_h_larger_than_modules_leaves_the_model_unchanged():
    model = Stack()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"top_h=7 is larger than the number of adapted modules \(6\)"):
        get_peft_model(model, incre(top_h=7))
    assert not any(isinstance(m, RankedLoraLayer) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kw, match", [
    (dict(target_r=7), "target_r .* above init_r"),
    (dict(total_step=None), "total_step"),
    (dict(tinit=8), "tinit .* must be below total_step - tfinal"),
    (dict(deltaT=0), "deltaT must be a positive integer"),
    (dict(beta2=0.0), "beta2 must be in"),
    (dict(lora_alpha=0.0), "lora_alpha must not be 0"),
])
def test_adalora_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        ada(**kw)


@pytest.mark.parametrize("make, fields", [(incre, "init_rank and target_rank"), (ada, "init_r and target_r")])
def test_r_is_ignored_with_a_warning_that_names_the_rank_fields(make, fields, recwarn):
    make()
    assert not [w for w in recwarn if "is ignored" in str(w.message)]  # the default r says nothing
    with pytest.warns(UserWarning, match=f"r=16 is ignored.*set {fields} instead") as caught:
        config = make(r=16)
    assert caught[0].filename == __file__  # points at the user's line, not into pefttorch
    assert config.target_modules is not None  # still a usable config


def test_unknown_field_is_named():
    with pytest.raises(TypeError, match="did you mean 'incre_interval'"):
        IncreLoraConfig(incre_intervall=3)


def test_one_ranked_adapter_per_model():
    model = build(incre())
    with pytest.raises(ValueError, match="holds one adapter"):
        model.add_adapter("second", incre())


# ---------------------------------------------------------------------------------------------- layers


@pytest.mark.parametrize("config", [incre(), incre(advance_learning=False), ada()], ids=["incre", "incre-noadv", "ada"])
def test_starts_as_the_base_model(config):
    torch.manual_seed(0)
    base = Stack()
    x = torch.randn(2, 5, 13)
    expected = base(x)
    model = get_peft_model(copy.deepcopy(base), config)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("config", [incre(), ada()], ids=["incre", "ada"])
def test_forward_is_base_plus_the_update_of_the_components_in_use(config):
    model = build(config)
    randomize(model)
    x = torch.randn(3, 1, 13)
    with torch.no_grad():
        y = model(x)
        base = copy.deepcopy(model).base_model
        for name, layer in ranked_layers(base.model):
            delta = layer.delta_weight("default")
            lin = layer.base_layer
            merged = nn.Linear(lin.in_features, lin.out_features)
            merged.weight.copy_(lin.weight + delta)
            merged.bias.copy_(lin.bias)
            parent = base.model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], merged)
        expected = base.model(x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_compute_follows_the_rank_in_use(monkeypatch):
    """The fused op sees only the components in use (rank + reserve), not the capacity."""
    model = build(incre(target_rank=5, incre_rank_num=2))
    seen = []
    real = pefttorch.ops.lora_linear_forward

    def spy(x, weight, a, b, *args, **kwargs):
        seen.append((a.shape[0], b.shape[1]))
        return real(x, weight, a, b, *args, **kwargs)

    monkeypatch.setattr(pefttorch.ops, "lora_linear_forward", spy)
    layers = ranked_layers(model)
    capacity = layers[0][1].lora_components["default"].capacity
    model(torch.randn(2, 13))
    assert seen and all(s == (3, 3) for s in seen) and capacity == 7  # rank 1 + reserve 2 of 7 slots
    c = layers[0][1].lora_components["default"]
    c.rank, c.reserve = 4, 0
    seen.clear()
    model(torch.randn(2, 13))
    assert seen[0] == (4, 4)


def test_reserve_e_and_unused_slots_get_no_gradient():
    model = build(incre())
    randomize(model, 0.1)
    model(torch.randn(4, 13)).square().sum().backward()
    for _, layer in ranked_layers(model):
        c = layer.lora_components["default"]
        a, e, b_t = layer.factors("default")
        assert e.grad[:c.rank].abs().sum() > 0 and a.grad[:c.in_use].abs().sum() > 0
        assert e.grad[c.rank:].abs().sum() == 0  # reserve e is fixed
        assert a.grad[c.in_use:].abs().sum() == 0 and b_t.grad[c.in_use:].abs().sum() == 0


def test_ranked_layer_gradcheck_float64():
    """Gradients of x, A, e and B^T through the layer (3 of 6 slots in use; no reserve, whose e is held
    fixed on purpose: see test_reserve_e_and_unused_slots_get_no_gradient)."""
    torch.manual_seed(0)
    layer = RankedLoraLayer(nn.Linear(5, 3).double())
    layer.update_layer("default", capacity=6, rank=3, reserve=0, lora_alpha=3.0, lora_dropout=0.0,
                       scale_by_rank=True, dtype=f64)
    layer.active_adapters = ["default"]
    x = torch.randn(4, 5, dtype=f64, requires_grad=True)
    factors = [torch.randn_like(p).requires_grad_() for p in layer.factors("default")]

    def f(x, a, e, b_t):
        params = {"lora_A.default": a, "lora_E.default": e, "lora_B_t.default": b_t}
        return torch.func.functional_call(layer, params, (x,))

    assert torch.autograd.gradcheck(f, (x, *factors))


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_ranked_layer_refuses_torch_func_transforms_with_a_clear_error():
    """torch.func.grad (and vmap with grad) failed inside functorch with "must override the setup_context
    staticmethod", naming neither the layer nor the reason; without a gradient, vmap runs as before."""
    torch.manual_seed(0)
    layer = RankedLoraLayer(nn.Linear(5, 3).double())
    layer.update_layer("default", capacity=6, rank=3, reserve=0, lora_alpha=3.0, lora_dropout=0.0,
                       scale_by_rank=True, dtype=f64)
    layer.active_adapters = ["default"]
    params = {n: p.detach().clone() for n, p in layer.named_parameters() if p.requires_grad}
    x = torch.randn(2, 4, 5, dtype=f64)

    def loss(params, x):
        return torch.func.functional_call(layer, params, (x,)).square().sum()

    with pytest.raises(NotImplementedError, match="IncreLoRA/AdaLoRA layers cannot be differentiated by torch.func"):
        torch.func.grad(loss)(params, x[0])
    with torch.no_grad():
        torch.testing.assert_close(torch.func.vmap(layer)(x), layer(x))


def test_ranked_layer_refuses_a_second_derivative():
    """A gradient penalty through the layer (create_graph=True) is refused: its backward kernels have no derivative,
    and the penalty's gradient once came out without their share, silently."""
    torch.manual_seed(0)
    layer = RankedLoraLayer(nn.Linear(5, 3).double())
    layer.update_layer("default", capacity=6, rank=3, reserve=0, lora_alpha=3.0, lora_dropout=0.0,
                       scale_by_rank=True, dtype=f64)
    layer.active_adapters = ["default"]
    factors = [torch.randn_like(p).requires_grad_() for p in layer.factors("default")]
    params = dict(zip(["lora_A.default", "lora_E.default", "lora_B_t.default"], factors, strict=True))
    y = torch.func.functional_call(layer, params, (torch.randn(4, 5, dtype=f64),))
    grads = torch.autograd.grad(y.square().sum(), factors, create_graph=True)
    with pytest.raises(RuntimeError, match=r"ranked LoRA layer .* has no second derivative"):
        torch.autograd.grad(sum((g * g).sum() for g in grads), factors)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reserve, dropout, bias", [(0, 0.0, False), (2, 0.0, True), (2, 0.25, False)])
def test_ranked_layer_forward_and_gradients_match_the_reference(device, dtype, reserve, dropout, bias):
    """The layer's single autograd node against the composed reference: output and the gradients of x, the
    bias and the three factors (float32 storage, as next to a 16-bit base), on a strided 3-D input, with and
    without reserve components and dropout. Errors are bounded against a float64 oracle."""
    torch.manual_seed(0)
    linear = nn.Linear(13, 17).to(device, dtype)
    linear.weight.requires_grad_(False)
    linear.bias.requires_grad_(bias)
    layer = RankedLoraLayer(linear)
    layer.update_layer("default", capacity=9, rank=3, reserve=reserve, lora_alpha=6.0, lora_dropout=dropout,
                       scale_by_rank=True, dtype=torch.float32)
    layer.active_adapters = ["default"]
    layer.train()
    with torch.no_grad():
        for p in layer.factors("default"):
            p.copy_(rand(*p.shape, device=device, scale=0.5))
    c = layer.lora_components["default"]
    x = rand(3, 5, 26, dtype=dtype, device=device)[..., ::2].requires_grad_()  # strided view, 13 features
    grad_y = rand(3, 5, 17, dtype=dtype, device=device)

    torch.manual_seed(11)
    y = layer(x)
    y.backward(grad_y)
    torch.manual_seed(11)
    seed = int(pefttorch.functional.draw_seed()) if dropout else None  # the layer's draw, repeated

    def run_reference(cast):
        inputs = [t.detach().to(cast(t)).requires_grad_() for t in (x, *layer.factors("default"))]
        bias_ = linear.bias.detach().to(cast(linear.bias)).requires_grad_(bias)
        out = reference.ranked_lora_linear(inputs[0], linear.weight.to(cast(linear.weight)), bias_, *inputs[1:],
                                           rank=c.rank, in_use=c.in_use, scaling=c.scaling, dropout_p=dropout,
                                           seed=seed)
        out.backward(grad_y.to(out.dtype))
        return [out, *(t.grad for t in inputs), bias_.grad if bias else None]

    baseline = run_reference(lambda t: t.dtype)
    oracle = run_reference(lambda t: torch.float64)
    got = [y, x.grad, *(p.grad for p in layer.factors("default")), linear.bias.grad if bias else None]
    for name, out, base, exact in zip(("y", "x", "A", "E", "B_t", "bias"), got, baseline, oracle, strict=True):
        if exact is None:
            assert out is None, name
            continue
        assert_close_to_oracle(name, out, base, exact)
    assert (layer.lora_E["default"].grad[c.rank:] == 0).all()  # reserve and unused e: fixed
    for p in (layer.lora_A["default"], layer.lora_B_t["default"]):
        assert (p.grad[c.in_use:] == 0).all()  # unused slots


def test_ranked_layer_under_autocast_computes_in_its_dtype():
    """As F.linear: under torch.autocast the layer computes in the autocast dtype (the float32 factors cast to it)
    and its gradients reach the float32 storage."""
    torch.manual_seed(0)
    layer = RankedLoraLayer(nn.Linear(13, 7))
    layer.update_layer("default", capacity=6, rank=3, reserve=1, lora_alpha=3.0, lora_dropout=0.0,
                       scale_by_rank=True)
    layer.active_adapters = ["default"]
    with torch.no_grad():
        for p in layer.factors("default"):
            p.normal_()
    x = torch.randn(4, 13)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    expected = copy.deepcopy(layer)  # the base in bfloat16, the factors left in float32 (the layer casts them)
    expected.base_layer.to(torch.bfloat16)
    expected = expected(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected)
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.factors("default"))


# ---------------------------------------------------------------------------------------------- IncreLoRA


def test_increlora_schedule_reaches_the_budget_exactly():
    config = incre(target_rank=3, incre_interval=2, init_warmup=1, top_h=2, incre_rank_num=2)
    model = build(config)
    opt = RankAwareAdamW(model.parameters(), lr=1e-2)
    x = torch.randn(8, 13)
    history = {}
    for step in range(30):
        changed = train_step(model, opt, x, step)
        if changed:
            history[step] = changed
    modules = len(ranked_layers(model))
    assert sum(model.rank_pattern().values()) == 3 * modules  # exactly the budget
    # allocations only after init_warmup, on multiples of incre_interval, to at most top_h modules each
    assert all(s > 1 and s % 2 == 0 for s in history)
    assert all(1 <= len(c) <= 2 for c in history.values())
    # 6 modules from 6 to 18: 12 ranks, 2 modules x 2 per event: three events
    assert len(history) == 3 and all(len(c) == 2 for c in history.values())
    assert model.base_model.allocator.finished
    assert all(layer.lora_components["default"].reserve == 0 for _, layer in ranked_layers(model))
    assert all(layer.lora_components["default"].tile is None for _, layer in ranked_layers(model))
    before = model.rank_pattern()
    for step in range(30, 35):
        assert train_step(model, opt, x, step) is None
    assert model.rank_pattern() == before


@pytest.mark.parametrize("make", [incre, ada], ids=["incre", "ada"])
def test_steps_only_go_forward(make, tmp_path):
    """A second call for the same step (once per micro-batch under gradient accumulation) scored the same gradients
    again and, in IncreLoRA, allocated again: four calls per step grew a module by four ranks at one event."""
    model = build(make(**({"init_warmup": 0, "incre_interval": 1} if make is incre else {})))
    opt = RankAwareAdamW(model.parameters(), lr=1e-2)
    x = torch.randn(8, 13)
    model(x).square().mean().backward()
    opt.step()
    model.update_and_allocate(2)
    allocator = model.base_model.allocator

    ranks, events, before = model.rank_pattern(), list(allocator.events), statistics(allocator).clone()
    assert before.abs().sum() > 0
    with pytest.warns(UserWarning, match=r"update_and_allocate\(2\) was called for step 2 already: ignored"):
        assert model.update_and_allocate(2) is None
    assert model.rank_pattern() == ranks and allocator.events == events
    assert torch.equal(statistics(allocator), before)
    with pytest.raises(ValueError, match=r"update_and_allocate\(1\) after step 2: steps only go forward"):
        model.update_and_allocate(1)
    torch.save(model.state_dict(), tmp_path / "state.pt")  # the last step is part of the schedule's state
    loaded = build(make(**({"init_warmup": 0, "incre_interval": 1} if make is incre else {})), seed=1)
    loaded.load_state_dict(torch.load(tmp_path / "state.pt"))
    with pytest.raises(ValueError, match="after step 2"):
        loaded.update_and_allocate(0)


def test_increlora_gives_ranks_to_the_highest_scores(monkeypatch):
    model = build(incre(target_rank=4, incre_rank_num=1, top_h=2, init_warmup=0, incre_interval=1,
                        max_rank_per_module=5))
    allocator = model.base_model.allocator
    names = [n for n, _ in ranked_layers(model)]
    scores = torch.tensor([0.5, 3.0, 0.1, 2.0, 1.0, 0.2])
    monkeypatch.setattr(allocator, "score_vector", lambda: scores)
    grown = allocator.allocate(step=1)
    assert set(grown) == {names[1], names[3]}
    assert model.rank_pattern()[names[1]] == 2 and model.rank_pattern()[names[0]] == 1


def test_increlora_respects_max_rank_per_module(monkeypatch):
    model = build(incre(target_rank=3, incre_rank_num=2, top_h=1, init_warmup=0, incre_interval=1,
                        max_rank_per_module=4))
    allocator = model.base_model.allocator
    monkeypatch.setattr(allocator, "score_vector", lambda: torch.tensor([9.0, 1, 1, 1, 1, 1]))
    for step in range(1, 4):
        allocator.allocate(step)
    first = ranked_layers(model)[0][0]
    assert model.rank_pattern()[first] == 4  # 1 + 2 + 1 (capped), then the next best module


def test_increlora_outgrowing_its_storage_under_data_parallelism_changes_nothing(monkeypatch):
    """Under data parallelism a module may not outgrow its storage (DDP cannot follow new parameters): the error came
    only once the module's e was rescaled, its rank raised and its reserve used, and after the modules ranked above it
    had grown; the history missed the event. Every module's storage is now checked before any changes."""
    import pefttorch.tuners.rank.allocator as allocator_module

    model = build(incre())  # capacity target_rank + reserve = 5, no max_rank_per_module
    randomize(model)
    allocator = model.base_model.allocator
    monkeypatch.setattr(allocator_module, "data_parallel", lambda: True)  # only checked here: no collective runs
    monkeypatch.setattr(allocator, "score_vector", lambda: torch.tensor([9.0, 8, 1, 1, 1, 1]))
    allocator.allocate(step=2)  # the first two modules: rank 3, reserve 2 refilled, their storage full
    # the third module first (it fits), then the first, which would need 3 + 2 + a refill of 2 components
    monkeypatch.setattr(allocator, "score_vector", lambda: torch.tensor([8.0, 1, 9, 1, 1, 1]))
    before = copy.deepcopy(model.state_dict()), model.rank_pattern(), copy.deepcopy(allocator.events)
    reserves = [allocator.components(layer).reserve for _, layer in allocator.layers]
    with pytest.raises(RuntimeError, match=r"blocks\.0\.up outgrew its storage \(5 components\)"):
        allocator.allocate(step=4)
    assert model.rank_pattern() == before[1] and allocator.events == before[2]
    assert [allocator.components(layer).reserve for _, layer in allocator.layers] == reserves
    assert model.state_dict().keys() == before[0].keys()
    for key, value in before[0].items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("advance", [True, False])
def test_increlora_allocation_leaves_the_output_unchanged(advance):
    config = incre(target_rank=4, incre_interval=1, init_warmup=0, top_h=3, incre_rank_num=1,
                   advance_learning=advance)
    model = build(config)
    opt = RankAwareAdamW(model.parameters(), lr=5e-2)
    x = torch.randn(6, 13)
    checked = 0
    for step in range(12):
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        with torch.no_grad():
            before = model(x)
        changed = model.update_and_allocate(step)
        with torch.no_grad():
            after = model(x)
        opt.zero_grad()
        if changed and not model.base_model.allocator.finished:
            torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
            checked += 1
    assert checked >= 2


def test_increlora_capacity_grows_without_replacing_parameters():
    config = incre(target_rank=6, incre_rank_num=3, top_h=1, init_warmup=0, incre_interval=1)
    model = build(config)
    layer = ranked_layers(model)[0][1]
    c = layer.lora_components["default"]
    ids_before = [id(p) for p in layer.factors("default")]
    opt = RankAwareAdamW(model.parameters(), lr=1e-2)
    x = torch.randn(4, 13)
    allocator = model.base_model.allocator
    scores = torch.zeros(6)
    scores[0] = 1.0
    allocator.score_vector = lambda: scores
    start = c.capacity
    for step in range(1, 6):
        train_step(model, opt, x, step)
    assert c.rank > start - c.reserve and c.capacity > start
    assert [id(p) for p in layer.factors("default")] == ids_before
    train_step(model, opt, x, 7)  # the optimizer copes with the new shape


def _adafactor(ps):
    from transformers.optimization import Adafactor  # the HF Trainer's optim="adafactor"

    return Adafactor(ps, lr=1e-2, relative_step=False, scale_parameter=False)


@pytest.mark.parametrize(("make_optimizer", "fresh"), [
    (lambda ps: torch.optim.AdamW(ps, lr=1e-2), {}),
    (lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True), {}),  # wrote out of bounds (heap corruption) before
    (lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9), {}),
    (lambda ps: torch.optim.Adagrad(ps, lr=1e-2, initial_accumulator_value=0.1), {"sum": 0.1}),
    (lambda ps: torch.optim.Rprop(ps, lr=1e-2), {"step_size": 1e-2}),  # new rows at 0 never moved
    (_adafactor, {}),  # its factored row moments (1-D) were not resized: a shape error at the next step
], ids=["adamw", "adamw-fused", "sgd-momentum", "adagrad", "rprop", "adafactor"])
def test_a_stock_optimizer_keeps_running_when_the_storage_grows(make_optimizer, fresh):
    pytest.importorskip("transformers")
    config = incre(target_rank=6, incre_rank_num=3, top_h=1, init_warmup=0, incre_interval=1)
    model = build(config)
    layer = ranked_layers(model)[0][1]
    c = layer.lora_components["default"]
    scores = torch.zeros(6)
    scores[0] = 1.0
    model.base_model.allocator.score_vector = lambda: scores
    opt = make_optimizer(model.parameters())
    x = torch.randn(4, 13)
    start = c.capacity
    step = 1
    while c.capacity == start:
        train_step(model, opt, x, step)
        step += 1
    a = layer.lora_A["default"]
    old = {k: v.clone() for k, v in opt.state[a].items() if isinstance(v, torch.Tensor) and v.dim() > 0}
    assert any(v.shape[0] == start for v in old.values())
    opt.step()  # no gradients (zero_grad set them to None): the step only fits the state
    for key, value in old.items():
        fitted = opt.state[a][key]
        if value.shape[0] != start:  # Adafactor's column factor: not per row
            assert torch.equal(fitted, value)
            continue
        assert fitted.shape[0] == a.shape[0]
        torch.testing.assert_close(fitted[:start], value, rtol=0, atol=0)
        assert (fitted[start:] == fresh.get(key, 0.0)).all(), key  # new slots: the optimizer's fresh state
    for _ in range(3):
        train_step(model, opt, x, step)
        step += 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_stock_optimizers_state_of_an_unknown_layout_is_refused_by_name():
    config = incre(target_rank=6, incre_rank_num=3, top_h=1, init_warmup=0, incre_interval=1)
    model = build(config)
    layer = ranked_layers(model)[0][1]
    scores = torch.zeros(6)
    scores[0] = 1.0
    model.base_model.allocator.score_vector = lambda: scores
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    a, start = layer.lora_A["default"], layer.lora_components["default"].capacity
    opt.state[a]["odd"] = torch.zeros(start, 2)  # a layout no optimizer here keeps
    x = torch.randn(4, 13)
    with pytest.raises(RuntimeError, match=r"SGD keeps state 'odd' of shape \(\d+, 2\) .*RankAwareAdamW"):
        for step in range(1, 10):
            train_step(model, opt, x, step)


def _exact_update_gradients(model, x):
    """dL/d(dW) of every ranked layer, with dW materialised as a leaf (the reference the score estimates)."""
    work = copy.deepcopy(model)
    leaves, handles = {}, []
    for name, layer in ranked_layers(work):
        dw = layer.delta_weight("default").detach().requires_grad_()
        leaves[name] = dw

        def hook(module, args, output, dw=dw):
            return module.base_layer(args[0]) + args[0] @ dw.t()

        handles.append(layer.register_forward_hook(hook))
    work(x).square().mean().backward()
    return {n: d.grad for n, d in leaves.items()}


def test_increlora_exact_score_matches_materialised_reference():
    model = build(incre(score_sample=None))
    randomize(model)
    x = torch.randn(5, 2, 13)
    grads = _exact_update_gradients(model, x)
    model(x).square().mean().backward()
    scores = model.base_model.allocator.scores()
    for (name, layer), s in zip(ranked_layers(model), scores, strict=True):
        dw = layer.delta_weight("default").double()
        expected = (dw * grads[name].double()).abs().sum() / math.sqrt(dw.numel())
        torch.testing.assert_close(s.double(), expected, rtol=1e-4, atol=1e-9)


def test_increlora_sampled_score_matches_reference_on_its_grid():
    model = build(incre(score_sample=4))
    randomize(model)
    x = torch.randn(7, 13)
    grads = _exact_update_gradients(model, x)
    model(x).square().mean().backward()
    allocator = model.base_model.allocator
    layers = ranked_layers(model)
    for name, layer in layers:
        c = layer.lora_components["default"]
        r0, rs, c0, cs = c.sample
        assert rs > 1 or cs > 1
        torch.testing.assert_close(c.tile, grads[name][r0::rs, c0::cs], rtol=1e-4, atol=1e-6)
    a = [layer.lora_A["default"] for _, layer in layers]
    e = [layer.lora_E["default"] for _, layer in layers]
    b = [layer.lora_B_t["default"].t() for _, layer in layers]
    cs_ = [layer.lora_components["default"] for _, layer in layers]
    weights = [c.scaling * c.sample[1] * c.sample[3] / math.sqrt(m.in_features * m.out_features)
               for c, (_, m) in zip(cs_, layers, strict=True)]
    expected = reference.rank_importance(a, b, e, [c.tile for c in cs_], [c.sample[0] for c in cs_],
                                         [c.sample[1] for c in cs_], [c.sample[2] for c in cs_],
                                         [c.sample[3] for c in cs_], [c.in_use for c in cs_], weights)
    torch.testing.assert_close(allocator.scores(), expected, rtol=1e-5, atol=1e-9)


def test_increlora_sampled_score_is_unbiased():
    """Averaged over the grid offsets, the sampled score is the exact one."""
    model = build(incre(score_sample=None))
    randomize(model)
    x = torch.randn(6, 13)
    model(x).square().mean().backward()
    allocator = model.base_model.allocator
    exact = allocator.scores().double()
    totals = torch.zeros_like(exact)
    count = 0
    for _, layer in ranked_layers(model):
        c = layer.lora_components["default"]
        assert c.sample == (0, 1, 0, 1)
    full = {n: layer.lora_components["default"].tile.clone() for n, layer in ranked_layers(model)}
    # every offset pair of a stride-3 grid, each equally likely: their mean is the expectation
    for r0 in range(3):
        for c0 in range(3):
            for n, layer in ranked_layers(model):
                c = layer.lora_components["default"]
                c.sample = (r0, 3, c0, 3)
                c.tile = full[n][r0::3, c0::3].clone()
            totals += allocator.scores().double()
            count += 1
    torch.testing.assert_close(totals / count, exact, rtol=1e-5, atol=1e-9)


def test_increlora_estimate_ranks_modules_like_the_exact_score():
    """On a small model trained a few steps, the sampled estimate (about a quarter of the entries of each
    update) orders the modules as the exact score does."""
    torch.manual_seed(0)
    dims = (40, 48, 36, 44, 8)
    base = Stack(dims, depth=3)
    kw = dict(target_modules=TARGETS, target_rank=4, init_rank=2, incre_interval=1000, init_warmup=1000, top_h=1)
    exact = get_peft_model(copy.deepcopy(base), IncreLoraConfig(score_sample=None, **kw))
    sampled = get_peft_model(copy.deepcopy(base), IncreLoraConfig(score_sample=20, **kw))
    sampled.load_state_dict(exact.state_dict())
    for m in (exact, sampled):
        randomize_gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, layer in ranked_layers(m):
                for p in layer.factors("default"):
                    p.copy_(torch.randn(p.shape, generator=randomize_gen) * 0.2)
            # modules of very different importance: scale each layer's update
            for i, (_, layer) in enumerate(ranked_layers(m)):
                layer.lora_E["default"].mul_(0.2 * 1.6**i)
    opts = [RankAwareAdamW(m.parameters(), lr=1e-3) for m in (exact, sampled)]
    g = torch.Generator().manual_seed(2)
    for step in range(12):
        x = torch.randn(16, dims[0], generator=g)
        for m, opt in zip((exact, sampled), opts, strict=True):
            train_step(m, opt, x, step)
    s_exact = exact.base_model.allocator.score_vector()
    s_sampled = sampled.base_model.allocator.score_vector()
    rank_exact = s_exact.argsort().argsort().double()
    rank_sampled = s_sampled.argsort().argsort().double()
    spearman = torch.corrcoef(torch.stack([rank_exact, rank_sampled]))[0, 1]
    assert spearman > 0.8, (s_exact, s_sampled)
    assert set(s_exact.topk(2).indices.tolist()) == set(s_sampled.topk(2).indices.tolist())


def test_increlora_nan_scores_raise():
    model = build(incre(init_warmup=0, incre_interval=1))
    allocator = model.base_model.allocator
    allocator.score_vector = lambda: torch.tensor([1.0, float("nan"), 0, 0, 0, 0])
    with pytest.raises(FloatingPointError, match="not finite"):
        allocator.allocate(1)


# ---------------------------------------------------------------------------------------------- AdaLoRA


def _peft_budget(config, step, init_bgt, target_bgt):
    """HF PEFT's budget schedule, written out from its definition."""
    if step <= config.tinit:
        return init_bgt, False
    if step > config.total_step - config.tfinal:
        return target_bgt, True
    mul = 1 - (step - config.tinit) / (config.total_step - config.tfinal - config.tinit)
    return int((init_bgt - target_bgt) * mul**3 + target_bgt), step % config.deltaT == 0


def test_adalora_budget_schedule_is_peft_s():
    config = ada(tinit=3, tfinal=4, total_step=40, deltaT=3)
    model = build(config)
    allocator = model.base_model.allocator
    for step in range(40):
        ours = allocator.budget(step)
        theirs = _peft_budget(config, step, allocator.init_total, allocator.target_total)
        if step == config.total_step - config.tfinal:  # PEFT forces the final mask at this step
            theirs = (allocator.target_total, True)
        assert ours == theirs, step


def test_adalora_prunes_to_the_budget_and_shrinks_compute():
    config = ada(init_r=6, target_r=2, tinit=1, tfinal=2, total_step=10, deltaT=1)
    model = build(config)
    opt = RankAwareAdamW(model.parameters(), lr=1e-2)
    x = torch.randn(8, 13)
    allocator = model.base_model.allocator
    for step in range(12):
        train_step(model, opt, x, step)
        budget, _ = allocator.budget(step)
        assert sum(model.rank_pattern().values()) == min(budget, allocator.init_total)
    assert sum(model.rank_pattern().values()) == 2 * 6
    assert allocator.finished
    for _, layer in ranked_layers(model):
        c = layer.lora_components["default"]
        assert c.in_use == c.rank  # the op computes only these
    # train, then cast for inference: once a ValueError, the finished allocator had no statistics to move
    with torch.no_grad():
        want = model(x).double()
        torch.testing.assert_close(model.to(torch.float64)(x.double()), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", [incre(incre_interval=100, init_warmup=100), ada(tinit=8, total_step=20)],
                         ids=["incre", "ada"])
def test_a_step_with_overflowed_gradients_leaves_the_statistics_as_they_were(config):
    """GradScaler skips the optimizer step when gradients overflow (fp16 training does at its start); the
    statistics took the step's inf or NaN in for good, and the next allocation failed. Now such a step is a
    no-op for them, and the next good step updates them as before."""
    model = build(config)
    randomize(model)
    allocator = model.base_model.allocator
    opt = RankAwareAdamW(model.parameters(), lr=1e-3)
    x = torch.randn(8, 13)

    for step in range(3):
        train_step(model, opt, x, step)
    before = statistics(allocator).clone()
    assert before.abs().sum() > 0 and torch.isfinite(before).all()
    (model(x).square().mean() * float("inf")).backward()  # every gradient inf or NaN: the scaler skips opt.step()
    model.update_and_allocate(3)
    opt.zero_grad()
    assert torch.equal(statistics(allocator), before)
    train_step(model, opt, x, 4)
    after = statistics(allocator)
    assert torch.isfinite(after).all() and not torch.equal(after, before)


@pytest.mark.parametrize("method", ["incre", "ada"])
def test_state_dict_carries_the_schedule(method):
    """The allocator's state is in the model's state dict: a model loaded from a mid-run state dict goes on as the
    original does (same events, same statistics), also when loaded into a model whose schedule had finished, and
    into one built on the meta device (loaded with assign=True, or materialized by to_empty first), whose
    statistics stayed on meta (the load was dropped, and the first step failed)."""
    config = incre(score_sample=4) if method == "incre" else ada(tinit=1, tfinal=2, total_step=10)
    x = torch.randn(8, 13)

    def steps(model, opt, start, stop):
        for step in range(start, stop):
            torch.manual_seed(step)  # components drawn at an event come from the global generator
            train_step(model, opt, x, step)

    model = build(config)
    randomize(model)
    opt = RankAwareAdamW(model.parameters(), lr=1e-2)
    steps(model, opt, 0, 3)
    state, opt_state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    steps(model, opt, 3, 12)
    assert model.base_model.allocator.finished
    final, events = model.rank_pattern(), copy.deepcopy(model.base_model.allocator.events)
    final_statistics = statistics(model.base_model.allocator) if method == "incre" else None

    def on_meta():
        with torch.device("meta"):
            return get_peft_model(Stack(), config)

    # a fresh model, one whose schedule finished (and grew, IncreLoRA), and two built on the meta device
    for other, how in ((build(config), None), (model, None), (on_meta(), "assign"), (on_meta(), "to_empty")):
        if how == "to_empty":
            other.to_empty(device="cpu")
        other.load_state_dict(copy.deepcopy(state), assign=how == "assign")  # assign keeps the given tensors
        assert not other.base_model.allocator.finished and len(other.base_model.allocator.events) <= 3
        other_opt = RankAwareAdamW(other.parameters(), lr=1e-2)
        other_opt.load_state_dict(copy.deepcopy(opt_state))  # torch's load keeps the given tensors: one copy each
        steps(other, other_opt, 3, 12)
        assert other.rank_pattern() == final and other.base_model.allocator.events == events
        assert other.base_model.allocator.finished
        if final_statistics is not None:  # AdaLoRA's are freed at the end
            torch.testing.assert_close(statistics(other.base_model.allocator), final_statistics, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["incre", "ada"])
def test_a_state_dict_without_allocator_state_loads_strictly_with_a_warning(method):
    """A checkpoint saved before the allocator's state went into the state dict failed a strict load (its
    _extra_state key missing); it loads its ranks and weights, and says the schedule starts fresh."""
    config = incre(score_sample=4) if method == "incre" else ada(tinit=1, tfinal=2, total_step=10)
    x = torch.randn(8, 13)
    model = build(config)
    randomize(model)
    opt = RankAwareAdamW(model.parameters(), lr=1e-2)
    for step in range(5):
        train_step(model, opt, x, step)
    state = {k: v for k, v in model.state_dict().items() if k != "base_model._extra_state"}
    other = build(config)
    with pytest.warns(UserWarning, match="no allocator state"):
        result = other.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert other.rank_pattern() == model.rank_pattern()
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="Missing key"):  # any other key is still missing
        build(config).load_state_dict({k: v for k, v in state.items() if "base_layer" not in k}, strict=True)
    # into a model built on the meta device, with assign=True: the fresh statistics come off meta too (they stayed
    # there, and the first step failed)
    with torch.device("meta"):
        on_meta = get_peft_model(Stack(), config)
    with pytest.warns(UserWarning, match="no allocator state"):
        on_meta.load_state_dict(copy.deepcopy(state), strict=True, assign=True)
    assert not any(t.is_meta for t in statistics_tensors(on_meta.base_model.allocator))
    train_step(on_meta, RankAwareAdamW(on_meta.parameters(), lr=1e-2), x, 5)
    # strict=False with the factors alone (swapping weights into a live model): the allocator keeps its statistics,
    # and the key is reported missing like any other, with no word of an old checkpoint
    allocator = model.base_model.allocator
    kept = model.base_model.get_extra_state()  # the allocator's whole state, serialised
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = model.load_state_dict({k: v for k, v in state.items() if "lora_" in k}, strict=False)
    assert "base_model._extra_state" in result.missing_keys
    assert torch.equal(model.base_model.get_extra_state(), kept) and allocator.events


def _trained(config, steps=3):
    model = build(config)
    randomize(model)
    opt = RankAwareAdamW(model.parameters(), lr=1e-2)
    x = torch.randn(8, 13)
    for step in range(steps):
        train_step(model, opt, x, step)
    return model


def _allocator_state(model) -> dict:
    import io

    return torch.load(io.BytesIO(model.base_model.get_extra_state().numpy().tobytes()), weights_only=True)


@pytest.mark.parametrize("saved, into, match", [
    (incre(), incre(target_modules=["up", "down"]), r"IncreLoRA: the allocator state is of other modules than this "
     r"model's \(only in the state dict: blocks\.0\.mid, blocks\.1\.mid; only in this model: none\)"),
    (ada(target_modules=["up", "down"]), ada(), r"AdaLoRA: the allocator state is of other modules .*only in the "
     r"state dict: none; only in this model: blocks\.0\.mid, blocks\.1\.mid\)"),
    (incre(), ada(), "AdaLoRA: the state dict's allocator state is IncreLoRA's"),
    (ada(), incre(), "IncreLoRA: the state dict's allocator state is AdaLoRA's"),
])
def test_a_state_dict_of_another_method_or_other_modules_is_refused_before_anything_loads(saved, into, match):
    """Such a load failed with errors that named nothing (tensor sizes, a 0-d tensor iterated, copy_ of a list),
    or (AdaLoRA, statistics paired by position) named the wrong module after overwriting others; now it names the
    mismatch, and the model (weights, ranks, allocator) is as it was."""
    state = _trained(saved).state_dict()
    model = _trained(into)
    before, allocator = copy.deepcopy(model.state_dict()), model.base_model.get_extra_state()
    with pytest.raises(ValueError, match=match):
        model.load_state_dict(state, strict=False)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(model.base_model.get_extra_state(), allocator)
    # the way out the message gives: the weights alone load
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (of a state dict without allocator state)
        model.load_state_dict({k: v for k, v in state.items() if k != "base_model._extra_state"}, strict=False)


@pytest.mark.parametrize("method", ["incre", "ada"])
def test_allocator_statistics_are_matched_by_module_path_and_old_states_still_load(method):
    """The saved statistics are paired with the modules by path (they were paired by position); a state saved
    before the paths were kept still loads by position, and one of another module count is refused by name."""
    config = incre(score_sample=4) if method == "incre" else ada(tinit=1, tfinal=2, total_step=10)
    model = _trained(config)
    allocator, state = model.base_model.allocator, _allocator_state(model)
    expected = statistics(allocator)
    other = build(config)
    # the same state with its modules listed in another order: each module still gets its own statistics
    order = list(reversed(range(len(state["modules"]))))
    shuffled = {**state, "modules": [state["modules"][i] for i in order]}
    if method == "incre":
        shuffled.update(ipt=state["ipt"][order], unc=state["unc"][order], samples=[state["samples"][i] for i in order])
    else:
        shuffled.update(ipt=[state["ipt"][i] for i in order], unc=[state["unc"][i] for i in order])
    other.base_model.allocator.load_state_dict(shuffled)
    torch.testing.assert_close(statistics(other.base_model.allocator), expected, rtol=0, atol=0)
    if method == "incre":
        assert [other.base_model.allocator.components(layer).sample for _, layer in allocator.layers] == \
            [allocator.components(layer).sample for _, layer in allocator.layers]
    # saved before the method and the paths were kept: by position, as then
    old = {k: v for k, v in state.items() if k not in ("method", "modules")}
    fresh = build(config)
    fresh.base_model.allocator.load_state_dict(old)
    torch.testing.assert_close(statistics(fresh.base_model.allocator), expected, rtol=0, atol=0)
    fewer = build(dataclasses.replace(config, target_modules=["up", "down"]))
    kept = statistics(fewer.base_model.allocator).clone()
    with pytest.raises(ValueError, match="holds statistics of 6 modules, this model adapts 4"):
        fewer.base_model.allocator.load_state_dict(old)
    torch.testing.assert_close(statistics(fewer.base_model.allocator), kept, rtol=0, atol=0)


def test_adalora_checks_every_saved_shape_before_it_copies_any():
    model, other = _trained(ada()), build(ada())
    state = _allocator_state(model)
    state["unc"][-1] = [t[:, :1] if t.dim() == 2 and t.shape[1] > 1 else t for t in state["unc"][-1]]
    kept = statistics(other.base_model.allocator).clone()
    with pytest.raises(ValueError, match=r"the saved unc of blocks\.1\.down has shape"):
        other.base_model.allocator.load_state_dict(state)
    torch.testing.assert_close(statistics(other.base_model.allocator), kept, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["incre", "ada"])
def test_a_model_split_over_devices_is_refused_up_front(method):
    """The allocators keep one buffer for all modules and rank them together: a model split over devices
    (device_map="auto" on several GPUs) failed at the first allocation; it is refused by name at the start."""
    stack = Stack()
    stack.blocks[1].mid.to("meta")  # a second device, as far as the adapters' placement goes
    with pytest.raises(NotImplementedError, match=r"one device.*blocks\.1\.mid on meta"):
        get_peft_model(stack, incre() if method == "incre" else ada())
    # refused after the layers were in (the allocator sees them): they are taken out again, the model as it came
    assert not any(isinstance(m, RankedLoraLayer) for m in stack.modules())
    assert all(p.requires_grad for p in stack.parameters())


@pytest.mark.parametrize("adapters_on", ["cpu", "cuda:1"])
def test_under_nccl_the_generator_is_sent_from_the_adapters_cuda_device(monkeypatch, adapters_on):
    """A DDP script may place each rank's model with .to(f"cuda:{rank}") and never call torch.cuda.set_device:
    every rank then sent from cuda:0. The adapters' device is used once they are on a GPU; before (get_peft_model
    ahead of .cuda()), the current device. The collective and the devices are stood in for: no GPU here."""
    import pefttorch.tuners.rank.allocator as allocator_module

    allocator = build(incre(max_rank_per_module=5)).base_model.allocator
    allocator.ipt = _on_device(adapters_on)
    sent_from = []

    class State:  # what the generator's state does in the code under test: moved, sent, brought back
        def to(self, device):
            sent_from.append(torch.device(device))
            return self

        def cpu(self):
            return real

    real = allocator.generator.get_state()
    monkeypatch.setattr(allocator, "generator", type("G", (), {"get_state": lambda _: State(),
                                                               "set_state": lambda _, s: None})())
    monkeypatch.setattr(allocator_module, "data_parallel", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *_: "nccl")
    monkeypatch.setattr(torch.distributed, "broadcast", lambda t, src: None)
    monkeypatch.setattr(allocator_module, "_on_any_process", lambda flag, device: sent_from.append(device) or flag)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    allocator._shared_generator = False
    assert not allocator._share_generator()  # shared; no process's generator differed
    sent_from = sent_from[:1] if sent_from[1:] == sent_from[:1] else sent_from  # the flag went from there too
    assert sent_from == [torch.device("cuda", 3) if adapters_on == "cpu" else torch.device(adapters_on)]


def _on_device(device):
    """A stand-in with only the attribute the code reads (no CUDA tensor can be made without a GPU)."""
    return type("OnDevice", (), {"device": torch.device(device)})()


def test_adalora_pruning_equals_masking():
    """Compacting the survivors gives the output HF PEFT's masking (e = 0 for the pruned) gives."""
    model = build(ada())
    randomize(model)
    opt = RankAwareAdamW(model.parameters(), lr=1e-3)
    x = torch.randn(5, 13)
    model(x).square().mean().backward()
    opt.step()
    allocator = model.base_model.allocator
    allocator.update_ipt()
    scores = torch.cat(allocator.component_scores())
    doomed = set(torch.topk(scores, 7, largest=False).indices.tolist())
    masked = copy.deepcopy(model)
    start = 0
    with torch.no_grad():
        for _, layer in ranked_layers(masked):
            r = layer.lora_components["default"].rank
            for k in range(r):
                if start + k in doomed:
                    layer.lora_E["default"][k] = 0.0
            start += r
        expected = masked(x)
    total = sum(model.rank_pattern().values())
    allocator.prune_to(total - 7, step=3)
    assert sum(model.rank_pattern().values()) == total - 7
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_adalora_needs_gradients():
    model = build(ada())
    with pytest.raises(RuntimeError, match="before zero_grad"):
        model.update_and_allocate(2)


# ---------------------------------------------------------------------------------------------- optimizer


def test_rank_aware_adamw_is_adamw_on_ordinary_parameters():
    torch.manual_seed(0)
    a, b = nn.Linear(7, 5), nn.Linear(7, 5)
    b.load_state_dict(a.state_dict())
    ours = RankAwareAdamW(a.parameters(), lr=1e-2, weight_decay=0.1)
    torchs = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        x = torch.randn(3, 7)
        for m, opt in ((a, ours), (b, torchs)):
            opt.zero_grad()
            m(x).square().sum().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_rank_aware_adamw_is_adamw_on_the_trainable_components():
    """With no events and no warm-up, each trainable component moves as under torch's AdamW, the rest not."""
    model = build(ada(tinit=8, tfinal=0, total_step=9))
    randomize(model)
    ref = copy.deepcopy(model)
    ours = RankAwareAdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    torchs = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.05)
    x = torch.randn(4, 13)
    for _ in range(4):
        for m, opt in ((model, ours), (ref, torchs)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_rank_aware_adamw_never_touches_idle_components():
    model = build(incre(target_rank=5))
    randomize(model)
    layers = ranked_layers(model)
    before = {n: [p.detach().clone() for p in layer.factors("default")] for n, layer in layers}
    opt = RankAwareAdamW(model.parameters(), lr=1e-1, weight_decay=0.5)
    x = torch.randn(4, 13)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    for n, layer in layers:
        c = layer.lora_components["default"]
        a, e, b_t = layer.factors("default")
        a0, e0, b0 = before[n]
        assert torch.equal(a[c.in_use:], a0[c.in_use:]) and torch.equal(b_t[c.in_use:], b0[c.in_use:])
        assert torch.equal(e[c.rank:], e0[c.rank:])  # reserve e fixed, unused untouched (no weight decay)
        assert not torch.equal(a[:c.in_use], a0[:c.in_use]) and not torch.equal(e[:c.rank], e0[:c.rank])


def test_rank_aware_adamw_state_follows_components_across_pruning():
    model = build(ada())
    randomize(model)
    opt = RankAwareAdamW(model.parameters(), lr=1e-2)
    x = torch.randn(5, 13)
    model(x).square().mean().backward()
    opt.step()
    layer = ranked_layers(model)[0][1]
    a = layer.lora_A["default"]
    c = layer.lora_components["default"]
    moments = {int(i): opt.state[a]["exp_avg"][k].clone() for k, i in enumerate(c.ids[:c.rank].tolist())}
    allocator = model.base_model.allocator
    allocator.update_ipt()
    allocator.prune_to(sum(model.rank_pattern().values()) - 9, step=2)
    opt.zero_grad()
    model(x).square().mean().backward()
    opt._match_components(a, opt.state[a], c)  # what step() does first
    for k, i in enumerate(c.ids[:c.rank].tolist()):
        torch.testing.assert_close(opt.state[a]["exp_avg"][k], moments[i])  # moved with its component
    assert (opt.state[a]["step"][c.rank:] == 0).all()  # pruned slots: renewed ids, no state


def test_rank_aware_adamw_warms_up_new_components():
    model = build(incre(new_rank_warmup=10, target_rank=2))
    opt = RankAwareAdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    layer = ranked_layers(model)[0][1]
    e = layer.lora_E["default"]
    model(torch.randn(4, 13)).square().mean().backward()
    before = e.detach().clone()
    opt.step()
    # Adam's first step moves an entry by lr * sign(grad): here lr / 10 (step 1 of a 10-step warm-up)
    torch.testing.assert_close((e - before)[:1].abs(), torch.full((1, 1), 1e-3), rtol=1e-3, atol=0)
    override = RankAwareAdamW(model.parameters(), lr=1e-2, weight_decay=0.0, component_warmup=0)
    before = e.detach().clone()
    override.step()
    torch.testing.assert_close((e - before)[:1].abs(), torch.full((1, 1), 1e-2), rtol=1e-3, atol=0)


def test_rank_aware_adamw_keeps_component_ids_exact_through_a_bfloat16_load():
    """Optimizer.load_state_dict casts state tensors to the parameter's dtype; component ids above 256 did not
    survive bfloat16, and a resumed run gave components other components' moments (or none)."""
    model = build(incre()).to(torch.bfloat16)  # adapters in bfloat16 too (get_peft_model keeps them float32)
    opt = RankAwareAdamW(model.parameters(), lr=1e-2)
    x = torch.randn(4, 13, dtype=torch.bfloat16)
    train_step(model, opt, x, 0)
    p = ranked_layers(model)[0][1].lora_A["default"]
    c = ranked_layers(model)[0][1].lora_components["default"]
    assert p.dtype == torch.bfloat16
    c.ids += 1001  # as after many events: ids a bfloat16 cannot hold exactly
    c.next_id += 1001
    opt.state[p]["ids"] += 1001
    resumed = RankAwareAdamW(model.parameters(), lr=1e-2)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert resumed.state[p]["ids"].dtype == torch.int64 and torch.equal(resumed.state[p]["ids"], c.ids)
    model(x).float().square().mean().backward()
    resumed.step()  # the moments are matched, not reset: every component's step count goes on from 1 to 2
    assert resumed.state[p]["step"][:c.trainable("A")].eq(2).all()


def test_rank_aware_adamw_refuses_what_it_does_not_implement():
    """Per-group AdamW options were accepted and ignored (maximize minimised), complex parameters got a complex
    second moment, and an AdamW state failed at the first step with KeyError 'ids'."""
    plain = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(TypeError, match=r"does not implement \['maximize'\]"):
        RankAwareAdamW([{"params": [plain], "maximize": True}])
    opt = RankAwareAdamW([plain])
    with pytest.raises(TypeError, match="complex parameters"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))]})
    assert len(opt.param_groups) == 1
    model = build(incre())
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 13)).square().mean().backward()
    adamw.step()
    ours = RankAwareAdamW(model.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="no component ids .* start the optimizer afresh"):
        ours.load_state_dict(adamw.state_dict())
    assert not ours.state


def test_rank_aware_adamw_refuses_a_sparse_gradient_before_anything_moves():
    """The check sat in the loop over parameters: those before the sparse one had stepped when it raised."""
    torch.manual_seed(0)
    linear, embedding = torch.nn.Linear(3, 3), torch.nn.Embedding(5, 3, sparse=True)
    opt = RankAwareAdamW([*linear.parameters(), *embedding.parameters()], lr=0.1)
    before = copy.deepcopy(linear.state_dict())
    linear(embedding(torch.tensor([1]))).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    for k, v in linear.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    assert not opt.state


def test_rank_aware_adamw_state_dict_round_trip():
    model = build(incre())
    opt = RankAwareAdamW(model.parameters(), lr=1e-2)
    x = torch.randn(4, 13)
    for step in range(3):
        train_step(model, opt, x, step)
    clone = RankAwareAdamW(model.parameters(), lr=1e-2)
    clone.load_state_dict(copy.deepcopy(opt.state_dict()))  # state_dict() shares the live tensors
    model(x).square().mean().backward()
    saved = copy.deepcopy(model.state_dict())
    opt.step()
    after = copy.deepcopy(model.state_dict())
    model.load_state_dict(saved)
    clone.step()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, after[k], msg=k)


def test_rank_aware_adamw_errors():
    with pytest.raises(ValueError, match="lr must be"):
        RankAwareAdamW([nn.Parameter(torch.zeros(1))], lr=-1)
    with pytest.raises(ValueError, match="betas"):
        RankAwareAdamW([nn.Parameter(torch.zeros(1))], betas=(1.0, 0.9))


# ---------------------------------------------------------------------------------------------- orth reg


def test_orth_regularization_is_added_to_the_loss_in_training():
    torch.manual_seed(0)
    model = get_peft_model(FAMILIES["llama"].build(), incre(target_modules=["q_proj", "v_proj"], top_h=1,
                                                             orth_reg_weight=0.3))
    ids = torch.randint(3, 90, (2, 6))
    model.train()
    with_term = model(input_ids=ids, labels=ids).loss
    with torch.no_grad():
        reg = model.orth_regularization()
    manual = []
    for _, layer in ranked_layers(model):
        n = layer.lora_components["default"].in_use
        a, _, b_t = layer.factors("default")
        manual += [torch.linalg.matrix_norm(a[:n] @ a[:n].t() - torch.eye(n)),
                   torch.linalg.matrix_norm(b_t[:n] @ b_t[:n].t() - torch.eye(n))]
    torch.testing.assert_close(reg, torch.stack(manual).mean())
    # return_dict=False: the (loss, logits, ...) tuple's loss carries it too (it was the task loss alone)
    as_tuple = model(input_ids=ids, labels=ids, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], with_term, rtol=1e-6, atol=1e-7)
    model.eval()
    plain = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(with_term, plain + 0.3 * reg, rtol=1e-5, atol=1e-6)


def test_orth_regularization_with_no_loss_to_join_warns_once():
    """Without labels (the HF Trainer's label smoothing or compute_loss_func computes the loss itself from the
    logits) the term had nowhere to go and training went on without it, silently (the density loss warns)."""
    model = get_peft_model(FAMILIES["llama"].build(), incre(target_modules=["q_proj", "v_proj"], top_h=1,
                                                             orth_reg_weight=0.3))
    ids = torch.randint(3, 90, (2, 6))
    model.train()
    with pytest.warns(UserWarning, match=r"add orth_reg_weight \* model.orth_regularization\(\) to your loss"):
        model(input_ids=ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids=ids)  # once
        model(input_ids=ids, labels=ids)
        model.eval()
        model(input_ids=ids)
    fresh = get_peft_model(FAMILIES["llama"].build(), incre(target_modules=["q_proj", "v_proj"], top_h=1,
                                                             orth_reg_weight=0.3)).train()
    with warnings.catch_warnings(), fresh.disable_adapter():  # no term to add there: nothing to warn of
        warnings.simplefilter("error")
        fresh(input_ids=ids)
    # and a frozen ranked model counts no trainable parameter (its spare capacity was subtracted: negative)
    fresh.set_adapter("default", inference_mode=True)
    assert fresh.get_nb_trainable_parameters()[0] == 0


def test_orth_regularization_counts_once_per_accumulated_batch():
    """With the HF Trainer's num_items_in_batch each micro-batch's loss is a share of the batch's, summed, not
    averaged: the term was added whole to every micro-batch, so accumulating over k steps weighed it k times."""
    torch.manual_seed(0)
    model = get_peft_model(FAMILIES["llama"].build(), incre(target_modules=["q_proj", "v_proj"], top_h=1,
                                                             orth_reg_weight=0.3))
    ids = torch.randint(3, 90, (4, 6))
    labels = ids.clone()
    labels[0, 2:] = -100  # micro-batches with unequal item counts
    total = labels[:, 1:].ne(-100).sum()  # what the Trainer counts for a causal LM: the shifted labels
    model.train()
    summed = sum(model(input_ids=ids[i:i + 2], labels=labels[i:i + 2], num_items_in_batch=total).loss
                 for i in (0, 2))
    with torch.no_grad():
        reg = model.orth_regularization()
    model.eval()
    whole = model(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(summed, whole + 0.3 * reg, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- save and load


def _grow_then_train(config, steps=12):
    torch.manual_seed(0)
    base = FAMILIES["llama"].build()
    model = get_peft_model(copy.deepcopy(base), config)
    opt = RankAwareAdamW(model.parameters(), lr=3e-2)
    ids = torch.randint(3, 90, (2, 8))
    for step in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        model.update_and_allocate(step)
        opt.zero_grad()
    model.eval()
    return base, model, ids


@pytest.mark.parametrize("kind", ["incre", "ada"])
def test_save_writes_a_plain_lora_with_the_final_ranks(tmp_path, kind):
    targets = ["q_proj", "v_proj", "o_proj"]
    config = (incre(target_modules=targets, target_rank=3, top_h=2) if kind == "incre"
              else ada(target_modules=targets, init_r=4, target_r=2, total_step=8, tinit=1, tfinal=2))
    base, model, ids = _grow_then_train(config)
    ranks = model.rank_pattern()
    assert len(set(ranks.values())) > 1  # ranks differ between modules
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA"
    pattern = {k: saved["rank_pattern"].get(k, saved["r"]) for k in saved["target_modules"]}
    assert pattern == {k: r for k, r in ranks.items() if r > 0}
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        ours = pefttorch.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    peft = pytest.importorskip("peft")
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
        torch.testing.assert_close(theirs(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["incre", "ada"])
def test_save_of_a_state_dict_from_before_an_allocation_is_refused(tmp_path, kind):
    """save_pretrained(state_dict=snapshot) read the ranks from the model: a snapshot taken before the ranks changed
    was saved with today's ranks (AdaLoRA: another adapter in silence; IncreLoRA: a file that did not load)."""
    targets = ["q_proj", "v_proj"]
    config = (incre(target_modules=targets, target_rank=3, top_h=2) if kind == "incre"
              else ada(target_modules=targets, init_r=4, target_r=2, total_step=8, tinit=1, tfinal=2))
    base, model, ids = _grow_then_train(config, steps=1)
    snapshot = copy.deepcopy(model.state_dict())
    model.save_pretrained(tmp_path / "same", state_dict=snapshot)  # nothing allocated since: fine
    before = model.rank_pattern()
    model.train()
    opt = RankAwareAdamW(model.parameters(), lr=3e-2)
    for step in range(1, 12):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        model.update_and_allocate(step)
        opt.zero_grad()
    assert model.rank_pattern() != before
    with pytest.raises(ValueError, match="state_dict's ranks at .* are not the model's now"):
        model.save_pretrained(tmp_path / "old", state_dict=snapshot)
    params = {k: v for k, v in snapshot.items() if not k.endswith("_extra_state")}  # the trainable tensors alone
    with pytest.raises(ValueError, match="has tensors of .* but not its ranks"):
        model.save_pretrained(tmp_path / "old", state_dict=params)
    assert not (tmp_path / "old" / "adapter_model.safetensors").exists()


def test_state_dict_round_trip_restores_ranks():
    base, model, ids = _grow_then_train(incre(target_modules=["q_proj", "v_proj"], target_rank=3, top_h=1))
    state = model.state_dict()
    fresh = get_peft_model(copy.deepcopy(base), incre(target_modules=["q_proj", "v_proj"], target_rank=3, top_h=1))
    fresh.load_state_dict(state)
    assert fresh.rank_pattern() == model.rank_pattern()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_unload_gives_back_the_base_model():
    torch.manual_seed(0)
    base = Stack()
    x = torch.randn(2, 13)
    expected = base(x)
    model = get_peft_model(base, incre())
    randomize(model)
    out = model.unload()
    assert out is base and not any(isinstance(m, RankedLoraLayer) for m in out.modules())
    torch.testing.assert_close(out(x), expected)


# ---------------------------------------------------------------------------------------------- Trainer


@pytest.mark.slow
def test_trainer_with_callback_reaches_the_budget(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = incre(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], target_rank=3, top_h=2,
                   incre_interval=2, init_warmup=1, incre_rank_num=1)
    model = get_peft_model(FAMILIES["llama"].build(), config)
    ids = torch.randint(3, 90, (4, 10))
    data = [{"input_ids": ids[i % 4], "labels": ids[i % 4]} for i in range(64)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=20,
                                          report_to=[], logging_steps=4, save_strategy="no", use_cpu=True)
    optimizer = RankAwareAdamW(model.parameters(), lr=1e-2)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None),
                                   callbacks=[pefttorch.RankAllocationCallback()])
    trainer.train()
    assert sum(model.rank_pattern().values()) == 3 * 4 * 2
    assert any("total_rank" in entry for entry in trainer.state.log_history)


def test_callback_warns_about_a_stock_optimizer():
    model = build(incre())
    callback = pefttorch.RankAllocationCallback()
    with pytest.warns(UserWarning, match="RankAwareAdamW"):
        callback.on_train_begin(None, None, None, model=model, optimizer=torch.optim.AdamW(model.parameters()))


def test_lora_config_is_not_ranked():
    model = get_peft_model(Stack(), LoraConfig(target_modules=TARGETS))
    assert not hasattr(model.base_model, "allocator")


def test_trainable_parameters_count_the_components_that_train():
    model = build(incre(target_rank=4, incre_rank_num=2))
    trainable, _ = model.get_nb_trainable_parameters()
    # rank 1 (a, e, b) + reserve 2 (a, b) per layer, whatever the capacity
    expected = sum((m.in_features + 1 + m.out_features) + 2 * (m.in_features + m.out_features)
                   for _, m in ranked_layers(model))
    assert trainable == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("kind", ["incre", "ada"])
def test_moved_to_cuda_trains_like_on_the_cpu(kind):
    """get_peft_model on the CPU, then .cuda(): statistics and tiles follow, and the run (scores from the CUDA
    kernel, allocation events, optimizer) matches the CPU's. In float64, so only a logic difference can show: on the
    H200 the float32 run differed by 2e-3, and the float64 one still by 5e-3, which was the components IncreLoRA
    activated being drawn from CUDA's generator (now from the CPU's on either device)."""
    config = incre(score_sample=None, init_warmup=0, incre_interval=2) if kind == "incre" else ada()
    cpu = build(config, dtype=torch.float64)
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(6, 13, dtype=torch.float64)
    runs = []
    for model, inputs in ((cpu, x), (gpu, x.cuda())):
        torch.manual_seed(1)  # new components are drawn from the CPU generator on either device
        opt = RankAwareAdamW(model.parameters(), lr=1e-2)
        for step in range(8):
            train_step(model, opt, inputs, step)
        runs.append(model)
    assert runs[0].rank_pattern() == runs[1].rank_pattern()
    with torch.no_grad():
        torch.testing.assert_close(runs[1](x.cuda()).cpu(), runs[0](x), rtol=1e-10, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("kind", ["incre", "ada"])
def test_quiet_training_steps_do_not_synchronise_the_gpu(kind):
    """Steps without an allocation event (forward, the regulariser, backward with the importance taps, the
    optimizer, update_and_allocate) queue GPU work without waiting for it: a host synchronisation per step keeps
    the CPU from running ahead, and on the H200 IncreLoRA and AdaLoRA steps cost 1.3-1.4x LoRA's. The
    regulariser's torch.tensor(..., device="cuda") was one (an H2D copy from pageable memory waits for the
    stream)."""
    config = incre(init_warmup=0, incre_interval=1000) if kind == "incre" else ada(tinit=100, total_step=1000)
    model = build(config).cuda()
    opt = RankAwareAdamW(model.parameters(), lr=1e-2)
    x = torch.randn(6, 13, device="cuda")

    def step(i):
        loss = model(x).square().mean() + 0.1 * model.orth_regularization()
        loss.backward()
        opt.step()
        assert model.update_and_allocate(i) is None  # quiet: no event
        opt.zero_grad()

    step(1)  # the first step creates the optimizer's state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(2, 5):
            step(i)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_orth_regularization_with_ranks_that_differ_and_its_gradient():
    """The batched form equals the per-module formula when modules use different numbers of components, and
    only the components in use get a gradient from it."""
    model = build(incre(target_rank=5))
    randomize(model)
    layers = ranked_layers(model)
    for i, (_, layer) in enumerate(layers):
        c = layer.lora_components["default"]
        c.rank, c.reserve = 1 + i % 4, i % 2
    reg = model.orth_regularization()
    manual = []
    for _, layer in layers:
        n = layer.lora_components["default"].in_use
        a, _, b_t = layer.factors("default")
        manual += [torch.linalg.matrix_norm(f[:n] @ f[:n].t() - torch.eye(n)) for f in (a, b_t)]
    torch.testing.assert_close(reg, torch.stack(manual).mean())
    reg.backward()
    for _, layer in layers:
        n = layer.lora_components["default"].in_use
        a, _, b_t = layer.factors("default")
        assert a.grad[n:].abs().sum() == 0 and a.grad[:n].abs().sum() > 0 and b_t.grad[n:].abs().sum() == 0


def test_the_docs_say_what_the_orthogonality_term_and_init_warmup_do():
    """The docs gave the term as the mean over modules of ||AA^T - I|| + ||B^TB - I|| (twice what is computed: the
    mean over the factors, as HF PEFT's), and init_warmup as "no allocation before this step" (the first comes at a
    multiple of incre_interval after it: init_warmup=3, incre_interval=3 allocates first at step 6)."""
    from pefttorch.tuners.rank.model import RankedLoraModel

    for doc in (IncreLoraConfig.__doc__, RankedLoraModel.orth_regularization.__doc__):
        assert "mean(||A A^T - I||_F + ||B^T B - I||_F)" not in doc and "one term" in doc
    model = build(incre())
    randomize(model)
    per_factor = [torch.linalg.matrix_norm(f[:n] @ f[:n].t() - torch.eye(n))
                  for _, layer in ranked_layers(model) if (n := layer.lora_components["default"].in_use)
                  for f in layer.factors("default")[::2]]
    torch.testing.assert_close(model.orth_regularization(), torch.stack(per_factor).mean())
    assert "no allocation before this step" not in IncreLoraConfig.__doc__
    assert "init_warmup=3, incre_interval=3`` the first is at step 6" in " ".join(IncreLoraConfig.__doc__.split())
    model = build(incre(init_warmup=3, incre_interval=3, target_rank=5))
    opt = RankAwareAdamW(model.parameters(), lr=1e-2)
    x = torch.randn(8, 13)
    assert [step for step in range(8) if train_step(model, opt, x, step)] == [6]


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_a_module_pruned_to_rank_zero_keeps_its_trained_bias_through_save_and_load(bias, tmp_path):
    """Saved without factors, such a module loads as a plain layer: its trained bias is saved under the plain
    layer's key (it was dropped with "lora_only", and saved under a key no loader expected with "all")."""
    peft = pytest.importorskip("peft")
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=64, vocab_size=100,
                                                    max_position_embeddings=64)).eval()
    ref = copy.deepcopy(base)
    model = pefttorch.get_peft_model(base, pefttorch.AdaLoraConfig(
        init_r=4, target_r=1, tinit=0, tfinal=1, deltaT=1, total_step=3, target_modules=["query", "value"],
        modules_to_save=["classifier"], bias=bias))
    allocator = model.base_model.allocator
    # the second module's components score lowest: pruning 4 components takes it to rank 0
    allocator.component_scores = lambda: [torch.full((allocator.components(layer).rank,), 0.0 if i == 1 else 1.0 + i)
                                          for i, (_, layer) in enumerate(allocator.layers)]
    allocator.prune_to(allocator.total_rank() - 4, step=1)
    assert sorted(model.rank_pattern().values()) == [0, 4, 4, 4]
    with torch.no_grad():  # as training would: every trainable bias moves
        for p in model.parameters():
            if p.requires_grad and p.dim() == 1:
                p.add_(0.5)
    model.eval()
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    for loaded in (pefttorch.PeftModel.from_pretrained(copy.deepcopy(ref), tmp_path),
                   peft.PeftModel.from_pretrained(copy.deepcopy(ref), tmp_path)):
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_disabling_a_merged_ranked_adapter_gives_the_base_model():
    """As for plain LoRA layers: the merged update leaves the weights while adapters are disabled."""
    fam = FAMILIES["llama"]
    ids = fam.inputs(torch.Generator().manual_seed(2))["input_ids"]
    torch.manual_seed(0)
    base = fam.build().eval()
    with torch.no_grad():
        want = base(input_ids=ids).logits
    model = pefttorch.get_peft_model(copy.deepcopy(base), pefttorch.AdaLoraConfig(
        init_r=4, target_r=2, tinit=0, tfinal=1, deltaT=1, total_step=5, target_modules=["q_proj", "v_proj"])).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_E" in name:
                p.fill_(1.0)  # a visible update
        adapted = model(input_ids=ids).logits
        assert not torch.allclose(adapted, want, atol=1e-3)
        model.merge_adapter()
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-5)


def _randomised(model) -> None:
    """Every factor random (e too, so that e * a differs from a), reserve and unused slots included."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("family, targets", [("llama", ["q_proj", "v_proj", "down_proj"]),
                                             ("gpt2", ["c_attn", "c_proj"])])  # Conv1D, square and not
@pytest.mark.parametrize("method", ["increlora", "adalora"])
def test_merging_a_ranked_adapter_keeps_the_output(family, targets, method):
    """merge_adapter and merge_and_unload give the adapted model's output, on nn.Linear and on GPT-2's transposed
    Conv1D (square c_proj included, where a missing transpose gives no shape error). A merge that did nothing, or
    merged A without e, once passed every test: the only merge test set e to 1 and checked the unmerged path."""
    fam = FAMILIES[family]
    ids = fam.inputs(torch.Generator().manual_seed(2))["input_ids"]
    torch.manual_seed(0)
    base = fam.build().eval()
    config = (IncreLoraConfig(target_modules=targets, target_rank=3, init_rank=2, lora_alpha=4) if method == "increlora"
              else AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=targets))
    model = get_peft_model(copy.deepcopy(base), config).eval()
    _randomised(model)
    with torch.no_grad():
        want = base(input_ids=ids).logits
        adapted = model(input_ids=ids).logits
        assert not torch.allclose(adapted, want, atol=1e-3)
        model.merge_adapter()
        layers = [m for m in model.modules() if isinstance(m, RankedLoraLayer)]
        assert layers and all(m.merged for m in layers)
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-5)
        model.unmerge_adapter()
        merged = model.merge_and_unload()
        assert not any(isinstance(m, RankedLoraLayer) for m in merged.modules())
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["increlora", "adalora"])
def test_merging_16_bit_factors_rounds_once(method):
    """With autocast_adapter_dtype=False the factors are bfloat16 like the weight: e * a was formed in bfloat16
    before merge_lora_ formed the update in float32, a second rounding that moved about a third of the merged
    weights by a bfloat16 step. Now the merged weight is W + scaling * B diag(e) A formed in float32 (delta_weight)
    and rounded once to bfloat16, exactly, as for plain LoRA."""
    torch.manual_seed(0)
    base = FAMILIES["llama"].build().to(torch.bfloat16)
    targets = ["q_proj"]
    config = (IncreLoraConfig(target_modules=targets, target_rank=3, init_rank=2, lora_alpha=4)
              if method == "increlora" else AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=targets))
    model = get_peft_model(base, config, autocast_adapter_dtype=False)
    _randomised(model)
    layer = next(m for m in model.modules() if isinstance(m, RankedLoraLayer))
    assert layer.lora_A["default"].dtype == torch.bfloat16
    want = (layer.base_layer.weight.double() + layer.delta_weight("default").double()).to(torch.bfloat16)
    with torch.no_grad():
        model.merge_adapter()
    assert torch.equal(layer.base_layer.weight, want)


@pytest.mark.parametrize("method", ["increlora", "adalora"])
def test_training_while_merged_leaves_the_factors_alone(method):
    """Merged (say for an evaluation) and trained on: the orthogonality term alone trained the factors, which then
    came out of the weight at unmerge as another update (the base weight was lost), and IncreLoRA grew ranks from
    nothing. Now the term skips a merged adapter and update_and_allocate says to unmerge first."""
    fam = FAMILIES["llama"]
    ids = fam.inputs(torch.Generator().manual_seed(2))["input_ids"]
    torch.manual_seed(0)
    targets = ["q_proj", "v_proj"]
    config = (IncreLoraConfig(target_modules=targets, target_rank=3, init_rank=1, incre_interval=1, init_warmup=0,
                              top_h=1, modules_to_save=["lm_head"]) if method == "increlora"
              else AdaLoraConfig(init_r=4, target_r=2, tinit=0, tfinal=1, deltaT=1, total_step=10,
                                 target_modules=targets, modules_to_save=["lm_head"]))
    model = get_peft_model(fam.build(), config).train()
    _randomised(model)
    layers = [m for m in model.modules() if isinstance(m, RankedLoraLayer)]
    weights = [m.base_layer.weight.detach().clone() for m in layers]
    factors = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    model.merge_adapter()
    model(input_ids=ids, labels=ids).loss.backward()  # the head trains
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" in n)
    with pytest.raises(RuntimeError, match=r"update_and_allocate\(0\): the adapter is merged .* unmerge_adapter\(\)"):
        model.update_and_allocate(0)
    model.unmerge_adapter()
    for layer, weight in zip(layers, weights, strict=True):
        torch.testing.assert_close(layer.base_layer.weight, weight)
    for n, p in model.named_parameters():
        if "lora_" in n:
            assert torch.equal(p, factors[n]), n
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    model.update_and_allocate(0)  # unmerged, training and allocation go on


def test_ranked_dropout_is_off_in_eval_mode():
    """lora_dropout applies in training only: in eval mode two forwards agree with each other and with the same
    adapter without dropout."""
    fam = FAMILIES["llama"]
    ids = fam.inputs(torch.Generator().manual_seed(2))["input_ids"]
    torch.manual_seed(0)
    base = fam.build().eval()
    outputs = []
    for dropout in (0.0, 0.5):
        model = get_peft_model(copy.deepcopy(base), AdaLoraConfig(init_r=4, target_r=2, total_step=10,
                                                                 lora_dropout=dropout, target_modules=["q_proj"]))
        _randomised(model)
        model.eval()
        with torch.no_grad():
            outputs += [model(input_ids=ids).logits, model(input_ids=ids).logits]
        model.train()
        with torch.no_grad():
            trained = model(input_ids=ids).logits
        if dropout:  # and it does apply in training
            assert not torch.allclose(trained, outputs[-1], atol=1e-4)
    for out in outputs[1:]:
        torch.testing.assert_close(out, outputs[0], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_increlora_under_torch_compile_matches_eager_and_compiles_once_per_growth():
    """Each step's grid once changed what the compiled layer guarded on (the offsets, the tile's shape): it
    recompiled every step and fell back to eager after torch._dynamo's cache limit. Now it compiles again only
    when a module's rank changes, and scores as eager does."""
    from torch._dynamo.utils import counters

    def run(compiled: bool):
        torch.manual_seed(0)
        model = build(incre(incre_interval=3, score_sample=4))
        opt = RankAwareAdamW(model.parameters(), lr=1e-2)
        forward = torch.compile(model, backend="aot_eager") if compiled else model
        g, grown = torch.Generator().manual_seed(1), 0
        for step in range(8):
            forward(torch.randn(8, 13, generator=g)).square().mean().backward()
            opt.step()
            grown += model.update_and_allocate(step) is not None
            opt.zero_grad()
        return model.base_model.allocator, model.rank_pattern(), grown

    torch._dynamo.reset()
    counters.clear()
    eager, (compiled, pattern, grown) = run(False), run(True)
    assert grown == 2 and counters["stats"]["unique_graphs"] == 1 + grown
    assert pattern == eager[1]
    torch.testing.assert_close(compiled.ipt, eager[0].ipt, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(compiled.unc, eager[0].unc, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("method", ["incre", "ada"])
def test_a_pickled_copy_trains_as_a_deep_copy(method):
    """Plain pickle (multiprocessing, joblib, Ray) copied each view of the allocator's buffers into its own storage:
    IncreLoRA's backward wrote one copy of a tile and scoring read another (its statistics grew about 2.7 times
    too fast), AdaLoRA's step undo read a flat buffer its statistics no longer lived in. A pickled copy now trains
    exactly as a deep copy does."""
    import pickle

    config = incre(score_sample=4) if method == "incre" else ada(tinit=1, tfinal=2, total_step=10)
    x = torch.randn(8, 13, generator=torch.Generator().manual_seed(3))
    model = build(config)
    randomize(model)
    train_step(model, RankAwareAdamW(model.parameters(), lr=1e-2), x, 0)
    results = []
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        allocator = copied.base_model.allocator
        flat = allocator.tiles if method == "incre" else allocator._ipt_flat
        views = allocator.tile_views if method == "incre" else [t for ts in allocator.ipt for t in ts]
        assert all(v.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for v in views)
        opt = RankAwareAdamW(copied.parameters(), lr=1e-2)
        for step in range(1, 4):
            torch.manual_seed(step)
            train_step(copied, opt, x, step)
        results.append((statistics(allocator), copied.rank_pattern()))
    (deep, deep_ranks), (pickled, pickled_ranks) = results
    assert pickled_ranks == deep_ranks
    torch.testing.assert_close(pickled, deep, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["incre", "ada"])
def test_torchs_default_dtype_and_device_do_not_leak_in(method):
    """IncreLoRA's statistics and tiles took torch's default dtype (float64 or bfloat16 there: its first update
    failed in the float32 scoring op), and new components were drawn on the default device (under
    torch.device("meta") the copy failed; with a CUDA default they would come from CUDA's generator, another
    stream than the CPU's, and a later growth would hand the allocator's CPU generator to a CUDA draw)."""
    config = incre() if method == "incre" else ada()
    x = torch.randn(8, 13)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = build(config)
        torch.manual_seed(0)
        base = Stack().float()
        with torch.device("meta"):  # a CPU model, with another default device around the build
            around = get_peft_model(base, config)
    finally:
        torch.set_default_dtype(previous)
    for other, context in ((model, contextlib.nullcontext()), (around, torch.device("meta"))):
        assert not any(p.is_meta for p in other.parameters())
        opt = RankAwareAdamW(other.parameters(), lr=1e-2)
        with context:  # trained under it too: growth's new ids, AdaLoRA's regulariser masks, the optimizer's ids
            for step in range(4):
                train_step(other, opt, x, step)
        assert all(t.dtype == torch.float32 for t in statistics_tensors(other.base_model.allocator))


def test_increlora_under_a_loss_scale_scores_the_unscaled_gradients():
    """IncreLoRA scores from the backward itself, which torch.amp.GradScaler scales: its statistics came out the
    loss scale times too large, and as the scale changed the running averages favoured some steps, so other
    modules grew. With loss_scale given (the Trainer callback reads it from accelerate's scaler), a run whose loss
    scale doubles every step (exact in floating point) scores and grows exactly as one without."""
    config = incre(score_sample=4)
    x = torch.randn(8, 13, generator=torch.Generator().manual_seed(2))
    runs = []
    for scaled in (False, True):
        model = build(config)
        randomize(model)
        opt = RankAwareAdamW(model.parameters(), lr=1e-2)
        for step in range(8):
            scale = 2.0 ** (10 + step) if scaled else 1.0
            (model(x).square().mean() * scale).backward()
            for p in model.parameters():  # what scaler.step does before the optimizer's step
                if p.grad is not None:
                    p.grad.div_(scale)
            opt.step()
            torch.manual_seed(step)
            model.update_and_allocate(step, loss_scale=scale if scaled else None)
            opt.zero_grad()
        runs.append((statistics(model.base_model.allocator), model.base_model.allocator.events))
    (plain, plain_events), (scaled, scaled_events) = runs
    assert plain_events and scaled_events == plain_events
    torch.testing.assert_close(scaled, plain, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="loss_scale must be positive and finite"):
        build(config).update_and_allocate(0, loss_scale=float("inf"))


def test_the_trainer_callback_reads_the_loss_scale_before_the_step():
    from pefttorch.callbacks import RankAllocationCallback

    model = build(incre())
    seen = []
    model.base_model.update_and_allocate = lambda step, loss_scale=None: seen.append((step, loss_scale))
    callback = RankAllocationCallback()
    state = type("State", (), {"global_step": 3})()
    wrapped = type("AcceleratedOptimizer", (), {"scaler": torch.amp.GradScaler("cpu", init_scale=512.0)})()
    wrapped.scaler.scale(torch.ones(()))  # the backward of this step, at scale 512
    callback.on_pre_optimizer_step(None, state, None, optimizer=wrapped)
    wrapped.scaler.update(new_scale=1024.0)  # the wrapper's step updates the scale before on_optimizer_step
    callback.on_optimizer_step(None, state, None, model=model)
    callback.on_pre_optimizer_step(None, state, None, optimizer=object())  # no scaler (bf16, fp32)
    callback.on_optimizer_step(None, state, None, model=model)
    assert seen == [(3, 512.0), (3, None)]


@pytest.mark.parametrize("how", ["deepcopy", "meta+assign"])
def test_an_optimizer_state_loads_into_a_copied_or_assigned_model_before_its_forward(how):
    """The optimizer finds ranked factors by a tag on the Parameter, which copies (deepcopy, a load with
    assign=True) drop, and only the forward put it back: a state loaded first (the usual resume) was taken for
    plain AdamW state (per-component step counts restarted; an AdamW state not refused), and a module pruned to
    rank 0 was never re-tagged (its idle components moved under weight decay)."""
    config = ada(tinit=1, tfinal=2, deltaT=1, total_step=8)
    x = torch.randn(8, 13, generator=torch.Generator().manual_seed(4))
    model = build(config)
    randomize(model)
    opt = RankAwareAdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    for step in range(8):
        train_step(model, opt, x, step)
    pruned = [name for name, rank in model.rank_pattern().items() if rank == 0]
    assert pruned, "no module was pruned to rank 0"
    if how == "deepcopy":
        other = copy.deepcopy(model)
    else:
        with torch.device("meta"):
            other = get_peft_model(Stack(), config)
        other.load_state_dict(copy.deepcopy(model.state_dict()), assign=True)
    other_opt = RankAwareAdamW(other.parameters(), lr=1e-2, weight_decay=0.5)
    other_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # before any forward of `other`
    layers = dict(ranked_layers(other))
    idle = {name: layers[name].lora_A["default"].detach().clone() for name in pruned}
    torch.manual_seed(9)
    train_step(other, other_opt, x, 8)
    torch.manual_seed(9)
    train_step(model, opt, x, 8)
    for (name, p), (_, q) in zip(other.named_parameters(), model.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)  # exactly the run that went on
    for name, before in idle.items():
        torch.testing.assert_close(layers[name].lora_A["default"], before, rtol=0, atol=0, msg=name)
    fresh = build(config)
    plain = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    train_step(fresh, plain, x, 0)
    with pytest.raises(ValueError, match="no component ids"):
        RankAwareAdamW(copy.deepcopy(fresh).parameters(), lr=1e-2).load_state_dict(plain.state_dict())


def test_rank_aware_adamw_refuses_loaded_groups_it_does_not_implement_and_fills_missing_options():
    """torch's load_state_dict replaces the parameter groups whole: a state with maximize=True (or amsgrad) was
    taken and ignored (it minimised), and one without component_warmup failed at the first step (KeyError)."""
    params = [torch.nn.Parameter(torch.randn(3))]
    for option in ("maximize", "amsgrad"):
        state = torch.optim.AdamW(params, lr=1e-2, **{option: True}).state_dict()
        with pytest.raises(TypeError, match=f"does not implement \\['{option}'\\], which this state's"):
            RankAwareAdamW(params, lr=1e-2).load_state_dict(state)
    model = build(incre())
    opt = RankAwareAdamW(model.parameters(), lr=1e-2)
    opt.load_state_dict(torch.optim.AdamW(model.parameters(), lr=1e-2).state_dict())  # no step yet: no state
    assert all(group["component_warmup"] is None for group in opt.param_groups)
    train_step(model, opt, torch.randn(8, 13), 0)


def test_adalora_names_a_module_the_user_froze():
    """Factors frozen with requires_grad_(False) have no gradient to score: the error blamed the call order, which
    was right."""
    model = build(ada())
    for name, p in model.named_parameters():
        if "blocks.0.up" in name:
            p.requires_grad_(False)
    opt = RankAwareAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(torch.randn(4, 13)).square().mean().backward()
    opt.step()
    with pytest.raises(RuntimeError, match=r"AdaLoRA: blocks\.0\.up's factors do not require grad, so it has no "
                                           r"importance score .* leave it out of target_modules"):
        model.update_and_allocate(2)
