"""torch.func transforms through the ops' Python wrappers: grad, and vmap over grad (per-sample gradients), each
compared with the same transform of the pure-PyTorch reference, in float64 on the CPU."""

from __future__ import annotations

import pytest
import torch

from pefttorch import functional, ops, reference

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


def _rand(*shape):
    return torch.randn(*shape, dtype=torch.float64)


# name -> (pefttorch's function, the reference, its tensor arguments; the first is the one vmap batches over).
# Each function returns one tensor; the loss is a weighted sum of it, so every gradient differs from its neighbour.
CASES = {
    "lora_linear": (
        lambda x, w, a, b, bias: functional.lora_linear(x, w, a, b, bias, scaling=0.5),
        lambda x, w, a, b, bias: reference.lora_linear(x, w, a, b, bias, scaling=0.5),
        lambda: (_rand(3, 7), _rand(5, 7), _rand(2, 7), _rand(5, 2), _rand(5)),
    ),
    "bottleneck_adapter": (
        lambda x, wd, wu, bd, bu, r: functional.bottleneck_adapter(x, wd, wu, bd, bu, residual=r,
                                                                   activation="gelu", scale=0.7),
        lambda x, wd, wu, bd, bu, r: reference.bottleneck_adapter(x, wd, bd, wu, bu, r, False, "gelu", 0.7),
        lambda: (_rand(3, 6), _rand(4, 6), _rand(5, 4), _rand(4), _rand(5), _rand(3, 5)),
    ),
    "density_loss": (
        lambda a: functional.density_loss(a, eps=0.1)[0],
        lambda a: reference.density_loss(a, 0.1),
        lambda: (_rand(3, 5),),
    ),
    "reversible_coupling": (
        lambda x, f: functional.reversible_coupling(x, f, 0.3),
        lambda x, f: reference.reversible_coupling(x, f, 0.3),
        lambda: (_rand(4, 3), _rand(4, 3)),
    ),
    "ranked_lora_factors": (
        # the storage is batched here (a per-sample copy of the factors), so both outputs enter the loss
        lambda a, e, b_t: torch.cat([t.flatten() for t in ops.ranked_lora_factors(a, e, b_t, 3, torch.float64)]),
        lambda a, e, b_t: torch.cat([t.flatten() for t in reference.ranked_lora_factors(a, e, b_t, 3, torch.float64)]),
        lambda: (_rand(5, 4), _rand(5, 1), _rand(5, 6)),
    ),
    "rotary_embedding": (
        lambda x, c, s: ops.rotary_embedding(x, c, s),
        lambda x, c, s: reference.rotary_embedding(x, c, s),
        lambda: (_rand(2, 3, 8), _rand(3, 8), _rand(3, 8)),
    ),
}


def _loss(fn):
    def loss(*args):
        y = fn(*args)
        weights = torch.linspace(-1.0, 2.0, y.numel(), dtype=y.dtype).reshape(y.shape)
        return (y * weights).sum() + (y * y).sum()  # nonlinear in y: the per-sample gradients depend on the sample
    return loss


@pytest.mark.parametrize("name", sorted(CASES))
def test_grad_matches_the_reference(name):
    fn, ref, make = CASES[name]
    args = make()
    argnums = tuple(range(len(args)))
    got = torch.func.grad(_loss(fn), argnums=argnums)(*args)
    want = torch.func.grad(_loss(ref), argnums=argnums)(*args)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(g, w, msg=lambda m, i=i: f"argument {i}: {m}")


@pytest.mark.parametrize("name", sorted(CASES))
def test_per_sample_gradients_match_the_reference(name):
    fn, ref, make = CASES[name]
    args = make()
    batched = torch.stack([make()[0] for _ in range(3)])  # three samples of the first argument
    argnums = tuple(range(len(args)))
    in_dims = (0,) + (None,) * (len(args) - 1)
    got = torch.func.vmap(torch.func.grad(_loss(fn), argnums=argnums), in_dims=in_dims)(batched, *args[1:])
    want = torch.func.vmap(torch.func.grad(_loss(ref), argnums=argnums), in_dims=in_dims)(batched, *args[1:])
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape[0] == 3
        torch.testing.assert_close(g, w, msg=lambda m, i=i: f"argument {i}: {m}")
    # and sample by sample, so a rule that mixed the samples up would be caught even if the reference's vmap did too
    for k in range(3):
        one = torch.func.grad(_loss(ref), argnums=argnums)(batched[k], *args[1:])
        for g, w in zip(got, one, strict=True):
            torch.testing.assert_close(g[k], w)


