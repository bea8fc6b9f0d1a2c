"""pefttorch.nn.LoRALinear: wrapping, initialisation, training, merge/unmerge."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.utils.prune
from helpers import DEVICES, DTYPES

import pefttorch
from pefttorch.nn import BottleneckAdapter, LoRALinear


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_shares_freezes_and_starts_at_base(device, bias):
    base = torch.nn.Linear(20, 9, bias=bias, device=device)
    layer = LoRALinear.from_linear(base, r=4, lora_alpha=16, lora_dropout=0.1)
    assert layer.weight is base.weight and not layer.weight.requires_grad
    assert (layer.bias is base.bias) if bias else layer.bias is None
    assert layer.lora_A.shape == (4, 20) and layer.lora_B.shape == (9, 4)
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert layer.lora_A.abs().sum() > 0 and (layer.lora_B == 0).all()
    assert layer.scaling == 4.0
    x = torch.randn(2, 7, 20, device=device)
    layer.eval()
    torch.testing.assert_close(layer(x), base(x))
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}


def test_kaiming_uniform_bound_of_a():
    layer = LoRALinear(256, 8, r=64)
    bound = 1 / math.sqrt(256)  # kaiming_uniform_(a=sqrt(5)) as nn.Linear: gain sqrt(1/3) * sqrt(3/fan_in)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.9 * bound


def test_rslora_scaling():
    assert LoRALinear(8, 8, r=16, lora_alpha=8, use_rslora=True).scaling == pytest.approx(2.0)


@pytest.mark.parametrize("r", [0, -1, 2.5, True])
def test_bad_rank(r):
    with pytest.raises(ValueError, match="r must be a positive integer"):
        LoRALinear(8, 8, r=r)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), "8"])
def test_bad_alpha(alpha):
    """A NaN scaling would make every output NaN"""
    with pytest.raises(ValueError, match="lora_alpha must be a finite number"):
        LoRALinear(8, 8, lora_alpha=alpha)


def test_numpy_scalars_are_numbers():
    """A rank or alpha read from a numpy array (np.int64(4), np.float32(16)) was refused as not a number."""
    np = pytest.importorskip("numpy")
    layer = LoRALinear(8, 8, r=np.int64(4), lora_alpha=np.float32(16))
    assert type(layer.r) is int and layer.r == 4 and layer.scaling == pytest.approx(4.0)


def test_bad_dropout_and_type():
    with pytest.raises(ValueError, match="lora_dropout"):
        LoRALinear(8, 8, lora_dropout=1.0)
    with pytest.raises(TypeError, match="expects an nn.Linear"):
        LoRALinear.from_linear(torch.nn.Conv1d(2, 2, 1))


def test_bad_sizes_and_dropout_are_refused_in_words():
    """A string dropout failed comparing float and str, a float or negative width inside torch.empty, naming
    neither the layer nor the argument; numpy's integers are taken, as for r."""
    np = pytest.importorskip("numpy")
    for dropout in ("0.1", float("nan"), True, None):
        with pytest.raises(ValueError, match=r"LoRALinear: lora_dropout must be a number in \[0, 1\), got "):
            LoRALinear(5, 7, lora_dropout=dropout)
    for sizes in ((5.0, 7), (5, -1), (True, 7), ("5", 7)):
        with pytest.raises(ValueError, match="LoRALinear: in_features and out_features must be non-negative integers"):
            LoRALinear(*sizes)
    layer = LoRALinear(np.int64(5), np.int32(7), lora_dropout=np.float32(0.25))
    assert (type(layer.in_features), type(layer.out_features), layer.lora_dropout) == (int, int, 0.25)
    assert layer.weight.shape == (7, 5)
    # a string or number for a flag was truthy: use_rslora="no" switched rsLoRA on and changed the scaling
    for name in ("use_rslora", "bias"):
        for flag in ("no", 1, None):
            with pytest.raises(ValueError, match=f"LoRALinear: {name} must be True or False, got "):
                LoRALinear(5, 7, **{name: flag})
    assert LoRALinear(5, 7, r=4, lora_alpha=8, use_rslora=np.bool_(True), bias=np.bool_(False)).scaling == 4.0
    with pytest.raises(ValueError, match="BottleneckAdapter: layer_norm must be True or False, got 'no'"):
        BottleneckAdapter(5, 2, layer_norm="no")


