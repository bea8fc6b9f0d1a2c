"""SparseMLP: an MLP block for inference that computes only the neurons a token activates (DEFT)."""

from __future__ import annotations

import inspect
import sys

import torch
from torch import nn

from .. import functional
from ._scripting import NotScriptable


@torch.no_grad()
def _check_computes_as(mlp: nn.Module, sparse: SparseMLP, layout=None) -> None:
    """Refuses a block whose parts have the names of a known layout but whose forward computes something else (say
    Gemma-3n's MLP, which sparsifies its gate before the activation, or LightGlue's, which normalises between fc1 and
    the activation): a probe through both at threshold 0 must agree up to rounding. A block kept in place (`layout`
    not replace: fc1/fc2) is probed against itself with the swap sparsify makes (its own residual and norm around
    the MLP stay: DETR's FFN modules). The block runs in eval mode for it (its dropout off) and is left as it was."""
    w = sparse.w_in
    if w.device.type == "meta":
        return
    x = torch.randn(4, sparse.in_features, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    modes = [(m, m.training) for m in mlp.modules()]
    threshold, sparse.threshold = sparse.threshold, 0.0
    try:
        mlp.eval()
        # An overflow says nothing of what the block computes (inf - inf is NaN, and a half-precision block with
        # large weights, as T5's in float16, overflows on a unit-scale probe): a smaller probe is tried instead.
        for scale in (1.0, 2.0**-8, 2.0**-16):
            probe = (x * scale).to(device=w.device, dtype=sparse.input_dtype)
            want = mlp(probe)
            got = sparse(probe) if layout is None else _swapped_call(mlp, sparse, layout, probe)
            if not isinstance(want, torch.Tensor) or want.shape != got.shape:
                raise ValueError(f"{type(mlp).__name__} does not compute as an MLP block of its layout (its output is "
                                 f"not one tensor of shape {tuple(got.shape)}): SparseMLP cannot replace it")
            if want.isfinite().all() and got.isfinite().all():
                break
        else:
            raise ValueError(f"{type(mlp).__name__}: a probe overflows {sparse.input_dtype} at every scale tried, so "
                             "SparseMLP cannot check that it computes as the block does")
    finally:
        sparse.threshold = threshold
        for m, training in modes:
            m.training = training
    if want.dtype != got.dtype:
        raise ValueError(f"{type(mlp).__name__} returns {want.dtype} where SparseMLP would return {got.dtype}: "
                         "SparseMLP cannot replace it")
    scale = want.float().abs().max().item()
    # the narrowest dtype the block computes in sets the rounding (T5 in float16 keeps only `wo` in float32)
    exact = sparse.input_dtype in (torch.float32, torch.float64) and w.dtype in (torch.float32, torch.float64)
    tol = (1e-4 if exact else 5e-2) * scale + 1e-6
    error = (want.float() - got.float()).abs().max().item()
    if not error <= tol:
        raise ValueError(f"{type(mlp).__name__} has the parts of an MLP block SparseMLP knows but computes something "
                         f"else (a probe differs by {error:.2e} against an output scale of {scale:.2e}): SparseMLP "
                         f"cannot replace it")


def _swapped_call(mlp: nn.Module, sparse: SparseMLP, layout, x: torch.Tensor) -> torch.Tensor:
    """`mlp(x)` with its parts swapped as sparsify swaps them in place (the bypassed ones the identity, the down
    projection `sparse`), then put back."""
    paths = (*layout.bypass, layout.down)
    parts = [mlp.get_submodule(p) for p in paths]
    try:
        for p in layout.bypass:
            mlp.set_submodule(p, nn.Identity())
        mlp.set_submodule(layout.down, sparse)
        try:
            return mlp(x)
        except Exception as err:  # a module between the parts now sees the hidden width (Kosmos-2), or reads a part
            raise ValueError(f"{type(mlp).__name__} computes something between the parts SparseMLP would replace "
                             f"(with them swapped its forward fails: {str(err)[:120]}): SparseMLP cannot replace "
                             "it") from None
    finally:
        for p, part in zip(paths, parts, strict=True):
            mlp.set_submodule(p, part)


def _takes_the_hidden_states_alone(mlp: nn.Module) -> bool:
    """Whether a block of a layout kept in place (fc1/fc2) is an MLP module that a probe can call on the hidden states
    alone (Phi's, CLIP's, LightGlue's, Kosmos-2's FFN), rather than a layer that also takes an attention mask and
    computes attention around its MLP (BART's), which only the structural checks of sparsify can judge."""
    params = list(inspect.signature(mlp.forward).parameters.values())
    return len(params) == 1 and params[0].kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                   inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _is_hf_peft_layer(layer: nn.Module) -> bool:
    """An HF PEFT tuner layer (LoRA, IA3, ...): if peft is not imported, no layer can be one (not imported here)."""
    tuners_utils = sys.modules.get("peft.tuners.tuners_utils")
    return tuners_utils is not None and isinstance(layer, tuners_utils.BaseTunerLayer)


def _weight_rows(layer: nn.Module) -> torch.Tensor:
    """The weight of an nn.Linear or transformers Conv1D as (out, in) rows, without a copy for nn.Linear."""
    from ..tuners.lora.layer import LoraLayer, conv1d_class, has_linear_forward, is_linear

    if isinstance(layer, LoraLayer) or _is_hf_peft_layer(layer):
        raise ValueError(f"the MLP holds adapter layers ({type(layer).__module__}.{type(layer).__name__}): merge the "
                         "adapters first (merge_and_unload()), then sparsify")
    if not is_linear(layer):
        raise ValueError(f"SparseMLP is built from nn.Linear or Conv1D projections, got {type(layer).__name__}")
    if not has_linear_forward(layer) or "forward" in layer.__dict__:  # SparseMLP reads the weight, never calls it
        raise ValueError(f"SparseMLP reads the projections' weights, but {type(layer).__name__} has a forward of its "
                         "own (fake quantization, weight noise...) that it would skip")
    conv1d = conv1d_class()
    return layer.weight.detach().t() if conv1d is not None and isinstance(layer, conv1d) else layer.weight.detach()


def _bias(layer: nn.Module) -> torch.Tensor | None:
    return None if layer.bias is None else layer.bias.detach()


def checked_threshold(threshold, where: str) -> float:
    """`threshold` as a float, or a clear error from `where`: float() took True as 1.0 and "0.1" as 0.1."""
    from ..tuners._config import plain_number

    value = plain_number(threshold)  # numpy's and 0-d tensors are numbers
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: threshold must be a number >= 0, got {type(threshold).__name__} {threshold!r}")
    if not value >= 0.0:  # also refuses NaN
        raise ValueError(f"{where}: threshold must be >= 0, got {float(value)}")
    return float(value)


class SparseMLP(NotScriptable, nn.Module):
    """``y = mask(h) W_down^T + b_down``, ``h = act(x W_in^T + b_in)`` (times ``x W_up^T + b_up`` if gated),
    where the mask zeroes every neuron whose activation has magnitude <= ``threshold``.

    For up to 16 tokens (decode) pefttorch's kernels compute the gate for every neuron, then read the up
    and down projection rows of the active neurons only, so the time follows the activation density; above
    16 tokens, or on the CPU when more than 30-45% of the neurons are active (measured), a dense path with
    the same mask serves. (On CUDA the density cutoff is still to be measured: today it stays sparse.)

    Error: at ``threshold = 0`` the output equals the dense MLP up to rounding. Above 0, each output
    element differs from the dense MLP's by at most ``threshold * sum_i |u_i| |W_down[o, i]|`` over the
    masked neurons i, with ``u_i = 1`` for an ungated MLP and the up projection's value for a gated one
    (see :meth:`error_bound`). DEFT's density loss trains the activations to sit at zero or well above it,
    which keeps this small.

    The weights are frozen and shared with the MLP it was built from, except the down projection, kept
    transposed (``w_down_t``, ``(intermediate, out)``) so an active neuron's row is contiguous. It is an
    inference module, created in eval mode: calling it in training mode is an error (the dropout of the
    original block is not reproduced).

    ``input_dtype`` (default: the weights') is the dtype of the inputs the block takes when its weights are wider:
    such inputs are cast to the weights' dtype, and the output has it (see :meth:`from_linears`).
    """

    def __init__(self, w_in: torch.Tensor, w_down_t: torch.Tensor, *, b_in: torch.Tensor | None = None,
                 w_up: torch.Tensor | None = None, b_up: torch.Tensor | None = None,
                 b_down: torch.Tensor | None = None, activation: str = "relu", threshold: float = 0.0,
                 input_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        threshold = checked_threshold(threshold, "SparseMLP")
        from ..reference import ACTIVATIONS

        if activation not in ACTIVATIONS:
            raise ValueError(f"SparseMLP: unsupported activation {activation!r}; supported: {', '.join(ACTIVATIONS)}")
        if w_in.dim() != 2 or w_down_t.dim() != 2 or w_down_t.shape[0] != w_in.shape[0]:
            raise ValueError(f"SparseMLP: w_in (intermediate, hidden) and w_down_t (intermediate, out) must agree on "
                             f"intermediate, got {tuple(w_in.shape)} and {tuple(w_down_t.shape)}")
        if w_up is not None and w_up.shape != w_in.shape:
            raise ValueError(f"SparseMLP: w_up must have w_in's shape {tuple(w_in.shape)}, got {tuple(w_up.shape)}")

        given = {"w_in": w_in, "b_in": b_in, "w_up": w_up, "b_up": b_up, "w_down_t": w_down_t, "b_down": b_down}
        mixed = {k: t.dtype for k, t in given.items() if t is not None and t.dtype != w_in.dtype}
        if mixed:
            raise ValueError(f"SparseMLP: all weights must have w_in's dtype {w_in.dtype}, got {mixed}")

        def frozen(t):
            # contiguous once here: the kernels read rows (a no-op for nn.Linear weights, which are shared)
            return None if t is None else nn.Parameter(t.detach().contiguous(), requires_grad=False)

        self.w_in, self.b_in, self.w_up, self.b_up = frozen(w_in), frozen(b_in), frozen(w_up), frozen(b_up)
        self.w_down_t, self.b_down = frozen(w_down_t), frozen(b_down)
        self.activation = activation
        self.threshold = threshold
        self.input_dtype = w_in.dtype if input_dtype is None else input_dtype
        self.eval()  # an inference module starts ready for inference

    @classmethod
    def from_linears(cls, gate: nn.Module, down: nn.Module, activation: str | nn.Module, threshold: float = 0.0,
                     up: nn.Module | None = None) -> SparseMLP:
        """From the projections of an MLP (nn.Linear or transformers Conv1D) and its activation (a name or an
        activation module such as nn.GELU or transformers' GELUActivation)."""
        from ..tuners.density.mlp import activation_name

        act = activation if isinstance(activation, str) else activation_name(activation)
        w_in, w_down = _weight_rows(gate), _weight_rows(down)
        # T5 v1.1 in float16 keeps `wo` in float32 (transformers' _keep_in_fp32_modules), and its block casts the
        # hidden to wo's dtype and returns float32: in float16 the down projection overflowed or lost the precision
        # kept for it. The kernels compute in one dtype, so the block computes in the down projection's, with
        # copies of the input projections in it (no copy when the dtypes agree, the usual case).
        dtype = w_down.dtype

        def cast(t):
            return None if t is None else t.to(dtype)

        return cls(cast(w_in), w_down.t(), b_in=cast(_bias(gate)), w_up=None if up is None else cast(_weight_rows(up)),
                   b_up=None if up is None else cast(_bias(up)), b_down=_bias(down), activation=act,
                   threshold=threshold, input_dtype=w_in.dtype)

    @classmethod
    def from_mlp(cls, mlp: nn.Module, threshold: float = 0.0) -> SparseMLP:
        """From a transformers MLP block: Llama-style gated (gate_proj, up_proj, down_proj), T5's
        DenseReluDense (gated or not), GPT-2's MLP, or a BERT/BART layer (whose MLP is spread over the
        layer: use :func:`pefttorch.sparsify` to swap those in place)."""
        from ..tuners.density.mlp import SUPPORTED, layout_of

        layout = layout_of(mlp)
        if layout is None:
            raise ValueError(f"{type(mlp).__name__} is not an MLP block SparseMLP knows; supported are the MLPs of "
                             f"{SUPPORTED}")
        part = mlp.get_submodule
        gate, down = part(layout.gate), part(layout.down)
        inter, down_in = _weight_rows(gate).shape[0], _weight_rows(down).shape[1]
        if inter != down_in:
            raise ValueError(f"{type(mlp).__name__}: its {layout.gate} gives {inter} features but its {layout.down} "
                             f"takes {down_in}, so its forward computes more than the activation between them (a GLU "
                             "splits the output in two, as Moonshine's): SparseMLP cannot replace it")
        sparse = cls.from_linears(gate, down, part(layout.act), threshold, up=part(layout.up) if layout.up else None)
        if layout.replace:
            _check_computes_as(mlp, sparse)
        elif _takes_the_hidden_states_alone(mlp):
            _check_computes_as(mlp, sparse, layout)
        return sparse

    @property
    def in_features(self) -> int:
        return self.w_in.shape[1]

    @property
    def intermediate_size(self) -> int:
        return self.w_in.shape[0]

    @property
    def out_features(self) -> int:
        return self.w_down_t.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise RuntimeError("SparseMLP is an inference module: call model.eval() first (it does not reproduce the "
                               "original block's dropout, and its mask has no gradient)")
        if x.dtype == self.input_dtype != self.w_in.dtype:  # as T5's block casts its hidden to wo's dtype
            x = x.to(self.w_in.dtype)
        return functional.sparse_mlp(x, self.w_in, self.w_down_t, b_in=self.b_in, w_up=self.w_up, b_up=self.b_up,
                                     b_down=self.b_down, activation=self.activation, threshold=self.threshold)

    def _gate(self, x: torch.Tensor) -> torch.Tensor:
        """act(x W_in^T + b_in) in plain PyTorch, for the diagnostics below."""
        from ..reference import ACTIVATIONS

        return ACTIVATIONS[self.activation](torch.nn.functional.linear(x, self.w_in, self.b_in))

    @torch.no_grad()
    def active_share(self, x: torch.Tensor) -> float:
        """Share of neurons some token of `x` activates: what the sparse kernel's cost follows."""
        g = self._gate(x.to(self.w_in.dtype))
        return (g.abs() > self.threshold).reshape(-1, g.shape[-1]).any(0).float().mean().item()

    @torch.no_grad()
    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        """Per output element, the bound on |SparseMLP(x) - dense MLP(x)| (exact arithmetic) stated above."""
        x = x.to(self.w_in.dtype)
        g = self._gate(x)
        u = torch.nn.functional.linear(x, self.w_up, self.b_up).abs() if self.w_up is not None else torch.ones_like(g)
        masked = (g.abs() <= self.threshold).to(g.dtype)
        return self.threshold * ((masked * u) @ self.w_down_t.abs())

    def extra_repr(self) -> str:
        kind = "gated" if self.w_up is not None else "ungated"
        return (f"in_features={self.in_features}, intermediate_size={self.intermediate_size}, "
                f"out_features={self.out_features}, {kind}, activation={self.activation}, threshold={self.threshold:g}")
