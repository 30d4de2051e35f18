"""Read pickled modules and TorchScript archives without running anything from the file.

An ``Unpickler`` whose ``find_class`` returns only inert stand-ins: every class or function the
file names becomes a ``Stub`` that records its name and arguments and does nothing else, and
tensor rebuild functions return ``FakeTensor`` shapes. So ``os.system`` in a ``__reduce__``
becomes a harmless record, and the user's classes need not be importable.
"""

from __future__ import annotations

import io
import itertools
import pickle
import pickletools
import re
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fvis.errors import BadFileError
from fvis.formats import ZIP_ERRORS
from fvis.layers import ModuleNode, TensorMeta, looks_like_buffer

# A state dict takes about 30 pickle operations per tensor, so 4M is some 130k tensors: far
# more than any real checkpoint, while 4M one-byte EMPTY_SETs would otherwise hold ~1 GB.
MAX_PICKLE_OPS = 4_000_000
# Items the reader may copy while building objects (container constructors and the arguments
# of each call): a memoized tuple passed to 1M calls must not copy 1M times.
MAX_COPIED_ITEMS = MAX_PICKLE_OPS
# Deeper module trees are refused: every tree walk in fvis and torch recurses per level.
MAX_MODULE_DEPTH = 128
_CONTAINERS = (tuple, list, dict, set, frozenset)  # what a call may copy item by item
# A dimension or element count no tensor can have (torch sizes are int64).
_MAX_NUMEL = (1 << 63) - 1

# Containers that are safe to build for real: they run no code from the file.
_SAFE_BUILTINS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
}


@dataclass(frozen=True)
class FakeStorage:
    dtype: str
    numel: int


@dataclass(frozen=True)
class FakeTensor:
    shape: tuple[int, ...]
    dtype: str
    requires_grad: bool = False
    is_parameter: bool = False


class _Budget:
    """Items one read may still copy; spending past it refuses the file as a resource bomb."""

    def __init__(self, items: int) -> None:
        self.left = items
        self.calls: list[tuple[str, tuple[Any, ...]]] = []  # constructors called with arguments

    def spend(self, args: tuple[Any, ...]) -> None:
        self.left -= len(args) + sum(len(a) for a in args if isinstance(a, _CONTAINERS))
        if self.left < 0:
            raise BadFileError(
                f"the pickle builds more than {MAX_COPIED_ITEMS:,} items; "
                "refusing a possible resource bomb"
            )


class Stub:
    """An instance of a class named in the file. It keeps its state and never runs code."""

    qualname = "?"
    budget: _Budget | None = None  # set on the classes each read creates

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if self.budget is not None:
            self.budget.spend(args)
            if args:  # REDUCE/INST/OBJ: a real load runs this class's constructor with them
                self.budget.calls.append((self.qualname, args))
        self.args = list(args)  # a list: SETITEMS/APPENDS on a stub stay linear
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:  # SETITEM on a stub dict subclass
        self.args.append((key, value))

    def append(self, value: Any) -> None:  # APPEND on a stub list subclass
        self.args.append(value)

    def extend(self, values: Any) -> None:
        self.args.extend(values)


class _StubUnpickler(pickle.Unpickler):
    def __init__(self, stream: io.BufferedIOBase | io.BytesIO) -> None:
        super().__init__(stream)
        self.globals_seen: list[str] = []
        self._classes: dict[str, type[Stub]] = {}
        self.budget = _Budget(MAX_COPIED_ITEMS)

    def find_class(self, module: str, name: str) -> Any:
        qualname = f"{module}.{name}"
        self.globals_seen.append(qualname)
        if (module, name) in _SAFE_BUILTINS:
            return self.counted(_SAFE_BUILTINS[(module, name)])
        if module.startswith("torch") and name.endswith("Storage"):
            return _storage_type(name)
        if module == "torch._utils" and name.startswith("_rebuild"):
            return self.counted(_REBUILDERS.get(name, _rebuild_unknown))
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return self.counted(_rebuild_from_type_v2)
        if module == "copyreg" and name == "_reconstructor":
            return self.counted(_reconstructor)
        return self._stub_class(qualname)

    def counted(self, func: Callable[..., Any]) -> Callable[..., Any]:
        """``func`` charging its arguments (and the items of each) to this read's budget."""

        def call(*args: Any) -> Any:
            self.budget.spend(args)
            return func(*args)

        return call

    def _stub_class(self, qualname: str) -> type[Stub]:
        if qualname not in self._classes:
            attrs = {"qualname": qualname, "budget": self.budget}
            self._classes[qualname] = type("Stub", (Stub,), attrs)
        return self._classes[qualname]

    def persistent_load(self, pid: Any) -> Any:
        # Legacy files record each module class as ('module', cls, source_file, source).
        if isinstance(pid, tuple) and pid and pid[0] == "module" and len(pid) >= 2:
            return pid[1] if isinstance(pid[1], type) and issubclass(pid[1], Stub) else Stub
        # ('storage', storage_type, key, location, numel[, view_metadata])
        if isinstance(pid, tuple) and len(pid) >= 5 and isinstance(pid[1], FakeStorage):
            return FakeStorage(pid[1].dtype, int(pid[4]) if isinstance(pid[4], int) else 0)
        return FakeStorage("unknown", 0)


