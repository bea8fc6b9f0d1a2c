"""Adapters on disk in HF PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..tuners.lora.config import LoraConfig
from ..tuners.lora.layer import ModulesToSaveWrapper

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"  # older HF PEFT saves (a pickled state dict)


def save_adapter(directory: Path, config: LoraConfig, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    on_meta = sorted(k for k, v in tensors.items() if v.device.type == "meta")
    if on_meta:
        raise ValueError(f"cannot save the adapter: {len(on_meta)} of its tensors are on the meta device, which holds "
                         f"no values (first: {on_meta[0]}); materialize the model (to_empty() and load its weights)")
    directory.mkdir(parents=True, exist_ok=True)
    # written for inference, as HF PEFT writes it: its PeftConfig.from_pretrained + get_peft_model route then gives a
    # frozen adapter (the loaders here set the field from is_trainable)
    saved = copy.copy(config)
    saved.inference_mode = True
    saved.save(directory)
    # safetensors refuses tensors that share memory (tied weights in a saved head): write copies. Keys without the
    # segments a wrapper of the base model adds (torch.compile's _orig_mod): HF PEFT loads them into a plain model
    save_file({_unwrapped(k): v.detach().clone().contiguous().cpu() for k, v in tensors.items()},
              str(directory / WEIGHTS_NAME), metadata={"format": "pt"})


def read_adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / WEIGHTS_NAME).is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(directory / WEIGHTS_NAME))
        except SafetensorError as err:  # its message names no file
            raise ValueError(f"{directory / WEIGHTS_NAME}: not a readable safetensors file ({err})") from err
    if (directory / LEGACY_WEIGHTS_NAME).is_file():
        return torch.load(directory / LEGACY_WEIGHTS_NAME, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{directory}: no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME})")


def _embedding_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, torch.nn.Module | None]]:
    """(path, module, wrapper) of the input and output embedding layers: the module holding their own tensors (the
    base layer of an adapter's wrapper, or the layer itself: wrapper None) and its path."""
    out = []
    names = {id(module): name for name, module in model.named_modules()}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            layer = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            continue
        if layer is None:
            continue
        if isinstance(layer, ModulesToSaveWrapper):
            # the layer's own tensors are its original's (HF PEFT's key: <path>.original_module.<key>); the trained
            # copy is saved as modules_to_save (keyed with the adapter's name, the whole wrapper was written, under a
            # key no other name could load)
            if id(layer) in names:
                out.append((f"{names[id(layer)]}.original_module", layer.original_module, layer))
            continue
        wrapped = getattr(layer, "base_layer", None)
        module = layer if wrapped is None else wrapped
        if id(module) in names:
            out.append((names[id(module)], module, None if wrapped is None else layer))
    return out


def _keyed(path: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"base_model.model.{path}.{key}": value.detach() for key, value in module.state_dict().items()}


def embedding_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The input and output embedding layers' own tensors, under the keys a saved adapter may hold them (see
    :func:`saved_embedding_tensors`): what the loader copies such tensors into."""
    out = {}
    for path, module, wrapper in _embedding_layers(model):
        out.update(_keyed(path, module))
        if wrapper is None:
            # HF PEFT wraps every targeted module and saves it as <path>.base_layer.<key>; a method that adapts it by
            # hooks here ((IA)^3) leaves it unwrapped, so that key also names the module's own tensors
            out.update(_keyed(f"{path}.base_layer", module))
    return out


def saved_embedding_tensors(model: torch.nn.Module, adapter: str, setting: bool | str) -> dict[str, torch.Tensor]:
    """The embedding tensors HF PEFT's save_pretrained(save_embedding_layers=`setting`) writes next to `adapter`:
    where the adapter wraps an embedding layer, that layer's base weights (and with "auto" only then); otherwise,
    with True, every embedding layer's (a resized vocabulary's new rows). HF PEFT's "auto" also asks the hub
    whether the vocabulary was resized; there is no hub here."""
    layers = _embedding_layers(model)
    targeted = [(path, module) for path, module, wrapper in layers if adapter in getattr(wrapper, "lora_A", {})]
    if targeted:
        chosen = targeted if setting else []
    else:
        chosen = [(path, module) for path, module, _ in layers] if setting is True else []
    return {key: value for path, module in chosen for key, value in _keyed(path, module).items()}


def _unwrapped(key: str) -> str:
    """`key` without the segments wrappers add to a module path: torch.compile's ``_orig_mod`` anywhere, and
    DataParallel's or DDP's ``module`` right below the PEFT model's ``base_model.model``."""
    parts = [p for p in key.split(".") if p != "_orig_mod"]
    if parts[:3] == ["base_model", "model", "module"]:
        del parts[2]
    return ".".join(parts)