@pytest.mark.parametrize("device", DEVICES)
def test_trains(device):
    torch.manual_seed(0)
    layer = LoRALinear.from_linear(torch.nn.Linear(16, 4, device=device), r=4, lora_alpha=4, lora_dropout=0.1)
    target = torch.nn.Linear(16, 4, device=device)
    opt = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=3e-2)
    x = torch.randn(256, 16, device=device)
    with torch.no_grad():
        y_t = target(x)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(layer(x), y_t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_unmerge_round_trip(device, dtype):
    base = torch.nn.Linear(24, 10, device=device, dtype=dtype)
    layer = LoRALinear.from_linear(base, r=3, lora_alpha=6).eval()
    torch.nn.init.normal_(layer.lora_B, std=0.1)
    w0 = layer.weight.detach().clone()
    x = torch.randn(5, 24, device=device, dtype=dtype)
    y = layer(x)
    layer.merge()
    assert layer.merged and "merged=True" in repr(layer)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(layer(x), y, rtol=tol, atol=tol)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    # exact up to one rounding of W in its own dtype
    eps = torch.finfo(dtype).eps
    assert (layer.weight - w0).abs().max() <= 2 * eps * w0.abs().max()
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


class _Double(torch.nn.Module):
    def forward(self, w):
        return 2 * w


_COMPUTED_WEIGHT = {  # what computes the weight, and the name the refusal gives it
    "weight_norm": (lambda m: torch.nn.utils.parametrizations.weight_norm(m), "_WeightNorm"),
    "spectral_norm": (lambda m: torch.nn.utils.parametrizations.spectral_norm(m), "_SpectralNorm"),
    "register_parametrization": (lambda m: torch.nn.utils.parametrize.register_parametrization(m, "weight", _Double()),
                                 "_Double"),
    "old_weight_norm": (lambda m: torch.nn.utils.weight_norm(m), "WeightNorm"),
    "prune": (lambda m: torch.nn.utils.prune.l1_unstructured(m, "weight", amount=0.5), "L1Unstructured"),
}


@pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm.*is deprecated")
@pytest.mark.parametrize("kind", list(_COMPUTED_WEIGHT))
def test_merge_refuses_a_computed_weight(kind):
    """merge() wrote the update into a weight that a parametrization (or weight_norm's or pruning's pre-hook)
    computes afresh: the update was lost, and merged=True made forward skip it too (the output off by the whole
    update, in silence). Refused, with nothing changed; unmerge() likewise when the weight became computed since."""
    wrap, shown = _COMPUTED_WEIGHT[kind]
    torch.manual_seed(0)
    layer = LoRALinear(5, 7, r=3, lora_alpha=6, dtype=torch.float64).eval()
    torch.nn.init.normal_(layer.lora_B)
    wrap(layer)
    x = torch.randn(4, 5, dtype=torch.float64)
    want = layer(x)
    with pytest.raises(RuntimeError, match=rf"LoRALinear.merge: the weight is not a parameter of the layer: .*"
                                           rf"\({shown}\).*remove it first .*or keep the layer unmerged"):
        layer.merge()
    assert not layer.merged
    torch.testing.assert_close(layer(x), want, rtol=0, atol=0)
    plain = LoRALinear(5, 7, r=3, dtype=torch.float64)
    plain.merge()
    wrap(plain)
    with pytest.raises(RuntimeError, match=rf"LoRALinear.unmerge: the weight is not a parameter .*\({shown}\)"):
        plain.unmerge()
    assert plain.merged


def test_extra_repr():
    text = repr(LoRALinear(8, 4, r=2, lora_alpha=4, lora_dropout=0.05))
    for part in ("in_features=8", "out_features=4", "r=2", "lora_alpha=4", "scaling=2", "lora_dropout=0.05",
                 "merged=False"):
        assert part in text


def test_state_dict_round_trip():
    a = LoRALinear(8, 4, r=2)
    torch.nn.init.normal_(a.lora_B)
    b = LoRALinear(8, 4, r=2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 8)
    torch.testing.assert_close(a(x), b(x))
    assert set(a.state_dict()) == {"weight", "bias", "lora_A", "lora_B", "_extra_state"}  # the last: merged or not


def test_the_merged_flag_travels_with_the_state_dict():
    """A merged layer's state dict loaded into an unmerged layer (every key matching) applied the update twice."""
    torch.manual_seed(0)
    src = LoRALinear(16, 8, r=4)
    torch.nn.init.normal_(src.lora_B)
    x = torch.randn(3, 16)
    want = src(x)
    src.merge()
    dst = LoRALinear(16, 8, r=4)
    dst.load_state_dict(src.state_dict())
    assert dst.merged
    torch.testing.assert_close(dst(x), want)
    src.unmerge()
    dst.load_state_dict(src.state_dict())  # and back: the unmerged weight into the merged layer
    assert not dst.merged
    torch.testing.assert_close(dst(x), want)
    old = {k: v for k, v in src.state_dict().items() if k != "_extra_state"}  # saved before the flag was
    dst.load_state_dict(old)
    assert not dst.merged


def test_loading_the_adapter_alone_keeps_the_merged_flag_and_refuses_a_merged_layer():
    """An adapter-only state dict set merged=False on a merged layer whose weight still held the old update: both
    updates applied, and unmerge() refused. It is refused now; into an unmerged layer it loads as before."""
    torch.manual_seed(0)
    layer, other = LoRALinear(16, 8, r=4), LoRALinear(16, 8, r=4)
    torch.nn.init.normal_(layer.lora_B)
    torch.nn.init.normal_(other.lora_B)
    adapter = {k: v for k, v in other.state_dict().items() if k.startswith("lora_")}
    layer.merge()
    weight = layer.weight.clone()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.load_state_dict(adapter, strict=False)
    assert layer.merged and torch.equal(layer.weight, weight)
    layer.unmerge()
    layer.load_state_dict(adapter, strict=False)
    assert not layer.merged
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias) + other.scaling
                               * x @ other.lora_A.t() @ other.lora_B.t())


