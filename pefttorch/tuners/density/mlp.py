"""Where the MLP blocks of transformers models are, and which activation they use.

One table serves both halves of DEFT: the density loss hooks each block's activation module, and
sparsify replaces each block by a SparseMLP. A block is found by its structure (the names of its
parts), so every model of a family is covered, not a list of classes.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class MlpLayout:
    """How one family lays out an MLP block, as attribute paths relative to the block's module.

    ``gate`` is the projection the activation is applied to (the only input projection of an ungated
    MLP), ``up`` the gated MLP's other input projection, ``down`` the output projection. If ``replace``
    is True the whole block becomes a SparseMLP; otherwise the block also holds other things (BERT's
    layer, BART's layer), so ``down`` becomes the SparseMLP and ``bypass`` (the gate and activation,
    which the SparseMLP now computes) become identities.
    """

    family: str
    gate: str
    down: str
    act: str
    up: str | None = None
    replace: bool = True
    bypass: tuple[str, ...] = ()


LAYOUTS = (
    MlpLayout("gated (Llama, Mistral, Qwen2, Gemma, ...)", gate="gate_proj", up="up_proj", down="down_proj",
              act="act_fn"),
    MlpLayout("T5 gated (T5 v1.1, Flan-T5)", gate="wi_0", up="wi_1", down="wo", act="act"),
    MlpLayout("T5", gate="wi", down="wo", act="act"),
    MlpLayout("GPT-2", gate="c_fc", down="c_proj", act="act"),
    MlpLayout("BERT, RoBERTa", gate="intermediate.dense", down="output.dense", act="intermediate.intermediate_act_fn",
              replace=False, bypass=("intermediate",)),
    MlpLayout("BART, Marian, mBART", gate="fc1", down="fc2", act="activation_fn", replace=False,
              bypass=("fc1", "activation_fn")),
)
SUPPORTED = ", ".join(layout.family for layout in LAYOUTS)


def _get(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


@dataclass
class MlpBlock:
    name: str  # the block's module name in the model ("" for the model itself)
    module: nn.Module
    layout: MlpLayout

    def part(self, path: str) -> nn.Module:
        return _get(self.module, path)

    def part_name(self, path: str) -> str:
        return f"{self.name}.{path}" if self.name else path

    @property
    def activation(self) -> nn.Module:
        return self.part(self.layout.act)


def layout_of(module: nn.Module) -> MlpLayout | None:
    """The layout `module` has, if it is an MLP block (its parts exist and the activation is a module)."""
    for layout in LAYOUTS:
        paths = [layout.gate, layout.down, layout.act] + ([layout.up] if layout.up else [])
        if all(isinstance(_get(module, p), nn.Module) for p in paths):
            return layout
    return None


def find_mlp_blocks(model: nn.Module) -> list[MlpBlock]:
    """Every MLP block of `model` in module order; raises if there is none, naming the supported families, or if the
    model has experts that are no such block."""
    blocks, inside = [], ()
    for name, module in model.named_modules():
        if inside and name.startswith(inside):
            continue
        layout = layout_of(module)
        if layout is not None:
            blocks.append(MlpBlock(name, module, layout))
            inside += (f"{name}." if name else "",)
    experts = _experts_outside(model, blocks)
    if experts:
        # Qwen2-MoE's shared expert (and Qwen3-MoE's dense mlp_only_layers) is a gated MLP beside fused routed
        # experts: taking the model for the blocks found, the density loss left the experts out of its term and
        # sparsify left them dense, silently
        others = (f"they would cover only its {len(blocks)} other MLP block(s) (a shared expert, dense layers), "
                  "leaving the experts dense and out of the density term" if blocks else "it has no other MLP")
        raise ValueError(f"{type(model).__name__} has mixture-of-experts modules whose experts are no MLP block of a "
                         f"supported family ({', '.join(experts[:3])}{' ...' if len(experts) > 3 else ''}: "
                         f"{type(model.get_submodule(experts[0])).__name__}), which the density loss and sparsify "
                         f"cannot cover: {others}. A model whose layers are all dense MLPs (Qwen3-MoE with every "
                         f"layer in mlp_only_layers) is supported. Supported are the MLPs of {SUPPORTED}")
    if not blocks:
        raise ValueError(f"found no MLP block in {type(model).__name__}: supported are the MLPs of {SUPPORTED}")
    return blocks


def _experts_outside(model: nn.Module, blocks: list[MlpBlock]) -> list[str]:
    """The mixture-of-experts modules of `model` that are neither in nor around an MLP block found: transformers 5 fuses
    a layer's experts into one module of 3-D weights (Qwen2MoeExperts, MixtralExperts). Found by the name the
    models give them (experts) or by their class's (...Experts); a list of experts of a known layout (Switch
    Transformers') holds blocks, and is covered."""
    found = [f"{b.name}." for b in blocks]
    names = []
    for name, module in model.named_modules():
        if not (name.rpartition(".")[2] == "experts" or "expert" in type(module).__name__.lower()):
            continue
        if any(f"{name}.".startswith(f) or f.startswith(f"{name}.") for f in found + [f"{n}." for n in names]):
            continue  # in a block, around blocks, or in experts already named
        names.append(name)
    return names


# activation module class name -> the kernels' activation name
_ACTIVATION_CLASSES = {
    "ReLU": "relu",
    "GELUActivation": "gelu",
    "NewGELUActivation": "gelu_tanh",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh",
    "AccurateGELUActivation": "gelu_tanh",
    "SiLUActivation": "silu",
    "SiLU": "silu",
}


def activation_name(act: nn.Module) -> str:
    """The kernels' name ("relu", "gelu", "gelu_tanh", "silu") for an activation module, or a clear error."""
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    name = _ACTIVATION_CLASSES.get(type(act).__name__)
    if name is None:
        raise ValueError(f"activation {type(act).__name__} is not supported by SparseMLP; supported: ReLU, GELU (erf "
                         "and tanh approximation), SiLU")
    return name
