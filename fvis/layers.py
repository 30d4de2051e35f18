"""The module tree: one neutral record per module, dotted names, shared modules, name resolution.

Every source of a model (a live ``nn.Module``, a pickled module read without running it, a
TorchScript archive, a ``torch.export`` program, a bare state dict) becomes the same
``ModuleNode`` tree, so listing, resolving names and counting parameters are written once.
"""

from __future__ import annotations

import difflib
import fnmatch
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fvis.errors import UsageError

if TYPE_CHECKING:
    from torch import nn


# Other names kept per row of a shared module: a module with 100k names must not make every
# one of its rows carry the other 100k (quadratic); ``alias_count`` keeps the true number.
MAX_ALIASES = 32


@dataclass(frozen=True)
class TensorMeta:
    """Shape and flags of one parameter or buffer, with no data."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    requires_grad: bool = True
    is_buffer: bool = False
    key: int = 0  # identity of a live tensor, so a tied weight is counted once; 0: unknown

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ModuleNode:
    """One module of a tree; ``key`` identifies the object so shared modules can be told apart."""

    class_name: str
    key: int
    tensors: tuple[TensorMeta, ...] = ()
    children: tuple[tuple[str, ModuleNode], ...] = ()

    @property
    def short_class(self) -> str:
        return self.class_name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class LayerInfo:
    """One row of ``fvis layers``: a module reached by one dotted name."""

    name: str
    class_name: str
    depth: int
    is_leaf: bool
    is_nested_model: bool
    params: int
    trainable: int
    frozen: int
    buffers: int
    aliases: tuple[str, ...] = ()  # other names of the same (shared) module, MAX_ALIASES at most
    first_name: str = ""  # the name a shared module was first reached by
    alias_count: int = 0  # how many other names it has (``aliases`` may hold fewer)

    @property
    def short_class(self) -> str:
        return self.class_name.rsplit(".", 1)[-1]

    @property
    def is_shared(self) -> bool:
        return bool(self.aliases)


@dataclass(frozen=True)
class ModelTree:
    """The whole tree plus how it was obtained (for messages such as "state dict only")."""

    root: ModuleNode
    source_note: str = ""
    layers: tuple[LayerInfo, ...] = field(default=())
    kind: str = ""  # the file format it came from (fvis.formats.FileKind value)

    @classmethod
    def of(cls, root: ModuleNode, source_note: str = "", kind: str = "") -> ModelTree:
        return cls(root=root, source_note=source_note, layers=tuple(walk(root)), kind=kind)

    def names(self) -> list[str]:
        return [info.name for info in self.layers if info.name]


def is_user_class(class_name: str) -> bool:
    """True for classes defined outside torch (a user's model, possibly nested in another)."""
    return not (class_name.startswith("torch.") or class_name in ("", "?"))


def node_from_module(module: nn.Module) -> ModuleNode:
    """Build the neutral tree from a live module, walking ``_modules`` so shared modules keep
    every name (``named_modules()`` drops the second one).

    >>> node_from_module(torch.nn.Linear(2, 3)).class_name
    'torch.nn.modules.linear.Linear'
    """
    memo: dict[int, ModuleNode] = {}
    return _node_from_module(module, memo)


def _node_from_module(module: nn.Module, memo: dict[int, ModuleNode]) -> ModuleNode:
    if id(module) in memo:
        return memo[id(module)]
    cls = type(module)
    tensors = [
        TensorMeta(n, tuple(p.shape), _dtype_name(p.dtype), bool(p.requires_grad), key=id(p))
        for n, p in module._parameters.items()
        if p is not None
    ]
    tensors += [
        TensorMeta(n, tuple(b.shape), _dtype_name(b.dtype), False, is_buffer=True)
        for n, b in module._buffers.items()
        if b is not None
    ]
    children = tuple(
        (n, _node_from_module(child, memo))
        for n, child in module._modules.items()
        if child is not None
    )
    node = ModuleNode(f"{cls.__module__}.{cls.__qualname__}", id(module), tuple(tensors), children)
    memo[id(module)] = node
    return node


# Buffers that state dicts mix in with parameters (state dicts do not say which is which).
_BUFFER_NAMES = frozenset({"running_mean", "running_var", "num_batches_tracked"})


def node_from_state_dict(
    shapes: Mapping[str, TensorMeta], skeleton: Iterable[str] = ()
) -> ModuleNode:
    """Group flat parameter names (``inner.linear.weight``) into a tree of unknown classes.

    ``skeleton`` lists module paths known to exist, in the order to show them. Without it,
    parameter-free modules (ReLU, pooling) cannot appear: they leave no key behind.
    """
    nested: dict[str, Any] = {}
    for module_path in skeleton:
        level = nested
        for part in module_path.split(".") if module_path else []:
            level = level.setdefault(part, {})
    for full_name, meta in shapes.items():
        *path, leaf = full_name.split(".")
        level = nested
        for part in path:
            level = level.setdefault(part, {})
            if not isinstance(level, dict):  # a key that is both a tensor and a prefix
                break
        else:
            level[leaf] = TensorMeta(
                leaf,
                meta.shape,
                meta.dtype,
                meta.requires_grad,
                meta.is_buffer or looks_like_buffer(leaf, meta.dtype),
            )
    counter = iter(range(1, 1 << 62))
    return _node_from_nested(nested, counter)


def node_from_paths(classes: Mapping[str, str], shapes: Mapping[str, TensorMeta]) -> ModuleNode:
    """A tree from ``{dotted_module_path: class_name}`` (``""`` is the root) plus tensors."""
    return _with_classes(node_from_state_dict(shapes, skeleton=classes), "", classes)


def _with_classes(node: ModuleNode, path: str, classes: Mapping[str, str]) -> ModuleNode:
    return ModuleNode(
        classes.get(path, node.class_name),
        node.key,
        node.tensors,
        tuple((n, _with_classes(child, _join(path, n), classes)) for n, child in node.children),
    )


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def looks_like_buffer(name: str, dtype: str) -> bool:
    """State dicts and TorchScript mix buffers with parameters: tell them apart by name/dtype."""
    return name in _BUFFER_NAMES or not (
        dtype.startswith(("float", "bfloat", "complex", "f")) or dtype == "unknown"
    )


def _node_from_nested(nested: dict[str, Any], counter: Iterator[int]) -> ModuleNode:
    tensors = tuple(v for v in nested.values() if isinstance(v, TensorMeta))
    children = tuple(
        (k, _node_from_nested(v, counter)) for k, v in nested.items() if isinstance(v, dict)
    )
    return ModuleNode("?", next(counter), tensors, children)


def walk(root: ModuleNode) -> Iterator[LayerInfo]:
    """Yield a ``LayerInfo`` per dotted name, depth-first, root first (name ``""``).

    A shared module is listed under each of its names (its children only under the first);
    parameters are counted once per subtree, so the root's total matches
    ``sum(p.numel() for p in model.parameters())``. Linear in names plus modules, without
    recursion: each module's totals are computed once, however many names it has.
    """
    names_by_key: dict[int, list[str]] = {}
    order = _collect(root, names_by_key)
    totals = subtree_counts(root)
    for name, depth, node in order:
        yield _layer_info(name, depth, node, totals[node.key], names_by_key[node.key])


def _collect(
    root: ModuleNode, names_by_key: dict[int, list[str]]
) -> list[tuple[str, int, ModuleNode]]:
    """Every (name, depth, node) in depth-first order; a module seen before is listed again
    by its new name, but its subtree only under its first name."""
    order: list[tuple[str, int, ModuleNode]] = []
    pending: list[tuple[str, int, ModuleNode]] = [("", 0, root)]
    while pending:
        name, depth, node = pending.pop()
        seen_before = node.key in names_by_key
        names_by_key.setdefault(node.key, []).append(name)
        order.append((name, depth, node))
        if seen_before:
            continue  # its subtree is already listed under its first name
        pending.extend(
            (f"{name}.{child_name}" if name else child_name, depth + 1, child)
            for child_name, child in reversed(node.children)
        )
    return order


@dataclass(frozen=True)
class Counts:
    """Parameter and buffer element counts of a set of modules."""

    params: int = 0
    trainable: int = 0
    buffers: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(
            self.params + other.params,
            self.trainable + other.trainable,
            self.buffers + other.buffers,
        )


def subtree_counts(root: ModuleNode) -> dict[int, Counts]:
    """``{node.key: Counts}`` over each module's unique descendants (itself included).

    A module with one parent belongs to exactly one "region" headed by the nearest shared
    module (or the root), so each region is summed once and a module's total is its own
    region plus the regions of the shared modules it reaches: no subtree is walked twice.
    """
    nodes = _post_order(root)
    parents: dict[int, int] = {}
    for node in nodes:
        for child in _distinct_children(node):
            parents[child.key] = parents.get(child.key, 0) + 1
    tied = _tied_tensors(nodes)
    tied_below = _tied_below(nodes, tied)
    region: dict[int, Counts] = {}
    reached: dict[int, frozenset[int]] = {}  # the shared modules below each module
    totals: dict[int, Counts] = {}
    for node in nodes:
        own, below = _own_counts(node, tied), set()
        for child in _distinct_children(node):
            below |= reached[child.key]
            if parents[child.key] > 1:
                below.add(child.key)
            else:
                own += region[child.key]
        region[node.key], reached[node.key] = own, frozenset(below)
        total = sum((region[k] for k in below), own)
        totals[node.key] = sum((_own_counts_of(tied[k]) for k in tied_below[node.key]), total)
    return totals


def _tied_tensors(nodes: Sequence[ModuleNode]) -> dict[int, TensorMeta]:
    """Tensors held by more than one module (a tied ``lm_head.weight`` is ``wte.weight``),
    by identity: counted once in every subtree that holds them, not once per holder."""
    holders: dict[int, int] = {}
    metas: dict[int, TensorMeta] = {}
    for node in nodes:
        for meta in node.tensors:
            if meta.key:
                holders[meta.key] = holders.get(meta.key, 0) + 1
                metas[meta.key] = meta
    return {key: metas[key] for key, count in holders.items() if count > 1}


def _tied_below(
    nodes: Sequence[ModuleNode], tied: Mapping[int, TensorMeta]
) -> dict[int, frozenset[int]]:
    """Per module, the tied tensors in its subtree (children come before parents in ``nodes``;
    nearly always empty, so nearly free)."""
    empty: frozenset[int] = frozenset()
    below: dict[int, frozenset[int]] = {}
    for node in nodes:
        keys = {meta.key for meta in node.tensors if meta.key in tied} if tied else set()
        for child in _distinct_children(node):
            keys |= below[child.key]
        below[node.key] = frozenset(keys) if keys else empty
    return below


def _own_counts_of(meta: TensorMeta) -> Counts:
    if meta.is_buffer:
        return Counts(0, 0, meta.numel)
    return Counts(meta.numel, meta.numel if meta.requires_grad else 0, 0)


def _post_order(root: ModuleNode) -> list[ModuleNode]:
    """Each unique module once, children before their parents (iterative)."""
    done: set[int] = set()
    out: list[ModuleNode] = []
    pending: list[tuple[ModuleNode, bool]] = [(root, False)]
    while pending:
        node, children_done = pending.pop()
        if children_done:
            out.append(node)
        elif node.key not in done:
            done.add(node.key)
            pending.append((node, True))
            pending.extend((child, False) for child in _distinct_children(node))
    return out


def _distinct_children(node: ModuleNode) -> list[ModuleNode]:
    return list({child.key: child for _, child in node.children}.values())


def _own_counts(node: ModuleNode, tied: Mapping[int, TensorMeta]) -> Counts:
    tensors = [t for t in node.tensors if t.key not in tied] if tied else node.tensors
    params = [t for t in tensors if not t.is_buffer]
    return Counts(
        sum(t.numel for t in params),
        sum(t.numel for t in params if t.requires_grad),
        sum(t.numel for t in tensors if t.is_buffer),
    )


def _layer_info(
    name: str, depth: int, node: ModuleNode, counts: Counts, all_names: list[str]
) -> LayerInfo:
    return LayerInfo(
        name=name,
        class_name=node.class_name,
        depth=depth,
        is_leaf=not node.children,
        is_nested_model=bool(node.children) and is_user_class(node.class_name) and depth > 0,
        params=counts.params,
        trainable=counts.trainable,
        frozen=counts.params - counts.trainable,
        buffers=counts.buffers,
        aliases=tuple(itertools.islice((n for n in all_names if n != name), MAX_ALIASES)),
        first_name=all_names[0],
        alias_count=len(all_names) - 1,
    )


def resolve(
    layers: Sequence[LayerInfo], patterns: Iterable[str], model_label: str = "MODEL"
) -> list[LayerInfo]:
    """Resolve exact dotted names and globs to layers, in tree order, without duplicates.

    Unknown names raise ``UsageError`` with close matches by name and by class:

    >>> resolve(tree.layers, ["inner.*"])          # doctest: +SKIP
    [LayerInfo(name='inner.linear', ...), LayerInfo(name='inner.relu', ...)]
    """
    by_name = {info.name: info for info in layers if info.name}
    chosen: dict[str, LayerInfo] = {}
    for pattern in patterns:
        matches = _match(by_name, pattern)
        if not matches:
            raise UsageError(
                f"no layer {pattern!r}{_suggestion(layers, pattern)}",
                hint=f"run 'fvis layers {model_label}' to list the layer names",
            )
        for info in matches:
            chosen.setdefault(info.name, info)
    order = {info.name: i for i, info in enumerate(layers)}
    return sorted(chosen.values(), key=lambda info: order[info.name])


def _match(by_name: Mapping[str, LayerInfo], pattern: str) -> list[LayerInfo]:
    if pattern in by_name:
        return [by_name[pattern]]
    if any(ch in pattern for ch in "*?["):
        return [info for name, info in by_name.items() if fnmatch.fnmatchcase(name, pattern)]
    return []


def suggest(layers: Sequence[LayerInfo], wanted: str, limit: int = 3) -> list[str]:
    """Close matches for a missing name: by dotted name, then by class under the same parent.

    ``inner.relu`` finds ``inner.1 (ReLU)`` when the ReLU sits at index 1 of ``inner``.
    """
    labelled = {info.name: f"{info.name} ({info.short_class})" for info in layers if info.name}
    found = difflib.get_close_matches(wanted, list(labelled), n=limit, cutoff=0.6)
    parent, _, last = wanted.rpartition(".")
    for info in layers:
        info_parent = info.name.rpartition(".")[0]
        if (
            info_parent == parent
            and info.short_class.lower() == last.lower()
            and info.name not in found
        ):
            found.insert(0, info.name)
    return [labelled[name] for name in found[:limit]]


def _suggestion(layers: Sequence[LayerInfo], wanted: str) -> str:
    close = suggest(layers, wanted)
    if not close:
        return ""
    return "; did you mean " + " or ".join(repr(c) for c in close) + "?"


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")
