"""Argument checks shared by pefttorch.nn's constructors, so each refuses a wrong size or factor in words naming the
layer and the argument (a float width or a string dropout failed inside torch.empty or a comparison, naming neither)."""

from __future__ import annotations

import numbers


def is_integer(value) -> bool:
    """An int, or numpy's integer scalars (a size from a config array), as nn.Linear takes them; not a bool (True is
    an int, of value 1) nor a float of integral value."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A Python or numpy real number; not a bool nor a string (float() would parse '0.1')."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_flag(value) -> bool:
    """A bool (Python's or numpy's); a string such as "no" or a number is not one, though truthy."""
    return isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"))