def _match_wrappers(saved: dict, expected: dict) -> dict:
    """The saved tensors under this model's keys where they differ only by a wrapper of the base model: an adapter
    saved from a compiled base (``_orig_mod.`` in its keys, as HF PEFT and earlier pefttorch wrote them) loads into a
    plain one, and one saved from a plain base into a compiled one."""
    ours = {_unwrapped(k): k for k in expected}
    return {k if k in expected else ours.get(_unwrapped(k), k): v for k, v in saved.items()}


def load_adapter_weights(directory: Path, lora_model, adapter_name: str) -> None:
    """Copies the saved tensors into adapter `adapter_name` of `lora_model` (a LoraModel or another tuner
    model), after checking that the file has exactly the tensors, of exactly the shapes, that this model's
    adapter has."""
    saved = read_adapter_tensors(directory)
    expected = lora_model.adapter_state_dict(adapter_name)
    embeddings = embedding_tensors(lora_model.model)
    saved = _match_wrappers(saved, {**embeddings, **expected})
    expected.update({key: embeddings[key] for key in set(saved) - set(expected) if key in embeddings})
    if getattr(lora_model.peft_config[adapter_name], "bias", "none") != "none":
        # LoRA family only (the other tuners' configs have no `bias`): a trained bias of a module saved without
        # factors (pruned to rank 0) is under the plain module's key
        params = dict(lora_model.model.named_parameters())
        for key in set(saved) - set(expected):
            name = key.removeprefix("base_model.model.")
            # HF PEFT's bias="all" also writes a modules_to_save copy's bias under its wrapper's key without the
            # adapter name (<path>.modules_to_save.bias, next to <path>.bias, the same values): the copy's bias
            path, sep, rest = name.partition(".modules_to_save.")
            head_copy = f"{path}.modules_to_save.{adapter_name}.{rest}" if sep else None
            # and the bias of a layer another adapter of the saving model had wrapped (<path>.base_layer.bias),
            # plain here
            plain = name.removesuffix(".base_layer.bias") + ".bias" if name.endswith(".base_layer.bias") else None
            found = next((n for n in (name, head_copy, plain) if n in params), None)
            if key.endswith(".bias") and found is not None:
                expected[key] = params[found].detach()
                if found == plain and "base_model.model." + plain not in saved:
                    expected.pop("base_model.model." + plain, None)  # the file has it under the other key
    # HF PEFT's save_embedding_layers=True also writes a modules_to_save copy of an embedding layer under its
    # wrapper's key without the adapter name (<path>.modules_to_save.weight), the values of <path>.weight: the copy
    for key in [k for k in set(saved) - set(expected) if ".modules_to_save." in k]:
        plain = key.replace(".modules_to_save.", ".", 1)
        if plain in expected:
            value = saved.pop(key)
            saved.setdefault(plain, value)
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    mismatched = [f"{k}: saved {tuple(saved[k].shape)}, model {tuple(expected[k].shape)}"
                  for k in sorted(set(saved) & set(expected)) if saved[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        def listing(title, items):
            return f"\n  {title} ({len(items)}): " + ", ".join(items[:5]) + (" ..." if len(items) > 5 else "")

        own = set(lora_model.model.state_dict())
        own = {_unwrapped(f"base_model.model.{k}") for k in own}
        whole = sum(_unwrapped(k.removeprefix("_orig_mod.")) in own for k in unexpected)
        raise ValueError(
            f"the adapter in {directory} does not fit this model"
            # (HF PEFT picks the adapter out of such a file; it is not what save_pretrained writes)
            + (f"\n  {whole} of the file's tensors are the base model's own: it looks like a whole model's state dict "
               "(torch.save(model.state_dict())), not an adapter; save adapters with save_pretrained" if whole else "")
            + (listing("missing from the file", missing) if missing else "")
            + (listing("in the file but not in the model", unexpected) if unexpected else "")
            + (listing("shape mismatches", mismatched) if mismatched else "")
        )
    on_meta = sorted(k for k, v in expected.items() if v.device.type == "meta")
    if on_meta:
        # copy_ into a meta tensor does nothing: the load would report success and keep none of the values
        raise ValueError(f"the model's adapter tensors are on the meta device (first: {on_meta[0]}), where the "
                         "loaded values would be dropped: materialize the model first (to_empty() and load its "
                         "weights), then load the adapter")
    with torch.no_grad():
        for key, value in saved.items():
            expected[key].copy_(value)
