"""torch.export programs (``.pt2``): what ``torch.export.load`` would read, checked before it
reads anything.

The scan mirrors ``load_pt2`` in ``torch/export/pt2_archive/_package.py`` (torch 2.13) and the
deserializer in ``torch/_export/serde/serialize.py``, and decides by what torch will do, not by
what a flag in the file claims:

- every entry under ``data/aotinductor/`` makes torch ``dlopen`` a shared library (its
  constructor runs on load);
- a constant whose ``path_name`` starts with ``opaque_obj_`` is read with plain
  ``pickle.loads``, one starting with ``custom_obj_`` with TorchScript's unpickler, whatever
  ``use_pickle`` says; the forced ``weights_only`` setting covers neither;
- weights and ``tensor_*`` constants marked ``use_pickle`` go through
  ``torch.load(weights_only=False)``; sample inputs and legacy ``data/weights/<model>.pt``
  files through ``torch.load`` with a fallback to ``weights_only=False``;
- every ``expr_str`` of the graph is parsed by ``sympy.sympify``, which ``eval``s it;
- a raw weight whose record is empty becomes ``torch.zeros(declared shape)``.

Nothing here imports torch, so ``fvis layers`` runs the same scan as ``fvis dump``.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
import zipfile
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fvis.errors import BadFileError, ModelInputError, RefusedError
from fvis.formats import ZIP_ERRORS, Sniffed

# torch/export/pt2_archive/constants.py
AOTI_DIR = "data/aotinductor/"
MODELS_DIR = "models/"
WEIGHTS_DIR = "data/weights/"
CONSTANTS_DIR = "data/constants/"
_TENSOR_PREFIX = "tensor_"
# Constants torch reads by their name's prefix, not by their use_pickle flag.
_OBJECT_READERS = {
    "opaque_obj_": "read with plain pickle.loads",
    "custom_obj_": "read with TorchScript's unpickler",
}
# Bytes per element of torch.export's serialized ScalarType (torch/_export/serde/schema.py).
ELEMENT_BYTES = {
    1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 2, 7: 4, 8: 8, 9: 4, 10: 8, 11: 16, 12: 1, 13: 2,
    28: 2, 29: 1, 30: 1, 31: 1, 32: 1, 33: 1, 34: 4, 35: 8,
}  # fmt: skip
_MAX_INT = (1 << 63) - 1  # torch's sizes are int64
# What sympify may see in a torch-written expression (torch writes sympy's srepr:
# "Symbol('s0', positive=True, integer=True)"): symbols, the classes torch's deserializer
# registers, sympy's arithmetic, relations and constants, and assumption keywords. None of
# them evaluates a string; S(), sympify, lambdify and every Python builtin would.
_SYMBOL = re.compile(r"[a-z]+[0-9]+")
_SYMPY_NAMES = frozenset({
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt",
    "FloorToInt", "CeilDiv", "LShift", "RShift", "IsNonOverlappingAndDenseIndicator",
    "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity",
    "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "BitwiseFn_bitwise_and",
    "BitwiseFn_bitwise_or", "BitwiseFn_bitwise_xor", "Add", "Mul", "Pow", "Symbol", "Integer",
    "Rational", "Float", "Max", "Min", "Abs", "floor", "ceiling", "Piecewise", "ExprCondPair",
    "Equality", "Unequality", "StrictLessThan", "LessThan", "StrictGreaterThan", "GreaterThan",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "Xor", "true", "false", "True",
    "False", "oo", "zoo", "nan", "int_oo", "precision", "evaluate", "commutative", "integer",
    "real", "positive", "negative", "nonnegative", "nonpositive", "nonzero", "zero", "finite",
    "infinite", "rational", "even", "odd", "prime",
})  # fmt: skip
_OPAQUE_FN = re.compile(r"OpaqueUnaryFn_[a-z0-9]+")
_EVALUATED = "Python that sympify evaluates"
_EXPR_TOKEN = re.compile(
    r"\s+|\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|'(?P<text>[^']*)'|[-+*/%(),<>=!&|~^]"
)
# A quoted argument: a symbol name or a number (Float('1.5')), never code for sympify.
_QUOTED = re.compile(r"[A-Za-z][A-Za-z0-9_]*|[-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?")


@dataclass(frozen=True)
class Payload:
    """An archive member torch.export.load would run code from, or unpickle."""

    name: str  # the weight or constant name, or the member itself
    member: str  # inside the archive's top folder
    how: str  # how torch reads it, for messages


@dataclass(frozen=True)
class ExportWeight:
    """One weight of the ``model`` program, as its weights config declares it."""

    name: str
    shape: tuple[int, ...]
    requires_grad: bool
    is_param: bool


@dataclass(frozen=True)
class ExportScan:
    """What a ``.pt2`` holds that matters before torch reads it."""

    models: tuple[str, ...]
    weights: tuple[ExportWeight, ...]
    duplicates: tuple[str, ...]  # names two zip entries share: zipfile and torch may differ
    code: tuple[Payload, ...]  # runs code whatever weights_only says
    pickled: tuple[Payload, ...]  # use_pickle members: torch.load(weights_only=False)
    safe_pickles: tuple[str, ...]  # torch.load'ed members fvis keeps under weights_only


def scan_export(sniffed: Sniffed) -> ExportScan:
    """Read the JSON of a ``.pt2`` (never its pickles or libraries) and check it.

    >>> scan_export(sniff(Path("model.pt2"))).code          # doctest: +SKIP
    ()

    Raises ``BadFileError`` for malformed configs and for weights whose bytes are not in the
    archive; trust decisions are ``refuse_untrusted``'s.
    """
    try:
        with zipfile.ZipFile(sniffed.path) as archive:
            return _scan(_Archive(sniffed, archive))
    except ZIP_ERRORS as exc:
        raise BadFileError(f"{sniffed.path} is a damaged torch.export archive ({exc})") from None


def refuse_untrusted(scan: ExportScan, path: Path, trusted: bool) -> None:
    """Without ``--trust``, refuse what no listing or load may pass: entries named twice and
    members torch runs as code even under ``weights_only``."""
    if trusted:
        return
    if scan.duplicates:
        raise RefusedError(
            f"{path} holds several zip entries named {_preview(scan.duplicates)}: torch would "
            "load one copy and fvis's safety check may read another",
            hint="re-save the program with torch.export.save; fvis cannot check which copy "
            "torch loads",
        )
    if scan.code:
        evaluated = any(p.how == _EVALUATED for p in scan.code)
        what = "; ".join(f"{p.name} ({p.how})" for p in scan.code[:3])
        more = f"; ... (+{len(scan.code) - 3} more)" if len(scan.code) > 3 else ""
        raise RefusedError(
            f"{path} is a torch.export program that runs code from the file when torch "
            f"loads it: {what}{more}",
            hint="an expression that is not arithmetic is code: do not trust the file"
            if evaluated
            else f"--trust if you trust {path.name}",
        )


class _Archive:
    """The members of one archive by the names torch uses (without the top folder)."""

    def __init__(self, sniffed: Sniffed, archive: zipfile.ZipFile) -> None:
        self.path, self.prefix, self.zip = sniffed.path, sniffed.prefix, archive
        self.names = [i.filename.removeprefix(sniffed.prefix) for i in archive.infolist()]
        self.sizes = {
            i.filename.removeprefix(sniffed.prefix): i.file_size for i in archive.infolist()
        }

    def json(self, member: str) -> Any:
        """A JSON member; NaN, Infinity, too-deep nesting and bad bytes are damage."""
        try:
            return json.loads(self.zip.read(self.prefix + member), parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:
            raise BadFileError(f"{self.path}: {member} is not valid JSON ({exc})") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _scan(archive: _Archive) -> ExportScan:
    duplicates = tuple(name for name, n in Counter(archive.names).items() if n > 1)
    # load_pt2 loads a program for each record under models/ (the name is cut, not matched).
    models = [n[len(MODELS_DIR) : -len(".json")] for n in archive.names if n.startswith(MODELS_DIR)]
    code = _native_code(archive.names)
    pickled: list[Payload] = []
    safe = [f"data/sample_inputs/{m}.pt" for m in models]
    safe = [m for m in safe if m in archive.sizes]  # a missing one fails in torch, unread
    weights: dict[str, dict[str, Any]] = {}
    for model in models:
        code += _unsafe_expressions(archive, f"{MODELS_DIR}{model}.json")
        for folder, kind in ((WEIGHTS_DIR, "weights"), (CONSTANTS_DIR, "constants")):
            legacy = f"{folder}{model}.pt"
            if legacy in archive.sizes:  # torch prefers it to the config, and torch.load's it
                safe.append(legacy)
                continue
            config = _payload_config(archive, f"{folder}{model}_{kind}_config.json")
            found = _payloads(archive, folder, config, is_constant=kind == "constants")
            code, pickled = code + found[0], pickled + found[1]
            weights = config if (kind, model) == ("weights", "model") else weights
    return ExportScan(
        tuple(models),
        tuple(_weight(name, entry) for name, entry in weights.items()),
        duplicates,
        tuple(code),
        tuple(pickled),
        tuple(safe),
    )


def _native_code(names: list[str]) -> list[Payload]:
    """One payload per AOTInductor model folder: load_pt2 hands every such folder to the
    AOTI loader, which dlopens the library in it (its constructor runs then)."""
    folders = dict.fromkeys(
        n[: len(AOTI_DIR)] + n[len(AOTI_DIR) :].split("/")[0]
        for n in names
        if n.startswith(AOTI_DIR)
    )
    return [
        Payload(f"{folder}/", folder, "AOTInductor native code, which torch loads with dlopen")
        for folder in folders
    ]


def _payload_config(archive: _Archive, member: str) -> dict[str, dict[str, Any]]:
    """A weights or constants config, checked against torch's PayloadConfig schema."""
    if member not in archive.sizes:
        return {}  # torch fails on it by itself, with nothing read yet
    raw = archive.json(member)
    config = raw.get("config") if isinstance(raw, dict) else None
    if not isinstance(config, dict):
        raise BadFileError(f"{archive.path}: {member} has no 'config' object")
    for name, entry in config.items():
        problem = _entry_problem(entry)
        if problem:
            raise BadFileError(f"{archive.path}: {member}: entry {name!r} {problem}")
    return config


