"""The tensors inside a module's output (or a call's arguments), each named by its path.

Outputs are tensors, containers (tuples, lists, dicts, dataclasses such as Hugging Face's
``ModelOutput``, namedtuples) or any object holding tensors in its attributes
(``torch.distributions.Normal``, torchvision's ``ImageList``). Paths use one notation per
kind of part, chosen so a path cannot read like a child module's dotted name: ``[0]`` for
items, ``['key']`` for mapping keys, ``.name`` for fields and attributes (``fvis.capture``
writes ``->name`` where ``layer.name`` is also a module). What cannot be followed (a module,
a callable, an object without attributes, nesting too deep) is noted, never dropped silently.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

_MAX_DEPTH = 8
# Values that hold no tensor and need no note: nothing to follow inside them.
_ATOMS = (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device, torch.Size)


def flatten_tensors(
    value: Any, path: str = "", depth: int = 0, notes: list[str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in nested outputs, named by path: ``[0]``, ``['logits']``, ``.loc``.

    Follows tensors, dataclasses (incl. ``ModelOutput``) and namedtuples (``.field``),
    mappings (``['key']``, so a key never reads like a child module's name), lists and tuples
    (``[0]``), and any other object's attributes (``vars()`` / ``__slots__``: ``.loc`` of a
    ``torch.distributions.Normal``, ``.tensors`` of torchvision's ``ImageList``), to a bounded
    depth and without looping on cycles. What could not be followed is appended to ``notes``.
    """
    yield from _flatten(value, path, depth, notes, set())


def _flatten(
    value: Any, path: str, depth: int, notes: list[str] | None, seen: set[int]
) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, _ATOMS):
        return
    elif depth > _MAX_DEPTH:
        _note(
            notes, f"{path or 'the output'}: nested deeper than {_MAX_DEPTH} levels, not followed"
        )
    elif id(value) in seen:  # a cycle (or the same object twice): its tensors are listed once
        return
    else:
        seen.add(id(value))
        for sub, item in _parts(value, notes, path):
            yield from _flatten(item, f"{path}{sub}", depth + 1, notes, seen)
        seen.discard(id(value))


def _parts(value: Any, notes: list[str] | None, path: str) -> Iterator[tuple[str, Any]]:
    """The named parts of one container or object (one level)."""
    if type(value) is tuple or type(value) is list:  # the hot path: plain args tuples
        yield from ((f"[{i}]", item) for i, item in enumerate(value))
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        yield from ((f".{f.name}", getattr(value, f.name, None)) for f in dataclasses.fields(value))
    elif isinstance(value, tuple) and hasattr(value, "_fields"):
        yield from ((f".{key}", getattr(value, key)) for key in value._fields)
    elif isinstance(value, Mapping):
        yield from ((f"[{key!r}]", item) for key, item in value.items())
    elif isinstance(value, (list, tuple)):
        yield from ((f"[{i}]", item) for i, item in enumerate(value))
    elif isinstance(value, (nn.Module, type)) or callable(value):
        _note(notes, f"{path or 'the output'}: a {type(value).__name__}, not followed")
    else:
        yield from _attributes(value, notes, path)


def _attributes(value: Any, notes: list[str] | None, path: str) -> Iterator[tuple[str, Any]]:
    """An object's instance attributes; private ones of torch's own classes are internals."""
    names: dict[str, None] = dict.fromkeys(getattr(value, "__dict__", {}))
    for klass in type(value).__mro__:
        slots = klass.__dict__.get("__slots__", ())
        names.update(dict.fromkeys([slots] if isinstance(slots, str) else slots))
    if not names:
        _note(notes, f"{path or 'the output'}: a {type(value).__name__} (no attributes to follow)")
        return
    internal = type(value).__module__.split(".")[0] == "torch"
    for name in names:
        if name.startswith("__") or (internal and name.startswith("_")):
            continue
        try:
            item = getattr(value, name)
        except AttributeError:  # an unset slot
            continue
        if not callable(item) or isinstance(item, torch.Tensor):
            yield f".{name}", item


def _note(notes: list[str] | None, text: str) -> None:
    if notes is not None and text not in notes:
        notes.append(text)


def describe_value(value: Any) -> str:
    """A short description of a value that holds no tensor.

    >>> describe_value(None), describe_value("abc"), describe_value((None, None))
    ('None', "a str 'abc'", 'a tuple of 2 items')
    """
    if value is None:
        return "None"
    if isinstance(value, (tuple, list, Mapping)) and not isinstance(value, str):
        return f"a {type(value).__name__} of {len(value)} items"
    text = repr(value) if isinstance(value, (str, bytes, int, float, bool)) else ""
    text = f" {text[:40]}{'...' if len(text) > 40 else ''}" if text else ""
    return f"a {type(value).__name__}{text}"
