"""State dicts: find one inside a checkpoint, unwrap it only as far as it fits the
architecture, fill tied weights, and say in one message what does not fit.

Pure functions over mappings of names to tensors (or to ``TensorMeta`` when nothing may be read),
shared by the inert listing and the real load so both find the same weights.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from fvis import inert
from fvis.errors import BadFileError, ModelInputError
from fvis.layers import TensorMeta
from fvis.text import preview as _preview

if TYPE_CHECKING:
    from torch import nn


# Keys under which training scripts nest the state dict, most specific first.
_NESTING_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "ema",
    "model_ema",
    "net",
    "network",
    "module",
    "weights",
    "params",
)


_PREFIXES = ("module.", "_orig_mod.")


def find_state_dict(obj: dict[Any, Any]) -> Nested | None:
    def metas(d: dict[Any, Any]) -> dict[str, TensorMeta]:
        return {
            k: TensorMeta(k, t.shape, t.dtype, t.requires_grad or not t.is_parameter)
            for k, t in (inert.fake_tensors(d) or {}).items()
        }

    def module_metas(value: Any) -> dict[str, TensorMeta] | None:
        if isinstance(value, inert.Stub) and inert.is_module_stub(value):
            return flatten_tree_metas(inert.tree_from_stub(value))
        return None

    return search_state_dict(obj, metas, module_metas)


def search_state_dict(
    obj: dict[Any, Any],
    tensors_of: Callable[[dict[Any, Any]], dict[str, Any]],
    module_state: Callable[[Any], dict[str, Any] | None],
    depth: int = 0,
) -> Nested | None:
    """The state dict inside a checkpoint dict: the dict itself when at least half of its
    entries are tensors, else the first one found under a usual key (``model``,
    ``state_dict``, ``ema``...), keys prefixed with the path. ``tensors_of`` picks a dict's
    tensors and ``module_state`` a module's (None when the value is no module): one search
    for the inert listing and the real load, so both find the same weights."""
    found = tensors_of(obj)
    if not obj or (found and len(found) >= len(obj) / 2):  # {} is a parameter-free model's
        return Nested(found, ())
    for key in _NESTING_KEYS:
        value = obj.get(key)
        inner = module_state(value)
        nested = Nested(inner, (key,)) if inner is not None else None
        if nested is None and isinstance(value, dict) and depth < 16:  # deep or cyclic: stop
            deeper = search_state_dict(value, tensors_of, module_state, depth + 1)
            nested = deeper and Nested(deeper.state, (key, *deeper.path))
        if nested is not None:
            return nested
    return None


class Nested(NamedTuple):
    """A state dict found inside a checkpoint dict, and the keys it was found under."""

    state: dict[str, Any]
    path: tuple[str, ...]

    @property
    def notes(self) -> list[str]:
        return [f"took the state dict under key {'.'.join(self.path)!r}"] if self.path else []


def flatten_tree_metas(node: Any, prefix: str = "") -> dict[str, TensorMeta]:
    out = {f"{prefix}{t.name}": t for t in node.tensors}
    for name, child in node.children:
        out.update(flatten_tree_metas(child, f"{prefix}{name}."))
    return out


def metas_of_module(model: nn.Module) -> dict[str, TensorMeta]:
    return {
        name: TensorMeta(name, tuple(t.shape), str(t.dtype), key=id(t))
        for name, t in model.state_dict(keep_vars=True).items()
    }


def fill_tied(
    expected: Mapping[str, TensorMeta], state: Mapping[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """Tied weights are stored once (``lm_head.weight`` is ``wte.weight``): a missing name of
    a tied tensor takes the value stored under another of its names.

    >>> fill_tied(metas_of_module(gpt2), {"transformer.wte.weight": w})[1]   # doctest: +SKIP
    ['lm_head.weight is tied to transformer.wte.weight (stored once)']
    """
    stored_by_key = {expected[k].key: k for k in expected if k in state and expected[k].key}
    out, notes = dict(state), []
    for name, meta in expected.items():
        source = stored_by_key.get(meta.key) if meta.key else None
        if name not in out and source is not None:
            out[name] = out[source]
            notes.append(f"{name} is tied to {source} (stored once)")
    return out, notes


def unwrap_state_dict(
    state: Mapping[str, Any], expected: Collection[str] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Strip ``module.`` / ``_orig_mod.`` wrapper prefixes and a flat nesting prefix
    (``model.``), but only as far as it makes the keys fit ``expected`` (the architecture's
    keys): a model whose child is called ``model`` keeps its names. Without ``expected`` only
    the wrapper prefixes go. Says what was done.

    >>> unwrap_state_dict({"model.module.fc.weight": w}, {"fc.weight"})[1]    # doctest: +SKIP
    ["stripped prefix 'model.' from 1 keys", "stripped prefix 'module.' from 1 keys"]
    """
    chain = [(dict(state), [])]
    prefixes = (*_PREFIXES, *(key + "." for key in _NESTING_KEYS)) if expected else _PREFIXES
    while True:
        current, notes = chain[-1]
        prefix = next(
            (p for p in prefixes if current and all(k.startswith(p) for k in current)), None
        )
        if prefix is None:
            break
        stripped = {k[len(prefix) :]: v for k, v in current.items()}
        chain.append((stripped, [*notes, f"stripped prefix {prefix!r} from {len(stripped)} keys"]))
    if expected is None:
        return chain[-1]
    wanted = set(expected)
    fits = [len(wanted.intersection(candidate)) for candidate, _ in chain]
    return chain[fits.index(max(fits))] if max(fits) else chain[-1]


def check_state_dict(
    path: Path, expected: Mapping[str, TensorMeta], found: Mapping[str, Any], strict: bool = True
) -> list[str]:
    """Raise one readable ``ModelInputError`` listing missing, unexpected and mismatched keys;
    with ``strict=False`` missing and unexpected keys come back as warnings instead."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [
        f"{k} {_shape_str(_shape_of(found[k]))} vs {_shape_str(expected[k].shape)}"
        for k in expected
        if k in found and tuple(_shape_of(found[k])) != tuple(expected[k].shape)
    ]
    problems = (
        [f"{_count(mismatched, 'shape mismatch', 'es')}: {_preview(mismatched)}"]
        if (mismatched)
        else []
    )
    loose = []
    if missing:
        loose.append(f"{_count(missing, 'missing key')}: {_preview(missing)}")
    if unexpected:
        loose.append(f"{_count(unexpected, 'unexpected key')}: {_preview(unexpected)}")
    if strict:
        problems += loose
    if problems:
        raise ModelInputError(
            f"{path} does not fit the architecture: " + "; ".join(problems),
            hint="check --arch and --arch-kwargs (checkpoint shape vs model shape)"
            + ("" if mismatched else ", or pass --no-strict to load what fits"),
        )
    return [f"warning: {item} (--no-strict)" for item in loose]


def _count(items: list[Any], noun: str, plural: str = "s") -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else plural}"


def _shape_of(value: Any) -> tuple[int, ...]:
    shape = getattr(value, "shape", ())
    return tuple(int(d) for d in shape)


def _shape_str(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def real_state_dict(path: Path, obj: dict[Any, Any]) -> Nested:
    import torch

    def tensors(d: dict[Any, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}

    def module_state(value: Any) -> dict[str, Any] | None:
        return dict(value.state_dict()) if isinstance(value, torch.nn.Module) else None

    found = search_state_dict(obj, tensors, module_state)
    if found is None:
        raise BadFileError(
            f"{path} holds a dict without a state dict (keys: {_preview(list(obj))})"
        )
    return found
