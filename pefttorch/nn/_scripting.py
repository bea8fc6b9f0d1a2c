"""TorchScript's refusal, in words: pefttorch's modules call ops with keyword-only arguments and Python-side checks
that torch.jit.script cannot compile, and its error pointed into pefttorch's sources as if they were at fault."""

from __future__ import annotations


class NotScriptable:
    """Mixin for an nn.Module: torch.jit.script (of it, or of a model holding it) says what to use instead."""

    def __prepare_scriptable__(self):  # torch.jit.script calls this on each module before compiling it
        raise TypeError(f"{type(self).__name__} does not support TorchScript (torch.jit.script): use torch.compile or "
                        "torch.export")
