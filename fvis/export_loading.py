"""``torch.export`` programs (``.pt2``): list them from their JSON metadata, load them only after
``fvis.pt2``'s scan found nothing torch would run, decompose and unflatten them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from fvis import inert, pt2
from fvis.arch import with_arch
from fvis.errors import BadFileError, RefusedError
from fvis.formats import ZIP_ERRORS, Sniffed
from fvis.layers import ModuleNode, TensorMeta, node_from_paths
from fvis.pickles import trusted_bytes, weights_only_unless
from fvis.text import preview as _preview
from fvis.trust import screen, torch_reason, untrusted_globals, ways_forward

if TYPE_CHECKING:
    from torch import nn

    from fvis.loading import LoadOptions


_EXPORT_JSON_ERRORS: tuple[type[BaseException], ...] = (*ZIP_ERRORS, TypeError)


_EXAMPLE_ERRORS: tuple[type[BaseException], ...] = (*_EXPORT_JSON_ERRORS, AttributeError)


_MEMBER_ERRORS: tuple[type[BaseException], ...] = (BadFileError, *ZIP_ERRORS)


def metas_from_export(scan: pt2.ExportScan) -> dict[str, TensorMeta]:
    return {
        w.name: TensorMeta(w.name, w.shape, "float32", w.requires_grad, is_buffer=not w.is_param)
        for w in scan.weights
    }


def tree_from_export(sniffed: Sniffed, metas: Mapping[str, TensorMeta]) -> ModuleNode:
    """Rebuild the module tree from the ``nn_module_stack`` each graph node records."""
    try:
        with zipfile.ZipFile(sniffed.path) as archive:
            program = json.loads(archive.read(sniffed.prefix + "models/model.json"))
        graph = program["graph_module"]
    except _EXPORT_JSON_ERRORS as exc:
        raise BadFileError(f"{sniffed.path} is a damaged torch.export archive ({exc})") from None
    classes: dict[str, str] = {}
    # Nested graphs (a no_grad region becomes a wrap_with_set_grad_enabled subgraph) carry
    # their own nodes: visit every node's metadata wherever it sits in the JSON.
    for stack in _module_stacks(graph):
        for entry in stack.split(";"):
            parts = entry.split(",")
            if len(parts) >= 3:
                classes.setdefault(parts[1], parts[-1])
    return node_from_paths(classes, metas)


def _module_stacks(value: Any) -> Iterator[str]:
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            stack = (
                (item.get("metadata") or {}).get("nn_module_stack")
                if isinstance(item.get("metadata"), dict)
                else None
            )
            if isinstance(stack, str):
                yield stack
            pending.extend(reversed(list(item.values())))
        elif isinstance(item, list):
            pending.extend(reversed(item))


def load_export(sniffed: Sniffed, options: LoadOptions) -> tuple[nn.Module, list[str]]:
    import torch

    scan = pt2.scan_export(sniffed)
    pt2.refuse_untrusted(scan, sniffed.path, trusted=options.trust is not None)
    screen_export(sniffed, scan, trusted=options.trust is not None)
    if options.trust is None:
        _refuse_export_pickles(sniffed, options, scan)
    source = trusted_bytes(sniffed.path, options.trust) if options.trust else sniffed.path
    try:
        with warnings.catch_warnings(), _quiet_torch_logging():
            warnings.simplefilter("ignore")
            with weights_only_unless(options.trust is not None):
                program = torch.export.load(source)
            # Decompose so in-place ops (aten.relu_) become real values, then rebuild the tree.
            module = torch.export.unflatten(program.run_decompositions())
    except Exception as exc:
        raise _export_load_error(sniffed, exc, trusted=options.trust is not None) from None
    notes = ["torch.export program: decomposed and unflattened to its module tree"]
    if options.arch:
        return with_arch(sniffed, options, module.state_dict(), notes)
    return module, notes


# torch's advice when a safe load fails: never relayed (fvis decides what needs --trust)
_UNSAFE_ADVICE = re.compile(r"weights_only`?\s*(=|set to)\s*`?False|Weights only load failed")


def _export_load_error(
    sniffed: Sniffed, exc: Exception, trusted: bool
) -> BadFileError | RefusedError:
    """fvis's own error for a program torch could not load."""
    if not trusted and _UNSAFE_ADVICE.search(str(exc)):
        return RefusedError(
            f"{sniffed.path}: torch.export.load met a pickled member that safe loading refuses, "
            "though fvis's check of the archive found none; the archive may have been crafted "
            "to hide it",
            hint="rebuild the program with torch.export.save from code you trust",
        )
    return BadFileError(
        f"{sniffed.path}: torch.export program could not be loaded: {torch_reason(exc)}"
    )


