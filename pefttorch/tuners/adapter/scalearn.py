"""ScaLearn (Frohmann et al. 2024, "ScaLearn: Simple and Highly Parameter-Efficient Task Transfer by Learning to
Scale"): the second stage of two-stage multi-task learning. Bottleneck adapters trained on N source tasks stay
frozen; at every adapter site their outputs are mixed by learned scales, ``h + sum_i omega_i * delta_i(h)``, and
only the scales train (one per source and feature, or one per source; per site, or shared by all sites).

Saved in pefttorch's format, self-contained: ``adapter_config.json`` (the ScaLearnConfig, with the source
adapters' configs inline) and ``adapter_model.safetensors`` with ``omega.<site>`` (``omega.shared``) and the
frozen sources under ``sources.<i>.<site>.{down,up}.{weight,bias}``, so a saved ScaLearn model loads without the
source folders.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from .._config import SavedConfig, normalize_common, reject_unknown_fields
from .._hooked import HookedModel
from ..lora.model import _in_modules_to_save
from ..prompt.model import WEIGHTS_FOLLOW
from .config import PEFT_TYPE as ADAPTER
from .config import AdapterConfig, check_finite
from .model import AdapterModel, Site, build_adapters, find_sites

SCALEARN = "SCALEARN"
SHAPES = ("vector", "scalar")


@reject_unknown_fields
@dataclass
class ScaLearnConfig(SavedConfig):
    """Learned scaling of several frozen source adapters' outputs.

    Args:
        source_adapters: folders of bottleneck adapters saved by pefttorch (``AdapterConfig``), one per source
            task; they must sit at the same places of the model (same style, layers and cross-attention).
        omega_shape: ``"vector"`` (ScaLearn: a scale per source and feature) or ``"scalar"`` (ScaLearnUniform:
            one per source).
        shared: one set of scales for all sites (the papers' "++" variants) instead of one per site.
        omega_init_scale: the scales start at ``omega_init_scale / N`` (the average of the sources), with noise
            of standard deviation 0.001 (as the paper's code).
        modules_to_save: modules trained in full and saved with the scales (e.g. a new classifier).
        source_configs: filled in when the sources are read, in the model's copy of the config (its
            ``peft_config``; saved with the scales so that loading needs no source folder); not set by hand.
    """

    source_adapters: list[str] = field(default_factory=list)
    omega_shape: str = "vector"
    shared: bool = False
    omega_init_scale: float = 1.0
    modules_to_save: list[str] | None = None
    source_configs: list[dict] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False
    peft_type: str = field(default=SCALEARN, init=False)
    peft_type_name: ClassVar[str] = SCALEARN

    def __post_init__(self) -> None:
        normalize_common(self)  # first: it makes numpy's numbers plain for the checks
        if isinstance(self.source_adapters, (str, Path)):
            self.source_adapters = [self.source_adapters]
        if not isinstance(self.source_adapters, (list, tuple)) \
                or not all(isinstance(p, (str, Path)) for p in self.source_adapters):
            raise ValueError(f"ScaLearnConfig: source_adapters must be a folder or a list of folders, got "
                             f"{self.source_adapters!r}")
        self.source_adapters = [str(p) for p in self.source_adapters]
        if self.source_configs is not None and not (isinstance(self.source_configs, list) and all(
                isinstance(c, dict) for c in self.source_configs)):
            raise ValueError(f"ScaLearnConfig: source_configs must be None or a list of the sources' saved configs "
                             f"(dicts), got {self.source_configs!r}")
        count = len(self.source_configs) if self.source_configs is not None else len(self.source_adapters)
        if count < 1:
            raise ValueError("ScaLearnConfig: source_adapters is empty; give the folders of the source tasks' "
                             "bottleneck adapters")
        if self.omega_shape not in SHAPES:
            raise ValueError(f"ScaLearnConfig: omega_shape must be one of {', '.join(SHAPES)}, got "
                             f"{self.omega_shape!r}")
        check_finite("ScaLearnConfig", "omega_init_scale", self.omega_init_scale)


def _placement(config: AdapterConfig) -> str:
    """What decides where a source's adapters go, as the config says it."""
    after_attention, after_ffn, parallel = config.placement
    return (f"style {config.style!r}, after_attention={after_attention}, after_ffn={after_ffn}, "
            f"parallel_ffn={parallel}, cross_attention={config.cross_attention}, "
            f"layers_to_transform={config.layers_to_transform}")


def _read_source(path: str) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    from ...integrations.hf_format import read_adapter_tensors
    from ...peft_model import _load_config  # PeftModel's reader of every saved type (it imports this module)

    config = _load_config(path, is_trainable=False)
    if not isinstance(config, AdapterConfig):
        raise ValueError(f"ScaLearn source {path}: a {config.peft_type!r} adapter; ScaLearn mixes bottleneck "
                         f"adapters ({ADAPTER})")
    return config, read_adapter_tensors(Path(path))


class ScaLearnModel(AdapterModel):
    """A transformers model with N frozen source adapter sets at every site, mixed by learned scales."""

    method = "ScaLearn"

    def __init__(self, model: nn.Module, config: ScaLearnConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True) -> None:
        sources = None
        if config.source_configs is None or not WEIGHTS_FOLLOW.get():
            # a new ScaLearn model: the sources come from their folders, also where the config holds their configs
            # already (a model's peft_config given to get_peft_model again: without reading, the sources were
            # untrained and the model was the base model). Only loading a saved ScaLearn model, whose file holds
            # the sources' weights, goes without the folders.
            sources = [_read_source(p) for p in config.source_adapters]
            # into a copy: the caller's config, given to get_peft_model again (another seed, another model), would
            # otherwise name saved sources
            config = config.replace(source_configs=[c.to_dict() for c, _ in sources])
        HookedModel.__init__(self, model, config, adapter_name)
        configs = [AdapterConfig.from_dict(d) for d in config.source_configs]
        self.sites = find_sites(model, configs[0])
        inside = [s.output for s in self.sites if any(_in_modules_to_save(n, config.modules_to_save)
                                                      for n in (s.output, s.input) if n is not None)]
        if inside:
            # the wrapper runs a trained deep copy of the module, whose hooks would mix copies of the sources and
            # scales: the real scales there would never run (untrained, yet saved)
            raise ValueError(f"ScaLearn: modules_to_save {config.modules_to_save} holds the sources' adapter sites "
                             f"{inside}; name modules outside them (e.g. a new classifier head)")
        for i, c in enumerate(configs[1:], 1):
            if [(s.key, s.kind) for s in find_sites(model, c)] != [(s.key, s.kind) for s in self.sites]:
                raise ValueError(f"ScaLearn: source {i} ({_placement(c)}) puts its adapters at other places than "
                                 f"source 0 ({_placement(configs[0])}); all sources must share their sites")
        self.sources = nn.ModuleList(build_adapters(model, self.sites, c, autocast_adapter_dtype) for c in configs)
        reference = next(self.sources.parameters())
        factory = {"device": reference.device, "dtype": reference.dtype}
        if sources is not None:
            for i, (source, (_, tensors)) in enumerate(zip(self.sources, sources, strict=True)):
                state = {k[len("adapters."):]: v for k, v in tensors.items() if k.startswith("adapters.")}
                # (not those of modules this config trains itself: the advice below, followed, still warned)
                unused = sorted(k for k in tensors if not k.startswith("adapters.") and not _in_modules_to_save(
                    k.removeprefix("base_model.model.").rpartition(".")[0], config.modules_to_save))
                if unused:
                    # a source's trained head (modules_to_save) or resized embeddings: not a mixable adapter,
                    # and dropping them in silence made the model differ from the source's
                    warnings.warn(f"ScaLearn source {config.source_adapters[i]}: only its adapters are mixed; its "
                                  f"file also holds {unused} (its modules_to_save or embeddings), which are not "
                                  "used: name the modules to train in this ScaLearnConfig's modules_to_save",
                                  UserWarning, stacklevel=2)
                try:
                    source.load_state_dict(state)
                except RuntimeError as error:
                    raise ValueError(f"ScaLearn source {config.source_adapters[i]} does not fit this model: "
                                     f"{error}") from None
        n = len(configs)
        widths = {s.features for s in self.sites}
        if config.shared and config.omega_shape == "vector" and len(widths) > 1:
            raise ValueError(f"ScaLearn: shared vector scales need one width at every site, the sites have "
                             f"{sorted(widths)}; use omega_shape='scalar' or shared=False")

        def omega(features: int) -> nn.Parameter:
            shape = (n, features if config.omega_shape == "vector" else 1)
            return nn.Parameter(torch.normal(config.omega_init_scale / n, 0.001, shape).to(**factory))

        self.omega = nn.ParameterDict({"shared": omega(widths.pop())} if config.shared
                                      else {s.key: omega(s.features) for s in self.sites})
        self._inputs: dict[str, torch.Tensor] = {}
        self._hook_sites()
        self.finish()

    def apply(self, site: Site, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        deltas = torch.stack([source[site.key].delta(x) for source in self.sources])
        omega = self.omega["shared" if self.method_config.shared else site.key].to(deltas.dtype)
        omega = omega.view(omega.shape[0], *([1] * (deltas.dim() - 2)), omega.shape[1])
        return residual + (omega * deltas).sum(dim=0)

    def adapter_parameters(self):
        return list(self.omega.parameters())  # the sources stay frozen

    def own_tensors(self):
        tensors = {f"omega.{k}": v for k, v in self.omega.items()}
        for i, source in enumerate(self.sources):
            tensors.update({f"sources.{i}.{k}": v for k, v in source.state_dict().items()})
        return tensors
