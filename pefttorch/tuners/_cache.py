"""The key/value cache as it reaches a model's (or a layer's) forward, whatever the transformers version.

transformers 5.24 renamed the cache argument from ``past_key_values`` to ``cache`` (the old name still works,
with a deprecation) and stopped passing ``cache_position``; code that reads or replaces the cache in a forward
pre-hook must look for both names.
"""

from __future__ import annotations

from importlib import metadata

NAMES = ("cache", "past_key_values")  # the new name first

# Read from the package metadata once, not by importing transformers in the hooks: dynamo cannot trace an import of
# transformers' lazy module, and every prefix-tuned layer broke the compiled graph there.
try:
    TRANSFORMERS_VERSION = metadata.version("transformers")
except metadata.PackageNotFoundError:  # no transformers: no model hands a cache down at all
    TRANSFORMERS_VERSION = "0.0"


def installed_name() -> str:
    """The name under which the installed transformers hands the cache down: a forward that takes it only through
    ``**kwargs`` (BERT's task heads) passes on whatever it is given, and the layers read only this one."""
    major, minor = (int(part) for part in TRANSFORMERS_VERSION.split(".")[:2])
    return "cache" if (major, minor) >= (5, 24) else "past_key_values"


def cache_key(kwargs: dict, parameters=()) -> str:
    """The keyword under which `kwargs` holds the cache; where none is given, the name the forward takes
    (`parameters`: its parameter names), else the installed transformers' name."""
    for name in NAMES:
        if kwargs.get(name) is not None:
            return name
    for name in NAMES:  # loops, not a generator: dynamo traces these through
        if name in parameters:
            return name
    return installed_name()


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


def refuse_static(cache, method: str) -> None:
    """Refuses a static (preallocated) cache such as ``generate(cache_implementation="static")`` hands a model:
    generate sizes it, and masks for it, without the virtual tokens `method` puts in front (prompt tuning overflowed
    it, prefix tuning's own cache no longer matched the mask: a silent wrong answer on padded batches)."""
    if getattr(cache, "is_compileable", False):
        raise ValueError(f"{method} does not work with a static key/value cache (generate's cache_implementation="
                         f"\"static\", or a StaticCache passed in): its virtual tokens are not in the size and masks "
                         f"generate prepares for it; use the default dynamic cache")

