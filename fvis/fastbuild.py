"""Frozen slotted dataclass records built without their generated ``__init__`` (a hot path).

A capture builds a ``Stats``, a ``GradFacts`` and a ``Capture`` per captured tensor. Their
``__init__`` (frozen) sets each field through ``object.__setattr__``: about 1 us for 12
fields, a fifth of what one record of a small layer may cost. ``builder(cls)`` returns a
function of one tuple (every field, in field order) that makes the same instance in C
(``fvis._moments.new_slotted``: the instance allocated, each slot set), about 10x faster; the
class's ``__init__`` where the extension was not built.

Only for classes whose instance is entirely described by their fields: slotted, with no
``__post_init__``, no ``InitVar`` and no field kept out of ``__init__`` (checked here, once).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def _load() -> Any:
    try:
        native = importlib.import_module("fvis._moments")
    except ImportError:  # built without a C compiler: the classes' own __init__
        return None
    # An extension built before these functions existed (an old in-place build).
    return native if hasattr(native, "new_slotted") else None


_native = _load()


def builder(cls: type[T]) -> Callable[[tuple[Any, ...]], T]:
    """``build(values)`` == ``cls(*values)`` for a tuple of every field's value."""
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    names = tuple(f.name for f in fields)
    plain = (
        _native is not None
        and set(getattr(cls, "__slots__", ())) == set(names)
        and all(f.init for f in fields)
        and not hasattr(cls, "__post_init__")
        and all("__slots__" not in vars(base) for base in cls.__mro__[1:-1])
    )
    if not plain:
        return lambda values: cls(*values)
    offsets = _native.slot_offsets(tuple(vars(cls)[n] for n in names))
    # new_slotted refuses a tuple of another length: every slot is set, or no record is made.
    return functools.partial(_native.new_slotted, cls, offsets)