def _entry_problem(entry: Any) -> str | None:
    """What is wrong with one PayloadMeta, or None."""
    if not isinstance(entry, dict):
        return f"is a {type(entry).__name__}, not an object"
    if not isinstance(entry.get("path_name"), str) or not entry["path_name"]:
        return "has no path_name"
    for key in ("is_param", "use_pickle"):
        if not isinstance(entry.get(key, False), bool):
            return f"has a {key} that is not true or false"
    meta = entry.get("tensor_meta")
    if meta is None:  # pickled members and objects carry none; torch needs it for the rest
        objects = tuple(_OBJECT_READERS)
        needed = not (entry.get("use_pickle") or entry["path_name"].startswith(objects))
        return "has no tensor_meta" if needed else None
    return _tensor_meta_problem(meta)


def _tensor_meta_problem(meta: Any) -> str | None:
    if not isinstance(meta, dict):
        return "has a tensor_meta that is not an object"
    if _plain_int(meta.get("dtype")) not in ELEMENT_BYTES:
        return f"has an unknown dtype {meta.get('dtype')!r}"
    sizes, strides = meta.get("sizes"), meta.get("strides")
    if not isinstance(sizes, list) or not isinstance(strides, list) or len(sizes) != len(strides):
        return "needs sizes and strides: two lists of the same length"
    numbers = [*sizes, *strides, meta.get("storage_offset", {"as_int": 0})]
    if any(_as_int(n) is None for n in numbers):
        return "has a size, stride or offset that is not a whole number from 0 to 2**63-1"
    if not isinstance(meta.get("requires_grad", False), bool):
        return "has a requires_grad that is not true or false"
    return None