def test_lora_linear_jacobian_matches_the_reference():
    fn, ref, make = CASES["lora_linear"]
    x, w, a, b, bias = make()
    got = torch.func.jacrev(lambda a_: fn(x, w, a_, b, bias))(a)
    want = torch.func.jacrev(lambda a_: ref(x, w, a_, b, bias))(a)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_mode_is_refused(name):
    """No op has a forward-mode derivative: torch.func.jvp and forward-AD dual tensors get a clear error (below
    autograd their tangents were once dropped without a word, a zero derivative)."""
    fn, _, make = CASES[name]
    args = make()
    with pytest.raises(NotImplementedError, match=r"no forward-mode derivative"):
        torch.func.jvp(lambda first: fn(first, *args[1:]), (args[0],), (torch.ones_like(args[0]),))
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(args[0], torch.ones_like(args[0]))
        with pytest.raises(NotImplementedError, match=r"no forward-mode derivative"):
            fn(dual, *args[1:])


# ops whose backward is itself differentiable (made of differentiable ops); the others' backward kernels are not
SECOND_ORDER = {"reversible_coupling", "rotary_embedding"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_second_derivative_matches_the_reference_or_is_refused(name):
    """A gradient penalty (create_graph=True): the reference's second derivative where the op has one, a clear
    error where it has not (it once came out silently zero for ranked_lora_factors and density_loss)."""
    fn, ref, make = CASES[name]
    args = make()

    def penalty_grads(f):
        leaves = [a.clone().requires_grad_() for a in args]
        grads = torch.autograd.grad(_loss(f)(*leaves), leaves, create_graph=True)
        penalty = sum((g * g).sum() for g in grads)
        return torch.autograd.grad(penalty, leaves, allow_unused=True, materialize_grads=True)

    if name in SECOND_ORDER:
        for g, w in zip(penalty_grads(fn), penalty_grads(ref), strict=True):
            torch.testing.assert_close(g, w)
    else:
        with pytest.raises(RuntimeError, match=r"has no second derivative"):
            penalty_grads(fn)


def test_nested_reverse_mode_is_refused():
    """jacrev of grad (reverse over reverse, e.g. a hessian by two reverse passes) would differentiate the backward
    kernels: refused, where the outer pass once read their result as a constant."""
    fn, _, make = CASES["lora_linear"]
    x, w, a, b, bias = make()
    with pytest.raises(RuntimeError, match=r"has no second derivative"):
        torch.func.jacrev(torch.func.grad(lambda a_: _loss(fn)(x, w, a_, b, bias)))(a)
    # and where the op's backward is differentiable, the hessian is the reference's
    fn, ref, make = CASES["rotary_embedding"]
    x, c, s = make()
    got = torch.func.jacrev(torch.func.grad(lambda x_: _loss(fn)(x_, c, s)))(x)
    torch.testing.assert_close(got, torch.func.jacrev(torch.func.grad(lambda x_: _loss(ref)(x_, c, s)))(x))


def _reverse_over_reverse(kind):
    """A second derivative by two reverse passes, built five ways, over a scalar function of one tensor."""
    def second(f, t):
        if kind == "jacrev(jacrev)":
            return torch.func.jacrev(torch.func.jacrev(f))(t)
        if kind == "vjp(vjp)":
            def first(u):
                return torch.func.vjp(f, u)[1](torch.ones((), dtype=u.dtype))[0]
            return torch.func.vjp(first, t)[1](torch.ones_like(t))[0]
        if kind == "hessian by autograd":
            return torch.autograd.functional.hessian(f, t)
        if kind == "autograd around func.grad":  # an input-gradient penalty written with torch.func.grad
            leaf = t.clone().requires_grad_()
            return torch.autograd.grad((torch.func.grad(lambda u: f(u) * leaf.sum())(t) ** 2).sum(), leaf)[0]
        assert kind == "func.grad around autograd.grad"
        def penalty(u):
            return (torch.autograd.grad(f(u), u, create_graph=True)[0] ** 2).sum()
        return torch.func.grad(penalty)(t)
    return second


KINDS = ["jacrev(jacrev)", "vjp(vjp)", "hessian by autograd", "autograd around func.grad",
         "func.grad around autograd.grad"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_every_reverse_over_reverse_is_refused_or_right(name, kind):
    """Each way of differentiating a gradient again raises the op's error, or for the ops that have a second
    derivative gives the reference's. jacrev(jacrev) and vjp of vjp once passed the refusal (their inner backward
    runs after its level has exited) and came out zero, as did an ordinary graph around torch.func.grad."""
    fn, ref, make = CASES[name]
    first, *rest = make()
    second = _reverse_over_reverse(kind)
    if name in SECOND_ORDER:
        torch.testing.assert_close(second(lambda t: _loss(fn)(t, *rest), first),
                                   second(lambda t: _loss(ref)(t, *rest), first))
    else:
        with pytest.raises(RuntimeError, match=r"has no second derivative"):
            second(lambda t: _loss(fn)(t, *rest), first)


@pytest.mark.parametrize("trainable", ["none", "b_down", "w_up", "b_up"])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_adapter_hessian_in_x_with_w_down_frozen(activation, trainable):
    """w_down frozen and a loss linear in y: x is not kept and the incoming gradient is a constant, so no error node
    reached x and the hessian in x came out zero (whatever else trained). With gelu the gradients depend on x
    (through act'(h)): refused; relu's derivative is piecewise constant, so zero is the reference's answer."""
    fn, ref, make = CASES["bottleneck_adapter"]
    x, wd, wu, bd, bu, r = make()
    parts = {"w_up": wu, "b_down": bd, "b_up": bu}
    if trainable != "none":
        parts[trainable] = parts[trainable].clone().requires_grad_()
    wu, bd, bu = parts["w_up"], parts["b_down"], parts["b_up"]
    weights = torch.linspace(-1.0, 2.0, 15, dtype=x.dtype).reshape(3, 5)
    ours = lambda t: (functional.bottleneck_adapter(t, wd, wu, bd, bu, residual=r, activation=activation,  # noqa: E731
                                                    scale=0.7) * weights).sum()
    theirs = lambda t: (reference.bottleneck_adapter(t, wd, bd, wu, bu, r, False, activation, 0.7)  # noqa: E731
                        * weights).sum()
    if activation == "relu":
        torch.testing.assert_close(torch.autograd.functional.hessian(ours, x),
                                   torch.autograd.functional.hessian(theirs, x))
    else:
        assert torch.autograd.functional.hessian(theirs, x).abs().max() > 0.1
        with pytest.raises(RuntimeError, match=r"has no second derivative"):
            torch.autograd.functional.hessian(ours, x)


def test_first_derivatives_of_the_adapter_in_x_under_torch_func_with_frozen_weights():
    """torch.func differentiates with create_graph=True even for a first derivative: the refusal above must not
    fire there (saliency maps, jacobians of a frozen adapter)."""
    fn, ref, make = CASES["bottleneck_adapter"]
    x, *rest = make()
    weights = torch.linspace(-1.0, 2.0, 15, dtype=x.dtype).reshape(3, 5)
    def linear_loss(f):
        return lambda t: (f(t, *rest) * weights).sum()
    torch.testing.assert_close(torch.func.grad(linear_loss(fn))(x), torch.func.grad(linear_loss(ref))(x))
    torch.testing.assert_close(torch.func.jacrev(lambda t: fn(t, *rest))(x),
                               torch.func.jacrev(lambda t: ref(t, *rest))(x))
    batched = torch.stack([make()[0] for _ in range(3)])
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(linear_loss(fn)))(batched),
                               torch.func.vmap(torch.func.grad(linear_loss(ref)))(batched))


