"""What every method's config shares: refusing unknown fields, and writing adapter_config.json."""

from __future__ import annotations

import difflib
import functools
import json
from dataclasses import fields
from pathlib import Path

CONFIG_NAME = "adapter_config.json"


def reject_unknown_fields(cls):
    """Class decorator for a config dataclass: a misspelt field is an error that names it, suggests the
    closest field and lists them all (instead of dataclass's bare "unexpected keyword argument")."""
    init = cls.__init__
    names = [f.name for f in fields(cls) if f.init]

    @functools.wraps(init)
    def checked_init(self, *args, **kwargs):
        unknown = [k for k in kwargs if k not in names]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, names, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise TypeError(f"{cls.__name__} got unknown field(s) {', '.join(hints)}; fields are: {', '.join(names)}")
        init(self, *args, **kwargs)

    cls.__init__ = checked_init
    return cls


def save_config(config, directory: str | Path) -> None:
    """Writes ``config.to_dict()`` as ``directory/adapter_config.json``."""
    path = Path(directory) / CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
