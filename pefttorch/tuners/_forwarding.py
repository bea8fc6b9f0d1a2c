"""Forwarding: the base of modules that stand in for the model they wrap."""

from __future__ import annotations

from torch import nn

from ..nn._scripting import NotScriptable


class Forwarding(NotScriptable, nn.Module):
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

    def _remember_trainability(self, model: nn.Module) -> None:
        """Notes which of `model`'s parameters train, for :meth:`_restore_trainability` at unload. The parameters
        themselves are kept (not their ids), so a deep copy or an unpickled model restores its own copies."""
        self._trainability = [(p, p.requires_grad) for p in model.parameters()]

    def _restore_trainability(self, model: nn.Module) -> None:
        """Gives `model`'s parameters the trainability noted before; parameters added since (new biases) train."""
        noted = {id(p): flag for p, flag in self._trainability}
        for p in model.parameters():
            p.requires_grad_(noted.get(id(p), True))