def _refuse_export_pickles(sniffed: Sniffed, options: LoadOptions, scan: pt2.ExportScan) -> None:
    """torch.export.load unpickles weights and constants marked ``use_pickle`` with
    ``weights_only=False``: such a program needs --trust. Its sample inputs are pickled too;
    they load under forced ``weights_only`` when they name only safe globals."""
    pickled = {p.name: p.member for p in scan.pickled}
    inputs = [sniffed.prefix + m for m in scan.safe_pickles]
    members = [sniffed.prefix + m for m in pickled.values()]
    seen, unreadable = _globals_of_members(sniffed, [*members, *inputs])
    blocked = untrusted_globals(seen, options.allow_modules)
    if not (pickled or blocked or unreadable):
        return
    named = [_preview(blocked, 5)] if blocked else []
    named += [f"unreadable {_preview(unreadable)}"] if unreadable else []
    listed = _preview(list(pickled) or list(scan.safe_pickles))
    if blocked:
        hint = ways_forward(sniffed.path, blocked)
    elif unreadable:
        hint = f"fvis could not check them; only --trust {sniffed.path.name} if you made it"
    else:
        hint = f"--trust if you trust {sniffed.path.name}"
    detail = f"; they name {', '.join(named)}" if named else ""
    raise RefusedError(
        f"{sniffed.path} is a torch.export program with pickled members ({listed}) that "
        f"would run code when loaded{detail}",
        hint=hint,
    )


def screen_export(sniffed: Sniffed, scan: pt2.ExportScan, trusted: bool) -> None:
    """The malicious-file verdict for a program's pickled members (weights, constants, sample
    inputs), read with stand-ins: ``fvis layers`` refuses a payload as it does in any other
    format, even though listing never unpickles them."""
    for member in (*(p.member for p in scan.pickled), *scan.safe_pickles):
        seen, _unreadable = _globals_of_members(sniffed, [sniffed.prefix + member])
        screen(sniffed.path, seen, trusted, sniffed.kind.value, part=member)


def _globals_of_members(sniffed: Sniffed, members: list[str]) -> tuple[tuple[str, ...], list[str]]:
    """Globals named by each pickled member (read with stand-ins), and the unreadable ones."""
    seen: list[str] = []
    unreadable: list[str] = []
    with zipfile.ZipFile(sniffed.path) as archive:
        for member in members:
            try:
                seen += inert.globals_in_bytes(archive.read(member), sniffed.path)
            except _MEMBER_ERRORS:
                unreadable.append(member.removeprefix(sniffed.prefix))
    return tuple(dict.fromkeys(seen)), unreadable


@contextlib.contextmanager
def _quiet_torch_logging() -> Iterator[None]:
    """Keep torch's logged tracebacks (a failed load, a failed decomposition) off stderr:
    fvis says what failed in one line. The caller's own ``logging.disable`` level returns."""
    previous_level = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(previous_level)


# torch.export's serialized ScalarType numbers (torch/_export/serde/schema.py).
_EXPORT_DTYPES = {
    4: "int32",
    5: "int64",
    6: "float16",
    7: "float32",
    8: "float64",
    12: "bool",
    13: "bfloat16",
}


def export_example_inputs(sniffed: Sniffed) -> tuple[tuple[tuple[int, ...], str], ...]:
    """(shape, dtype) of each user input a ``.pt2`` program was traced with, from its JSON.

    A program is specialised to these shapes, so they are the input to synthesize.
    """
    try:
        with zipfile.ZipFile(sniffed.path) as archive:
            graph = json.loads(archive.read(sniffed.prefix + "models/model.json"))["graph_module"]
        specs = graph["signature"]["input_specs"]
        values = graph["graph"]["tensor_values"]
        names = [
            s["user_input"]["arg"]["as_tensor"]["name"]
            for s in specs
            if "as_tensor" in s.get("user_input", {}).get("arg", {})
        ]
        return tuple(
            (
                tuple(int(d.get("as_int", 2)) for d in values[n]["sizes"]),
                _EXPORT_DTYPES.get(values[n].get("dtype"), "float32"),
            )
            for n in names
        )
    except _EXAMPLE_ERRORS:
        return ()