def test_a_merged_flag_without_its_weight_is_refused():
    """A merged layer's state dict without its weight, loaded into an unmerged layer, set merged=True on a weight
    that held no update: the adapter vanished from forward and unmerge() subtracted an update never added."""
    src, dst = LoRALinear(16, 8, r=4), LoRALinear(16, 8, r=4)
    torch.nn.init.normal_(src.lora_B)
    src.merge()
    state = {k: v for k, v in src.state_dict().items() if k != "weight"}
    weight = dst.weight.clone()
    with pytest.raises(RuntimeError, match="merged=True but brings no weight"):
        dst.load_state_dict(state, strict=False)
    assert not dst.merged and torch.equal(dst.weight, weight)
    del state["_extra_state"]
    with pytest.raises(RuntimeError, match="unmerge"):  # and the factors alone into the merged layer
        src.load_state_dict(state, strict=False)


def test_reset_parameters_initialises_a_meta_built_layer():
    """FSDP-style materialisation: to_empty, then reset_parameters on each module owning parameters."""
    layer = LoRALinear(16, 8, r=4, device="meta").to_empty(device="cpu")
    layer.weight.data.fill_(float("nan"))
    layer.lora_B.data.fill_(float("nan"))
    layer.reset_parameters()
    assert torch.equal(layer.lora_B, torch.zeros(8, 4))
    bound = 1 / math.sqrt(16)
    assert layer.weight.isfinite().all() and layer.weight.abs().max() <= bound and layer.weight.std() > bound / 4


