"""The model families MEFT supports, and how each one's layer splits into an attention and an MLP block.

A family says where the layer list lives, how to read the per-layer context (attention mask, rotary
tables, ...) from the call the model makes to each layer, and computes the two blocks of a layer with
an optional adapter in parallel to the block's sublayer (so an adapter with zero output gives back the
pretrained block exactly).
"""

from __future__ import annotations

from torch import nn


class Family:
    name: str
    model_types: tuple[str, ...]

    def container(self, model: nn.Module) -> tuple[nn.Module, str]:
        """(module, attribute) of the nn.ModuleList of transformer layers."""
        raise NotImplementedError

    def check_layer(self, layer: nn.Module) -> None:
        raise NotImplementedError

    def context(self, args: tuple, kwargs: dict) -> dict:
        """The per-layer arguments as keyword arguments of the attention call."""
        raise NotImplementedError

    def attention(self, layer, x, context: dict, adapter=None):
        raise NotImplementedError

    def mlp(self, layer, x, context: dict, adapter=None):
        raise NotImplementedError


def _missing(layer: nn.Module, paths: list[str]) -> list[str]:
    out = []
    for path in paths:
        m = layer
        for part in path.split("."):
            m = getattr(m, part, None)
        if m is None:
            out.append(path)
    return out


class BertFamily(Family):
    """Post-LayerNorm encoders: BERT, RoBERTa (and MiniLM, a BERT). Block = LayerNorm(x + sublayer(x))."""

    name = "BERT family"
    model_types = ("bert", "roberta")

    def container(self, model):
        return model.base_model.encoder, "layer"

    def check_layer(self, layer):
        missing = _missing(layer, ["attention.self", "attention.output.dense", "attention.output.LayerNorm",
                                   "intermediate", "output.dense", "output.LayerNorm"])
        if missing:
            raise ValueError(f"MEFT: this {type(layer).__name__} lacks {missing}: not a BERT-style layer")
        if getattr(layer, "is_decoder", False) or getattr(layer, "add_cross_attention", False):
            raise ValueError("MEFT: BERT-family decoders (is_decoder / cross-attention) are not supported")

    def context(self, args, kwargs):
        # BertEncoder calls layer(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask=...)
        kwargs = dict(kwargs)
        names = ("attention_mask", "encoder_hidden_states", "encoder_attention_mask")
        for name, value in zip(names, args, strict=False):  # args may stop early
            kwargs[name] = value
        if kwargs.pop("encoder_hidden_states", None) is not None:
            raise ValueError("MEFT: cross-attention inputs (encoder_hidden_states) are not supported")
        kwargs.pop("encoder_attention_mask", None)
        return kwargs

    def attention(self, layer, x, context, adapter=None):
        a, _ = layer.attention.self(x, **context)
        out = layer.attention.output
        h = out.dropout(out.dense(a))
        if adapter is not None:
            h = h + adapter(x)
        return out.LayerNorm(h + x)

    def mlp(self, layer, x, context, adapter=None):
        out = layer.output
        h = out.dropout(out.dense(layer.intermediate(x)))
        if adapter is not None:
            h = h + adapter(x)
        return out.LayerNorm(h + x)


class LlamaFamily(Family):
    """Pre-norm decoders with RMSNorm and rotary embeddings: Llama. Block = x + sublayer(norm(x)); the
    adapter reads the normalised input, as the sublayer does."""

    name = "Llama family"
    model_types = ("llama",)

    def container(self, model):
        return model.base_model, "layers"

    def check_layer(self, layer):
        missing = _missing(layer, ["self_attn", "mlp", "input_layernorm", "post_attention_layernorm"])
        if missing:
            raise ValueError(f"MEFT: this {type(layer).__name__} lacks {missing}: not a Llama-style layer")

    def context(self, args, kwargs):
        kwargs = dict(kwargs)
        if args:
            kwargs["attention_mask"] = args[0]
        kwargs.pop("use_cache", None)  # the cache object itself says whether to write to it
        return kwargs

    def attention(self, layer, x, context, adapter=None):
        n = layer.input_layernorm(x)
        a, _ = layer.self_attn(hidden_states=n, **context)
        return x + (a + adapter(n) if adapter is not None else a)

    def mlp(self, layer, x, context, adapter=None):
        n = layer.post_attention_layernorm(x)
        h = layer.mlp(n)
        return x + (h + adapter(n) if adapter is not None else h)


FAMILIES: tuple[Family, ...] = (BertFamily(), LlamaFamily())


def find_family(model: nn.Module) -> Family:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = "; ".join(f"{f.name}: {', '.join(f.model_types)}" for f in FAMILIES)
    raise ValueError(f"MEFT does not support model type {model_type!r} ({type(model).__name__}); "
                     f"supported are {supported}")