def _plain_int(value: Any) -> int | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_INT
    return value if ok else None


def _as_int(value: Any) -> int | None:
    """The value of a serialized ``{"as_int": N}``; None for anything else."""
    return _plain_int(value.get("as_int")) if isinstance(value, dict) and len(value) == 1 else None


def _payloads(
    archive: _Archive, folder: str, config: Mapping[str, Mapping[str, Any]], is_constant: bool
) -> tuple[list[Payload], list[Payload]]:
    """One config's members that run code and that are pickled; raw tensors are checked to
    have their bytes in the archive (so ``--max-model-bytes``, checked on the archive's
    entries, bounds what torch allocates)."""
    code: list[Payload] = []
    pickled: list[Payload] = []
    for name, entry in config.items():
        path_name = entry["path_name"]
        member = posixpath.join(folder, path_name)  # torch's os.path.join
        reader = next((how for p, how in _OBJECT_READERS.items() if path_name.startswith(p)), None)
        if is_constant and reader:  # torch picks the reader by this prefix alone
            code.append(Payload(f"constant {name!r} ({member})", member, reader))
        elif is_constant and not path_name.startswith(_TENSOR_PREFIX):
            raise BadFileError(
                f"{archive.path}: constant {name!r} has an unknown kind {path_name!r}"
            )
        elif entry.get("use_pickle"):
            pickled.append(Payload(name, member, "torch.load(weights_only=False)"))
        else:
            _check_bytes(archive, name, member, entry["tensor_meta"])
    return code, pickled