@pytest.mark.parametrize("method", ["reset_lora_parameters", "reset_parameters"])
def test_resetting_a_merged_layer_is_refused(method):
    """reset_lora_parameters() on a merged layer left the old update in the weight for good (the new factors could
    not take it out); reset_parameters() left merged=True. Refused, with nothing changed, as loading the factors
    alone into a merged layer is; unmerged, they reset as before."""
    torch.manual_seed(0)
    layer = LoRALinear(5, 7, r=3, dtype=torch.float64)
    torch.nn.init.normal_(layer.lora_B)
    w0 = layer.weight.clone()
    layer.merge()
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(RuntimeError, match=f"LoRALinear.{method}: the layer is merged.*unmerge\\(\\) first"):
        getattr(layer, method)()
    assert layer.merged and all(torch.equal(v, state[k]) for k, v in layer.state_dict().items())
    layer.unmerge()
    getattr(layer, method)()
    assert not layer.merged and torch.equal(layer.lora_B, torch.zeros(7, 3))
    if method == "reset_lora_parameters":  # the base as before (up to unmerge's rounding); reset_parameters redraws it
        torch.testing.assert_close(layer.weight, w0)


def test_from_linear_refuses_a_subclass_with_its_own_forward():
    """The fused op reads the weight: a fake-quantizing subclass's forward would be skipped without a word."""
    class Quantized(torch.nn.Linear):
        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight.round(), self.bias)

    with pytest.raises(TypeError, match="forward of its own"):
        LoRALinear.from_linear(Quantized(8, 4))
    plain = torch.nn.Linear(8, 4)
    plain.forward = lambda x: x  # an instance forward (Accelerate's hooks) likewise
    with pytest.raises(TypeError, match="forward of its own"):
        LoRALinear.from_linear(plain)
    class Named(torch.nn.Linear):  # a subclass that only renames is fine
        pass

    LoRALinear.from_linear(Named(8, 4))


@pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm.*is deprecated")
@pytest.mark.parametrize("kind", list(_COMPUTED_WEIGHT))
def test_from_linear_refuses_a_computed_weight_or_bias(kind):
    """A parametrized or pruned nn.Linear failed with torch's "cannot assign 'torch.FloatTensor' as parameter
    'weight'": its weight is computed, not a parameter LoRALinear could share. Refused naming what computes it."""
    wrap, shown = _COMPUTED_WEIGHT[kind]
    linear = torch.nn.Linear(5, 7)
    wrap(linear)
    with pytest.raises(TypeError, match=rf"LoRALinear.from_linear: the weight of \w+ is not a parameter of it: .*"
                                        rf"\({shown}\).*remove it first"):
        LoRALinear.from_linear(linear)
    linear = torch.nn.Linear(5, 7)
    torch.nn.utils.parametrize.register_parametrization(linear, "bias", _Double())  # the bias likewise
    with pytest.raises(TypeError, match=r"the bias of \w+ is not a parameter of it: .*\(_Double\)"):
        LoRALinear.from_linear(linear)


def test_torchscript_is_refused_in_words():
    """torch.jit.script failed inside pefttorch's sources (keyword-only arguments), as if they had a bug; a model
    holding one of the modules is refused the same way, and so are get_peft_model's layers and models."""
    from pefttorch.nn import BottleneckAdapter, SparseMLP

    sparse = SparseMLP(torch.randn(32, 16), torch.randn(32, 16))
    model = pefttorch.get_peft_model(torch.nn.Sequential(torch.nn.Linear(16, 16)),
                                     pefttorch.LoraConfig(r=2, target_modules=["0"]))
    layer = model.base_model.model[0]  # the tuner's layer (and the PeftModel itself) as well
    for module in (LoRALinear(16, 12, r=4), BottleneckAdapter(16, 4), sparse, layer, model):
        with pytest.raises(TypeError, match=f"{type(module).__name__} does not support TorchScript.*torch.compile"):
            torch.jit.script(torch.nn.Sequential(torch.nn.Identity(), module))
