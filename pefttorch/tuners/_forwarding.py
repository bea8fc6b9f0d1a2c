"""Forwarding: the base of modules that stand in for the model they wrap."""

from __future__ import annotations

from torch import nn


class Forwarding(nn.Module):
    """Attributes this module lacks are looked up on the module it wraps (``config``, ``generate``, a model's
    own helpers), so code written for the wrapped model keeps working on the wrapper."""

    wrapped_attribute = "model"

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == self.wrapped_attribute:
                raise
            return getattr(getattr(self, self.wrapped_attribute), name)
