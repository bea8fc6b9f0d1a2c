"""The key/value cache as it reaches a model's (or a layer's) forward, whatever the transformers version.

transformers 5.24 renamed the cache argument from ``past_key_values`` to ``cache`` (the old name still works,
with a deprecation) and stopped passing ``cache_position``; code that reads or replaces the cache in a forward
pre-hook must look for both names.
"""

from __future__ import annotations

import functools

NAMES = ("cache", "past_key_values")  # the new name first


@functools.cache
def installed_name() -> str:
    """The name under which the installed transformers hands the cache down: a forward that takes it only through
    ``**kwargs`` (BERT's task heads) passes on whatever it is given, and the layers read only this one."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return "cache" if (major, minor) >= (5, 24) else "past_key_values"


def cache_key(kwargs: dict, parameters=()) -> str:
    """The keyword under which `kwargs` holds the cache; where none is given, the name the forward takes
    (`parameters`: its parameter names), else the installed transformers' name."""
    for name in NAMES:
        if kwargs.get(name) is not None:
            return name
    return next((name for name in NAMES if name in parameters), installed_name())


def get_cache(kwargs: dict):
    """The cache in `kwargs` (under either name), or None."""
    return next((kwargs[name] for name in NAMES if kwargs.get(name) is not None), None)


def cache_length(cache) -> int:
    """Tokens already in `cache` (a transformers Cache or the legacy tuple of (key, value) per layer)."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2])