def _check_bytes(archive: _Archive, name: str, member: str, meta: Mapping[str, Any]) -> None:
    """The bytes a raw tensor spans, which its record must hold: torch makes an empty record
    into ``torch.zeros(shape)``, so a few KB could declare gigabytes."""
    sizes = [_as_int(s) or 0 for s in meta["sizes"]]
    strides = [_as_int(s) or 0 for s in meta["strides"]]
    offset = _as_int(meta.get("storage_offset", {"as_int": 0})) or 0
    extent = (
        0
        if 0 in sizes
        else offset + 1 + sum((n - 1) * s for n, s in zip(sizes, strides, strict=True))
    )
    needed = extent * ELEMENT_BYTES[meta["dtype"]]
    held = archive.sizes.get(member)
    if held is None:
        raise BadFileError(f"{archive.path}: {name!r} names {member}, which is not in the archive")
    if needed > held:
        raise BadFileError(
            f"{archive.path}: {name!r} declares shape {sizes} ({needed:,} bytes) but {member} "
            f"holds {held:,} bytes",
            hint="the archive is damaged or crafted; torch would allocate the declared size",
        )


def _weight(name: str, entry: Mapping[str, Any]) -> ExportWeight:
    meta = entry.get("tensor_meta") or {}
    shape = tuple(_as_int(s) or 0 for s in meta.get("sizes", []))
    requires_grad = bool(meta.get("requires_grad", True))
    return ExportWeight(name, shape, requires_grad, bool(entry.get("is_param", True)))


def _unsafe_expressions(archive: _Archive, member: str) -> list[Payload]:
    """Symbolic sizes torch hands to ``sympy.sympify`` (an ``eval``) that are not plain
    arithmetic over symbols and the functions torch registers."""
    if member not in archive.sizes:
        return []
    return [
        Payload(f"expression {_clip(text)!r} in {member}", member, _EVALUATED)
        for text in _expr_strings(archive.json(member))
        if not _is_plain_expression(text)
    ]


def _expr_strings(value: Any) -> Iterator[Any]:
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            if "expr_str" in item:
                yield item["expr_str"]
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)


def _is_plain_expression(text: Any) -> bool:
    """Numbers, operators, brackets, symbols, quoted symbol names and known sympy names:
    nothing that can reach an attribute, a Python builtin or a string sympify evaluates."""
    if not isinstance(text, str) or len(text) > 10_000:
        return False
    position = 0
    while position < len(text):
        match = _EXPR_TOKEN.match(text, position)
        if match is None or not _plain_token(match):
            return False
        position = match.end()
    return True


def _plain_token(match: re.Match[str]) -> bool:
    name, quoted = match.group("name"), match.group("text")
    if quoted is not None:
        return _QUOTED.fullmatch(quoted) is not None
    if name is None:
        return True
    return bool(name in _SYMPY_NAMES or _SYMBOL.fullmatch(name) or _OPAQUE_FN.fullmatch(name))


def check_example_inputs(
    label: str, examples: tuple[tuple[tuple[int, ...], str], ...], max_elements: int
) -> None:
    """Refuse to synthesize a program's example input above the ``--shape`` element cap: the
    shapes come from the file's JSON, so a few KB can ask for gigabytes."""
    for shape, _dtype in examples:
        count = math.prod(shape)
        if min(shape, default=0) < 0 or count > max_elements:
            raise ModelInputError(
                f"{label}: the program's example input {_clip(list(shape))} has "
                f"{count:,} elements; fvis synthesizes at most {max_elements:,}",
                hint="pass an input with --input FILE or --shape",
            )


def _clip(text: Any, limit: int = 60) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _preview(items: tuple[str, ...], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")