def _storage_type(name: str) -> FakeStorage:
    dtype = name.removesuffix("Storage").lower() or "uint8"
    return FakeStorage(
        {
            "float": "float32",
            "double": "float64",
            "half": "float16",
            "long": "int64",
            "int": "int32",
            "short": "int16",
            "byte": "uint8",
            "char": "int8",
            "untyped": "uint8",
        }.get(dtype, dtype),
        0,
    )


def _shape(value: Any) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in value)
    except (TypeError, ValueError):
        return ()
    numel = 1
    for d in shape:  # stops growing at the first impossible size, however big the ints
        numel *= d
        if d < 0 or numel > _MAX_NUMEL:
            raise BadFileError(f"a tensor has an impossible shape {_short(shape)}")
    return shape


def _short(shape: tuple[int, ...]) -> str:
    """A shape for a message: huge dimensions by their digit count, not their digits."""
    dims = [str(d) if abs(d) < 10**20 else f"<{len(str(abs(d)))}-digit number>" for d in shape]
    return "[" + ", ".join(dims[:8]) + (", ..." if len(dims) > 8 else "") + "]"


def _rebuild_tensor(storage: Any, _offset: Any = 0, size: Any = (), *_rest: Any) -> FakeTensor:
    dtype = storage.dtype if isinstance(storage, FakeStorage) else "unknown"
    requires_grad = bool(_rest[1]) if len(_rest) > 1 and isinstance(_rest[1], bool) else False
    return FakeTensor(_shape(size), dtype, requires_grad)


def _rebuild_parameter(data: Any, requires_grad: Any = True, *_rest: Any) -> FakeTensor:
    if isinstance(data, FakeTensor):
        return FakeTensor(data.shape, data.dtype, bool(requires_grad), is_parameter=True)
    return FakeTensor((), "unknown", bool(requires_grad), is_parameter=True)


def _rebuild_unknown(*args: Any) -> FakeTensor:
    for arg in args:
        if isinstance(arg, FakeTensor):
            return arg
    return FakeTensor((), "unknown")


def _rebuild_from_type_v2(func: Any, _new_type: Any, args: Any, _state: Any) -> Any:
    return func(*args) if callable(func) and not isinstance(func, type) else _rebuild_unknown()


def _reconstructor(cls: Any, _base: Any, _state: Any) -> Any:
    return cls() if isinstance(cls, type) and issubclass(cls, Stub) else Stub()


_REBUILDERS = {
    "_rebuild_tensor": _rebuild_tensor,
    "_rebuild_tensor_v2": _rebuild_tensor,
    "_rebuild_parameter": _rebuild_parameter,
    "_rebuild_parameter_with_state": _rebuild_parameter,
}


@dataclass(frozen=True)
class InertLoad:
    """The top object of a pickle read with stand-ins, and every global the file named."""

    obj: Any
    globals_seen: tuple[str, ...]
    # (class, arguments) of each constructor the pickle calls: torch.load would run them
    constructor_calls: tuple[tuple[str, tuple[Any, ...]], ...] = ()


def read_zip_pickle(path: Path, prefix: str) -> InertLoad:
    """Read ``<prefix>data.pkl`` of a torch zip or TorchScript archive with stand-ins."""
    try:
        with zipfile.ZipFile(path) as archive:
            data = archive.read(f"{prefix}data.pkl")
    except ZIP_ERRORS as exc:
        raise BadFileError(f"{path} is a corrupt checkpoint archive ({exc})") from None
    return _unpickle(path, io.BytesIO(data))