@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace:UserWarning")
@pytest.mark.parametrize("name", ["lora_linear", "bottleneck_adapter"])
def test_compiled_per_sample_gradients_match_the_reference(name):
    """torch.compile over torch.func: the op once went through torch.library's autograd registration there, which
    functorch cannot use, and compiling failed with an error inside fake-tensor propagation. Now it takes the
    same autograd.Function as eager torch.func (Dynamo runs that part eagerly: a graph break, said by a warning)."""
    fn, ref, make = CASES[name]
    args = make()
    batched = torch.stack([make()[0] for _ in range(3)])
    argnums = tuple(range(len(args)))
    in_dims = (0,) + (None,) * (len(args) - 1)
    want = torch.func.vmap(torch.func.grad(_loss(ref), argnums=argnums), in_dims=in_dims)(batched, *args[1:])
    torch._dynamo.reset()
    got = torch.compile(torch.func.vmap(torch.func.grad(_loss(fn), argnums=argnums), in_dims=in_dims),
                        backend="aot_eager")(batched, *args[1:])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    got = torch.compile(torch.func.grad(_loss(fn), argnums=argnums), backend="aot_eager")(*args)
    for g, w in zip(got, torch.func.grad(_loss(ref), argnums=argnums)(*args), strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("name", sorted(CASES))
def test_legacy_batched_gradients_match_the_reference_or_are_refused(name):
    """torch.autograd.grad(is_grads_batched=True) batches the backward with torch's legacy vmap, which takes no
    registered rule: the ops whose backward kernel has optional outputs failed there with an error naming the
    internal backward op; they now say what to use instead, and the others give the reference's gradients."""
    fn, ref, make = CASES[name]
    args = [a.requires_grad_() for a in make()]
    y = fn(*args)
    cotangents = torch.randn(4, *y.shape, dtype=y.dtype)
    if name in ("lora_linear", "bottleneck_adapter", "ranked_lora_factors"):
        with pytest.raises(RuntimeError, match=r"cannot be batched by torch.autograd.grad\(is_grads_batched=True\).*"
                                               r"use torch.func.jacrev"):
            torch.autograd.grad(y, args, cotangents, is_grads_batched=True)
        return
    got = torch.autograd.grad(y, args, cotangents, is_grads_batched=True)
    ref_args = [a.detach().clone().requires_grad_() for a in args]
    want = torch.autograd.grad(ref(*ref_args), ref_args, cotangents, is_grads_batched=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_modules_trace_with_torch_jit(tmp_path):
    """torch.jit.trace once failed its own check with a dump of two differing graphs (the op was called through an
    autograd.Function with grad, directly without): traced, saved and loaded, a module computes the same outputs
    and gradients as in eager mode."""
    from pefttorch.nn import BottleneckAdapter, LoRALinear, SparseMLP

    torch.manual_seed(0)
    for module in (LoRALinear(8, 6, r=3), BottleneckAdapter(8, 3, activation="gelu")):
        with torch.no_grad():
            for p in module.parameters():
                p.normal_()
        torch.jit.save(torch.jit.trace(module, torch.randn(4, 8)), tmp_path / "traced.pt")
        traced = torch.jit.load(tmp_path / "traced.pt")
        x = torch.randn(5, 8, requires_grad=True)
        trained = [n for n, p in module.named_parameters() if p.requires_grad]  # (LoRALinear's weight is frozen)
        loaded = dict(traced.named_parameters())  # the loaded module's own copies
        got = traced(x)
        got_grads = torch.autograd.grad(got.square().sum(), [x, *(loaded[n] for n in trained)])
        want = module(x)
        want_grads = torch.autograd.grad(want.square().sum(), [x, *(module.get_parameter(n) for n in trained)])
        torch.testing.assert_close(got, want)
        for g, w in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(g, w)
    # the inference module: traced on a decode-sized input (its sparse path), right for a longer one too
    mlp = SparseMLP(torch.randn(16, 8), torch.randn(16, 8), w_up=torch.randn(16, 8), activation="silu", threshold=0.3)
    torch.jit.save(torch.jit.trace(mlp, torch.randn(3, 8)), tmp_path / "mlp.pt")
    traced = torch.jit.load(tmp_path / "mlp.pt")
    for tokens in (3, 40):
        x = torch.randn(tokens, 8)
        torch.testing.assert_close(traced(x), mlp(x))
