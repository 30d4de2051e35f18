"""``fvis layers``: the module tree as a rich tree (pure) and as versioned JSON (pure).

JSON schema ``fvis.layers/1`` (stable; fields are only ever added)::

    {"schema": "fvis.layers/1", "model": {"file", "format", "note"},
     "input": str | null,
     "totals": {"modules", "params", "trainable", "frozen"},
     "layers": [{"name", "class", "depth", "leaf", "nested_model", "params", "trainable",
                 "frozen", "buffers", "shared_with": [...],
                 "calls": int | null, "output_shapes": [[...], ...] | null}],
     "never_ran": [names] | null}

``calls`` and ``output_shapes`` are ``null`` without an input (no forward pass ran). With
``--ops`` (and an input) an ``"ops"`` list is added: ``[{"name", "op", "kind", "module",
"call", "shapes"}]``, one entry per tensor op in the order they ran (``fvis.ops``).

A file refused as malicious (exit 4: it names globals that would run commands or code when
fully unpickled) is still answered on stdout, with the verdict instead of the layers; the
one-line error goes to stderr as usual::

    {"schema": "fvis.layers/1", "model": {"file", "format"},
     "refused": {"exit_code": 4, "reason": "dangerous-globals", "message": str,
                 "findings": [{"global": "posix.system", "effect": "would run a shell command"}]}}

Any other error prints nothing on stdout.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fvis.errors import MaliciousFileError
from fvis.layers import LayerInfo, ModelTree
from fvis.text import for_terminal, shape_text

SCHEMA = "fvis.layers/1"


@dataclass(frozen=True)
class LayerRuns:
    """What one forward pass showed about a module: how often it ran, what it returned."""

    calls: int
    output_shapes: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Listing:
    tree: ModelTree
    file: str
    format: str
    runs: Mapping[str, LayerRuns] | None = None  # None: no forward pass
    input_description: str | None = None
    notes: tuple[str, ...] = field(default=())
    ops: tuple[Any, ...] | None = None  # fvis.records.OpRecord, with --ops


def select(layers: Sequence[LayerInfo], depth: int | None, pattern: str | None) -> list[LayerInfo]:
    """Layers within ``depth`` (root is 0) whose name matches the glob ``pattern``."""
    return [
        info
        for info in layers
        if (depth is None or info.depth <= depth)
        and (pattern is None or info.name == "" or fnmatch.fnmatchcase(info.name, pattern))
    ]


def runs_for(listing: Listing, info: LayerInfo) -> LayerRuns | None:
    if listing.runs is None:
        return None
    return listing.runs.get(info.first_name or info.name, LayerRuns(0, ()))


def never_ran(listing: Listing) -> list[str]:
    if listing.runs is None:
        return []
    return [
        info.name
        for info in listing.tree.layers
        if info.name and runs_for(listing, info) == LayerRuns(0, ())
    ]


def to_json(
    listing: Listing, depth: int | None = None, pattern: str | None = None
) -> dict[str, Any]:
    """The listing as a JSON-ready dict (schema ``fvis.layers/1``)."""
    root = listing.tree.layers[0]
    return {
        "schema": SCHEMA,
        "model": {
            "file": listing.file,
            "format": listing.format,
            "note": "; ".join(n for n in (listing.tree.source_note, *listing.notes) if n),
        },
        "input": listing.input_description,
        "totals": {
            "modules": len(listing.tree.layers),
            "params": root.params,
            "trainable": root.trainable,
            "frozen": root.frozen,
        },
        "layers": [
            _layer_json(listing, info) for info in select(listing.tree.layers, depth, pattern)
        ],
        "never_ran": never_ran(listing) if listing.runs is not None else None,
        **({"ops": ops_json(listing.ops, pattern)} if listing.ops is not None else {}),
    }


def _ops_shown(ops: Sequence[Any], pattern: str | None) -> list[Any]:
    return [o for o in ops if pattern is None or fnmatch.fnmatchcase(o.name, pattern)]


def ops_json(ops: Sequence[Any], pattern: str | None = None) -> list[dict[str, Any]]:
    """The ops of ``fvis layers --ops`` whose name matches ``pattern``, in the order they ran."""
    return [
        {
            "name": o.name,
            "op": o.op,
            "kind": o.kind,
            "module": o.module,
            "call": o.call,
            "shapes": [list(s) for s in o.shapes],
        }
        for o in _ops_shown(ops, pattern)
    ]


def ops_table(ops: Sequence[Any], pattern: str | None = None) -> Any:
    """A ``rich.table.Table`` of the ops (names from the model are escaped)."""
    from rich.table import Table

    table = Table(
        "op", "kind", "output", box=None, title="tensor ops (--ops)", title_justify="left"
    )
    for o in _ops_shown(ops, pattern):
        shapes = ", ".join(shape_text(s) for s in o.shapes[:3]) + (
            ", ..." if len(o.shapes) > 3 else ""
        )
        kind = o.kind if o.kind == "compute" else f"[dim]{o.kind}[/dim]"
        table.add_row(for_terminal(o.name), kind, shapes)
    return table


def refusal_json(error: MaliciousFileError) -> dict[str, Any]:
    """The ``--json`` answer for a file refused as malicious (see the module docstring)."""
    return {
        "schema": SCHEMA,
        "model": {"file": error.file, "format": error.kind},
        "refused": {
            "exit_code": int(error.exit_status),
            "reason": "dangerous-globals",
            "message": error.message,
            "findings": [{"global": f.qualname, "effect": f.effect} for f in error.findings],
        },
    }


def _layer_json(listing: Listing, info: LayerInfo) -> dict[str, Any]:
    runs = runs_for(listing, info)
    return {
        "name": info.name,
        "class": info.class_name,
        "depth": info.depth,
        "leaf": info.is_leaf,
        "nested_model": info.is_nested_model,
        "params": info.params,
        "trainable": info.trainable,
        "frozen": info.frozen,
        "buffers": info.buffers,
        "shared_with": list(info.aliases),
        "calls": runs.calls if runs else None,
        "output_shapes": [list(s) for s in runs.output_shapes] if runs else None,
    }


def to_rich(listing: Listing, depth: int | None = None, pattern: str | None = None) -> Any:
    """A ``rich.tree.Tree``; every name from the file is escaped for the terminal."""
    from rich.tree import Tree

    layers = select(listing.tree.layers, depth, pattern)
    root = Tree(_label(listing, listing.tree.layers[0], root=True))
    branches: dict[str, Any] = {"": root}
    for info in layers:
        if not info.name:
            continue
        parent = _nearest_shown_parent(info.name, branches)
        branches[info.name] = branches[parent].add(_label(listing, info))
    return root


def _nearest_shown_parent(name: str, branches: Mapping[str, Any]) -> str:
    parent = name
    while parent:
        parent = parent.rpartition(".")[0]
        if parent in branches:
            return parent
    return ""


def _label(listing: Listing, info: LayerInfo, root: bool = False) -> str:
    name = for_terminal(info.name.rpartition(".")[2] if not root else listing.file)
    cls = for_terminal(info.short_class)
    parts = [f"[bold]{name}[/bold]", f"[cyan]{cls}[/cyan]"]
    if info.is_nested_model:
        parts.append("[magenta]nested model[/magenta]")
    parts.append(_params_text(info))
    if info.aliases and info.first_name != info.name:
        parts.append(f"[yellow]shared with {for_terminal(info.first_name)}[/yellow]")
    elif info.aliases:
        more = info.alias_count - len(info.aliases)
        extra = f", ... (+{more} more)" if more > 0 else ""
        parts.append(
            f"[yellow]also named {', '.join(for_terminal(a) for a in info.aliases)}{extra}[/yellow]"
        )
    parts.append(_runs_text(runs_for(listing, info)))
    if not root:
        parts.append(f"[dim]{for_terminal(info.name)}[/dim]")
    return "  ".join(p for p in parts if p)


def _params_text(info: LayerInfo) -> str:
    if not info.params:
        return ""
    text = f"{human(info.params)} params"
    if info.frozen and info.trainable:
        text += f" ({human(info.frozen)} frozen)"
    elif info.frozen:
        text += " (frozen)"
    return text


def _runs_text(runs: LayerRuns | None) -> str:
    if runs is None:
        return ""
    if runs.calls == 0:
        return "[red]never ran[/red]"
    shapes = ", ".join(shape_text(s) for s in runs.output_shapes[:3])
    more = ", ..." if len(runs.output_shapes) > 3 else ""
    calls = f"[yellow]{runs.calls} calls[/yellow] " if runs.calls > 1 else ""
    return f"{calls}-> {shapes}{more}"


def human(n: int) -> str:
    """``1234567`` -> ``'1.23M'``."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)