def globals_in_bytes(data: bytes, label: Path) -> tuple[str, ...]:
    """Every global a pickled blob names: a torch zip (its ``data.pkl``) or a bare pickle.

    Read with stand-ins, so nothing in it runs; used for the members of a ``.pt2`` archive
    that torch would unpickle.
    """
    if data.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as inner:
                pickles = [n for n in inner.namelist() if n.endswith("data.pkl")]
                data = inner.read(pickles[0]) if pickles else b""
        except ZIP_ERRORS as exc:
            raise BadFileError(f"{label} holds a damaged nested archive ({exc})") from None
    if not data:
        return ()
    return _unpickle(label, io.BytesIO(data)).globals_seen


def read_legacy_pickle(path: Path) -> InertLoad:
    """Read a legacy (pre-zip) torch file: magic number, protocol, sys info, then the object."""
    with path.open("rb") as fh:
        stream = io.BufferedReader(fh)
        magic = _unpickle(path, stream).obj
        if magic != 0x1950A86A20F9469CFC6C:
            raise BadFileError(
                f"{path} is a plain Python pickle, not a PyTorch checkpoint",
                hint="fvis only reads files written by torch.save",
            )
        for _ in range(2):  # protocol version, then sys info
            _unpickle(path, stream)
        return _unpickle(path, stream)


def check_pickle_ops(path: Path, stream: Any) -> None:
    """Refuse a pickle of more than ``MAX_PICKLE_OPS`` operations before building anything.

    The scan reads the opcodes only (no objects) and leaves ``stream`` where it was; a damaged
    pickle is left for the real read to report.
    """
    start = stream.tell()
    try:
        ops = sum(1 for _ in itertools.islice(pickletools.genops(stream), MAX_PICKLE_OPS + 1))
    except Exception:  # damaged: the real read below names the problem
        ops = 0
    stream.seek(start)
    if ops > MAX_PICKLE_OPS:
        raise BadFileError(
            f"{path} holds a pickle of more than {MAX_PICKLE_OPS:,} operations, more than any "
            "checkpoint needs; refusing a possible resource bomb"
        )


def _unpickle(path: Path, stream: Any) -> InertLoad:
    check_pickle_ops(path, stream)
    unpickler = _StubUnpickler(stream)
    try:
        obj = unpickler.load()
    except RecursionError:
        raise BadFileError(f"{path} is nested too deeply to read") from None
    except BadFileError as exc:  # a limit, or an impossible tensor
        raise BadFileError(f"{path}: {exc.message}") from None
    except Exception as exc:  # any malformed pickle: EOFError, UnpicklingError, ValueError...
        reason = str(exc) or type(exc).__name__
        raise BadFileError(f"{path} is a corrupt or truncated checkpoint ({reason})") from None
    calls = tuple(unpickler.budget.calls)
    return InertLoad(obj, tuple(dict.fromkeys(unpickler.globals_seen)), calls)


def is_module_stub(obj: Any) -> bool:
    """True when ``obj`` is a pickled ``nn.Module`` or TorchScript module stand-in."""
    if not isinstance(obj, Stub):
        return False
    state = obj.state
    return isinstance(state, dict) and ("_modules" in state or "training" in state)


def tree_from_stub(
    root: Stub, buffers: Mapping[str, frozenset[str]] | None = None, source: object = "the file"
) -> ModuleNode:
    """The module tree of a pickled module (``nn.Module`` state or TorchScript attributes).

    ``buffers`` maps TorchScript class names to their ``__buffers__`` (see
    ``torchscript_buffers``); without it buffers are told from parameters by name and dtype.
    Built without recursion; a module that contains itself, or a tree deeper than
    ``MAX_MODULE_DEPTH``, raises ``BadFileError`` naming ``source``.
    """
    memo: dict[int, ModuleNode] = {}
    buffers = buffers or {}
    on_path: set[int] = set()
    pending: list[tuple[Stub, str, int, bool]] = [(root, "", 0, False)]
    while pending:
        stub, name, depth, children_done = pending.pop()
        if children_done:
            on_path.discard(id(stub))
            memo[id(stub)] = _node(stub, memo, buffers)
            continue
        if id(stub) in memo:
            continue
        if id(stub) in on_path:
            raise BadFileError(f"{source}: module {name!r} contains itself (a cycle)")
        if depth > MAX_MODULE_DEPTH:
            raise BadFileError(
                f"{source}: modules are nested more than {MAX_MODULE_DEPTH} levels deep"
            )
        on_path.add(id(stub))
        pending.append((stub, name, depth, True))
        for child_name, child in reversed(_parts(stub, buffers)[0]):
            child_path = f"{name}.{child_name}" if name else child_name
            pending.append((child, child_path, depth + 1, False))
    return memo[id(root)]


_CLASS_RE = re.compile(r"^class (\w+)\(", re.M)
_BUFFERS_RE = re.compile(r"^[ \t]+__buffers__ = \[([^\]\n]*)\]", re.M)


def torchscript_buffers(path: Path, prefix: str) -> dict[str, frozenset[str]]:
    """``{"__torch__.pkg.Cls": {"running_mean", ...}}`` from the archive's generated code.

    The code is read as text and matched with regular expressions; it is never compiled.
    """
    out: dict[str, frozenset[str]] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if not (name.startswith(f"{prefix}code/") and name.endswith(".py")):
                    continue
                module = name[len(f"{prefix}code/") : -3].replace("/", ".")
                text = archive.read(name).decode("utf-8", "replace")
                starts = [(m.start(), m.group(1)) for m in _CLASS_RE.finditer(text)]
                ends = [start for start, _ in starts[1:]] + [len(text)] * bool(starts)
                for (start, cls), end in zip(starts, ends, strict=True):
                    found = _BUFFERS_RE.search(text, start, end)
                    names = re.findall(r'"([^"]+)"', found.group(1)) if found else []
                    out[f"{module}.{cls}"] = frozenset(names)
    except ZIP_ERRORS as exc:
        raise BadFileError(f"{path} is a damaged TorchScript archive ({exc})") from None
    return out


def _node(
    stub: Stub, memo: Mapping[int, ModuleNode], buffers: Mapping[str, frozenset[str]]
) -> ModuleNode:
    """One module's node; its children are in ``memo`` already."""
    children, tensors = _parts(stub, buffers)
    return ModuleNode(
        _clean_class_name(stub.qualname),
        id(stub),
        tuple(tensors),
        tuple((name, memo[id(child)]) for name, child in children),
    )


def _parts(
    stub: Stub, buffers: Mapping[str, frozenset[str]]
) -> tuple[list[tuple[str, Stub]], list[TensorMeta]]:
    """A module's ``(name, child)`` submodules and its tensors, from its pickled state."""
    state = stub.state if isinstance(stub.state, dict) else {}
    if "_modules" in state:  # a pickled nn.Module: its __dict__
        children_src = state.get("_modules") or {}
        tensors = _metas(state.get("_parameters") or {}, buffer=False)
        tensors += _metas(state.get("_buffers") or {}, buffer=True)
    else:  # TorchScript: attributes directly, submodules and tensors mixed
        children_src = {k: v for k, v in state.items() if is_module_stub(v)}
        attributes = {k: v for k, v in state.items() if isinstance(v, FakeTensor)}
        declared = buffers.get(stub.qualname)

        def is_buffer(name: str, tensor: FakeTensor) -> bool:
            return (
                name in declared if declared is not None else looks_like_buffer(name, tensor.dtype)
            )

        tensors = _metas({k: v for k, v in attributes.items() if not is_buffer(k, v)}, buffer=False)
        tensors += _metas({k: v for k, v in attributes.items() if is_buffer(k, v)}, buffer=True)
    items = children_src.items() if isinstance(children_src, dict) else ()
    children = [(str(name), child) for name, child in items if isinstance(child, Stub)]
    return children, tensors


def _metas(items: dict[str, Any], buffer: bool) -> list[TensorMeta]:
    return [
        TensorMeta(str(name), t.shape, t.dtype, t.requires_grad and not buffer, is_buffer=buffer)
        for name, t in items.items()
        if isinstance(t, FakeTensor)
    ]


def _clean_class_name(qualname: str) -> str:
    # TorchScript names classes "__torch__.pkg.Cls" and mangles repeats "...___torch_mangle_3.Cls".
    parts = [
        p
        for p in qualname.removeprefix("__torch__.").split(".")
        if not p.startswith("___torch_mangle")
    ]
    return ".".join(parts)


def fake_tensors(obj: Any) -> dict[str, FakeTensor] | None:
    """The ``name -> FakeTensor`` items of a state-dict-like mapping, else ``None``."""
    if not isinstance(obj, dict) or not obj:
        return None
    if not all(isinstance(k, str) for k in obj):
        return None
    tensors = {k: v for k, v in obj.items() if isinstance(v, FakeTensor)}
    return tensors if tensors else None
