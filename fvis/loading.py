"""Checkpoint I/O: list a model without running it, or load it safely to run it.

Two entry points:

- ``inspect_model`` builds the module tree of any checkpoint **without running code from the
  file and without reading tensor data** (stand-in unpickling, headers, JSON metadata).
- ``load_model`` returns a runnable ``nn.Module``. It always passes ``weights_only=True`` to
  ``torch.load`` unless the user passed ``--trust``; it never falls back to unsafe loading.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import importlib.util
import io
import json
import logging
import os
import re
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fvis import inert, pt2
from fvis.errors import BadFileError, ModelInputError, RefusedError, UsageError, first_line
from fvis.formats import ZIP_ERRORS, FileKind, Limits, Sniffed, read_safetensors_header, sniff
from fvis.layers import (
    ModelTree,
    ModuleNode,
    TensorMeta,
    node_from_module,
    node_from_paths,
    node_from_state_dict,
)

if TYPE_CHECKING:
    import torch
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
# Never allowlisted, whatever the user asks: these run code or touch the system.
_DANGEROUS_ROOTS = frozenset(
    {
        "builtins",
        "__builtin__",
        "commands",  # Python 2 names that pickle protocol 2 still writes
        "copy_reg",
        "thread",
        "_thread",
        "popen2",
        "posixpath",
        "ntpath",
        "os",
        "posix",
        "nt",
        "sys",
        "subprocess",
        "importlib",
        "pickle",
        "_pickle",
        "shutil",
        "socket",
        "ctypes",
        "runpy",
        "code",
        "codeop",
        "pty",
        "io",
        "pathlib",
        "shlex",
        "types",
        "marshal",
        "inspect",
        "functools",
        "operator",
        "multiprocessing",
        "signal",
        "webbrowser",
        "tempfile",
        "codecs",
        "_codecs",
        "platform",
        "asyncio",
        "threading",
        "glob",
        "pdb",
        "bdb",
        "timeit",
        "trace",
        "cProfile",
        "profile",
        "urllib",
        "http",
        "ftplib",
        "smtplib",
        "telnetlib",
        "requests",
        "numpy",
        "copyreg",
        "dill",
        "cloudpickle",
        "joblib",
    }
)


@dataclass(frozen=True)
class Trust:
    """The user's decision to run code from a checkpoint, optionally bound to one file."""

    sha256: str | None = None  # None: trust whatever file is given

    @classmethod
    def parse(cls, value: str | None) -> Trust | None:
        """``None`` -> no trust; ``"any"`` (bare ``--trust``); ``"sha256:<hex>"`` or
        ``"<hex>"`` (``--trust-sha256``) -> trust bound to one exact file."""
        if value is None:
            return None
        if value == "any":
            return cls()
        match = re.fullmatch(r"(?:sha256:)?([0-9a-fA-F]{64})", value.strip())
        if not match:
            raise UsageError(
                f"--trust-sha256 takes the file's SHA-256 (64 hex digits), not {value!r}",
                hint="compute it with: sha256sum MODEL",
            )
        return cls(match.group(1).lower())

    @classmethod
    def from_flags(cls, trust: bool, sha256: str | None) -> Trust | None:
        """``--trust`` and ``--trust-sha256 HEX`` (which implies ``--trust``)."""
        return cls.parse(sha256) if sha256 is not None else (cls() if trust else None)


@dataclass(frozen=True)
class LoadOptions:
    """How to turn a file into a model; mirrors the CLI options."""

    arch: str | None = None  # "pkg.module:callable" or "path/file.py:callable"
    arch_kwargs: Mapping[str, Any] = field(default_factory=dict)
    allow_modules: tuple[str, ...] = ()
    trust: Trust | None = None
    strict: bool = True
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from, for reports and messages."""

    path: Path | None  # None for the bundled sample
    kind: str
    sha256: str = ""
    notes: tuple[str, ...] = ()
    # (shape, dtype) of the example inputs a torch.export program was traced with
    example_inputs: tuple[tuple[tuple[int, ...], str], ...] = ()

    @property
    def label(self) -> str:
        return str(self.path) if self.path else "<bundled sample inner_outer>"


@dataclass(frozen=True)
class LoadedModel:
    module: nn.Module
    source: ModelSource


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- inspect (no code)


def inspect_model(path: Path | str, options: LoadOptions = LoadOptions()) -> ModelTree:
    """The module tree of a checkpoint, without running code from it or reading tensor data.

    >>> inspect_model(Path("model.pt")).names()[:2]          # doctest: +SKIP
    ['inner', 'inner.linear']
    """
    path = Path(path)
    # Listing reads data.pkl only (zipfile checks that member's CRC as it reads it); verifying
    # every CRC would read all the tensor data, which listing promises not to do.
    limits = options.limits
    if limits.verify_crc is None:
        limits = dataclasses.replace(limits, verify_crc=False)
    sniffed = sniff(path, limits)
    if sniffed.kind in (FileKind.TORCH_ZIP, FileKind.LEGACY_PICKLE, FileKind.TORCHSCRIPT):
        loaded = read_inert(sniffed)
        if inert.is_module_stub(loaded.obj) and not options.arch:
            buffers = (
                inert.torchscript_buffers(path, sniffed.prefix)
                if sniffed.kind is FileKind.TORCHSCRIPT
                else None
            )
            tree = inert.tree_from_stub(loaded.obj, buffers)
            note = (
                "TorchScript archive"
                if sniffed.kind is FileKind.TORCHSCRIPT
                else ("pickled module (read without running it)")
            )
            return ModelTree.of(tree, note, kind=sniffed.kind.value)
        metas = _metas_from_inert(sniffed, loaded.obj)
    elif sniffed.kind is FileKind.SAFETENSORS:
        metas = _metas_from_safetensors(path)
    else:
        scan = pt2.scan_export(sniffed)
        pt2.refuse_untrusted(scan, path, trusted=options.trust is not None)
        metas = _metas_from_export(scan)
        if not options.arch:
            return ModelTree.of(
                _tree_from_export(sniffed, metas), "torch.export program", kind=sniffed.kind.value
            )
    state, notes = unwrap_state_dict(metas)
    if options.arch:
        model = build_arch(options.arch, options.arch_kwargs, device="meta")
        check_state_dict(path, _metas_of_module(model), state, options.strict)
        return ModelTree.of(node_from_module(model), "; ".join(notes), kind=sniffed.kind.value)
    note = "state dict only: parameter-free modules (ReLU, pooling) are not visible"
    return ModelTree.of(
        node_from_state_dict(state), "; ".join([*notes, note]), kind=sniffed.kind.value
    )


def read_inert(sniffed: Sniffed) -> inert.InertLoad:
    """The pickle of a legacy or zip checkpoint, read with stand-ins: nothing runs."""
    if sniffed.kind is FileKind.LEGACY_PICKLE:
        return inert.read_legacy_pickle(sniffed.path)
    return inert.read_zip_pickle(sniffed.path, sniffed.prefix)


def _metas_from_inert(sniffed: Sniffed, obj: Any) -> dict[str, TensorMeta]:
    if inert.is_module_stub(obj):  # a pickled module used as weights for --arch
        return _flatten_tree_metas(inert.tree_from_stub(obj))
    if isinstance(obj, inert.FakeTensor):
        raise BadFileError(
            f"{sniffed.path} holds a single tensor {list(obj.shape)}, not a model or state dict",
            hint="is it an input? pass it with --input",
        )
    if not isinstance(obj, dict):
        what = getattr(obj, "qualname", type(obj).__name__)
        raise BadFileError(f"{sniffed.path} holds a {what}, not a model or state dict")
    found = _find_state_dict(obj)
    if found is None:
        raise BadFileError(
            f"{sniffed.path} holds a dict without tensors (keys: {_preview(list(obj))})",
            hint="fvis needs a state dict, a training checkpoint or a pickled module",
        )
    return found


def _find_state_dict(obj: dict[Any, Any]) -> dict[str, TensorMeta] | None:
    def metas(d: dict[Any, Any]) -> dict[str, TensorMeta]:
        return {
            k: TensorMeta(k, t.shape, t.dtype, t.requires_grad or not t.is_parameter)
            for k, t in (inert.fake_tensors(d) or {}).items()
        }

    def module_metas(value: Any) -> dict[str, TensorMeta] | None:
        if isinstance(value, inert.Stub) and inert.is_module_stub(value):
            return _flatten_tree_metas(inert.tree_from_stub(value))
        return None

    return _search_state_dict(obj, metas, module_metas)


def _search_state_dict(
    obj: dict[Any, Any],
    tensors_of: Callable[[dict[Any, Any]], dict[str, Any]],
    module_state: Callable[[Any], dict[str, Any] | None],
) -> dict[str, Any] | None:
    """The state dict inside a checkpoint dict: the dict itself when at least half of its
    entries are tensors, else the first one found under a usual key (``model``,
    ``state_dict``, ``ema``...), keys prefixed with the path. ``tensors_of`` picks a dict's
    tensors and ``module_state`` a module's (None when the value is no module): one search
    for the inert listing and the real load, so both find the same weights."""
    found = tensors_of(obj)
    if found and len(found) >= len(obj) / 2:
        return found
    for key in _NESTING_KEYS:
        value = obj.get(key)
        inner = module_state(value)
        if inner is None and isinstance(value, dict):
            inner = _search_state_dict(value, tensors_of, module_state)
        if inner is not None:
            return {f"{key}.{k}": v for k, v in inner.items()}
    return None


def _flatten_tree_metas(node: Any, prefix: str = "") -> dict[str, TensorMeta]:
    out = {f"{prefix}{t.name}": t for t in node.tensors}
    for name, child in node.children:
        out.update(_flatten_tree_metas(child, f"{prefix}{name}."))
    return out


def _metas_from_safetensors(path: Path) -> dict[str, TensorMeta]:
    header = read_safetensors_header(path)
    return {
        name: TensorMeta(
            name,
            tuple(int(d) for d in info["shape"]),  # type: ignore[attr-defined]
            str(info["dtype"]).lower(),
        )
        for name, info in header.items()
    }


def _metas_from_export(scan: pt2.ExportScan) -> dict[str, TensorMeta]:
    return {
        w.name: TensorMeta(w.name, w.shape, "float32", w.requires_grad, is_buffer=not w.is_param)
        for w in scan.weights
    }


_EXPORT_JSON_ERRORS: tuple[type[BaseException], ...] = (*ZIP_ERRORS, TypeError)
_EXAMPLE_ERRORS: tuple[type[BaseException], ...] = (*_EXPORT_JSON_ERRORS, AttributeError)
_MEMBER_ERRORS: tuple[type[BaseException], ...] = (BadFileError, *ZIP_ERRORS)


def _tree_from_export(sniffed: Sniffed, metas: Mapping[str, TensorMeta]) -> ModuleNode:
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


def _metas_of_module(model: nn.Module) -> dict[str, TensorMeta]:
    return {
        name: TensorMeta(name, tuple(t.shape), str(t.dtype))
        for name, t in model.state_dict(keep_vars=True).items()
    }


# --------------------------------------------------------------------------- state dicts


def unwrap_state_dict(state: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Strip the nesting key and ``module.`` / ``_orig_mod.`` prefixes; say what was done.

    >>> unwrap_state_dict({"model.module.fc.weight": w})[1]     # doctest: +SKIP
    ["took the state dict under key 'model'", "stripped prefix 'module.' from 1 keys"]
    """
    notes: list[str] = []
    out = dict(state)
    for key in _NESTING_KEYS:
        if out and all(k.startswith(key + ".") for k in out):
            out = {k[len(key) + 1 :]: v for k, v in out.items()}
            notes.append(f"took the state dict under key {key!r}")
            break
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if out and all(k.startswith(prefix) for k in out):
                out = {k[len(prefix) :]: v for k, v in out.items()}
                notes.append(f"stripped prefix {prefix!r} from {len(out)} keys")
                changed = True
    return out, notes


def check_state_dict(
    path: Path, expected: Mapping[str, TensorMeta], found: Mapping[str, Any], strict: bool = True
) -> None:
    """Raise one readable ``ModelInputError`` listing missing, unexpected and mismatched keys."""
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
    if strict:
        if missing:
            problems.append(f"{_count(missing, 'missing key')}: {_preview(missing)}")
        if unexpected:
            problems.append(f"{_count(unexpected, 'unexpected key')}: {_preview(unexpected)}")
    if problems:
        raise ModelInputError(
            f"{path} does not fit the architecture: " + "; ".join(problems),
            hint="check --arch and --arch-kwargs (checkpoint shape vs model shape)",
        )


def _count(items: list[Any], noun: str, plural: str = "s") -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else plural}"


def _shape_of(value: Any) -> tuple[int, ...]:
    shape = getattr(value, "shape", ())
    return tuple(int(d) for d in shape)


def _shape_str(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _preview(items: list[Any], limit: int = 3) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


# --------------------------------------------------------------------------- architectures


def build_arch(spec: str, kwargs: Mapping[str, Any], device: str = "cpu") -> nn.Module:
    """Call ``module:callable`` or ``path/file.py:callable`` with ``kwargs`` on ``device``.

    >>> build_arch("sample_models.zoo:build_nested_cnn", {})   # doctest: +SKIP
    """
    import torch

    factory = _import_callable(spec)
    try:
        with torch.device(device):
            model = factory(**dict(kwargs))
    except TypeError as exc:
        raise UsageError(f"--arch {spec}: {exc}", hint="check --arch-kwargs") from None
    except Exception as exc:
        raise ModelInputError(f"--arch {spec} failed to build the model: {exc}") from None
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"--arch {spec} returned a {type(model).__name__}, not an nn.Module")
    return model


def _import_callable(spec: str) -> Callable[..., Any]:
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise UsageError(
            f"--arch {spec!r} must look like 'pkg.module:callable' or 'path/file.py:callable'"
        )
    module = _import_user_file(Path(target)) if target.endswith(".py") else import_user(target)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(f"--arch {spec}: {target} has no callable {attr!r}")
    return factory


def import_user(module_name: str) -> Any:
    """Import a module the user named (their code, their decision); the cwd is searchable."""
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r}: {exc}") from None
    except Exception as exc:  # the user's module raised while importing: their bug, not ours
        raise UsageError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {exc}",
            hint="run --debug to see the traceback",
        ) from None


def _import_user_file(path: Path) -> Any:
    if not path.is_file():
        raise UsageError(f"--arch: {path}: no such file")
    name = "_fvis_arch_" + re.sub(r"\W", "_", path.stem)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"--arch: cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's file raised while importing
        del sys.modules[name]
        raise UsageError(
            f"--arch: importing {path} failed: {type(exc).__name__}: {exc}",
            hint="run --debug to see the traceback",
        ) from None
    return module


# --------------------------------------------------------------------------- loading to run


def load_model(path: Path | str, options: LoadOptions = LoadOptions()) -> LoadedModel:
    """Load a checkpoint as a runnable module, safely.

    >>> load_model(Path("outer.state_dict.pt"), LoadOptions(arch="sample_models.zoo:OuterModel"))
    ... # doctest: +SKIP
    """
    path = Path(path)
    check_allow_modules(options.allow_modules)
    sniffed = sniff(path, options.limits)
    digest = sha256_of(path)
    _check_trust_binding(path, digest, options.trust)
    loaders = {
        FileKind.TORCH_ZIP: _load_pickle_checkpoint,
        FileKind.LEGACY_PICKLE: _load_pickle_checkpoint,
        FileKind.SAFETENSORS: _load_safetensors,
        FileKind.TORCHSCRIPT: _load_torchscript,
        FileKind.EXPORT_PROGRAM: _load_export,
    }
    module, notes = loaders[sniffed.kind](sniffed, options)
    module.eval()  # as a pickled module comes back; BatchNorm must not use batch statistics
    examples = export_example_inputs(sniffed) if sniffed.kind is FileKind.EXPORT_PROGRAM else ()
    source = ModelSource(path, sniffed.kind.value, digest, tuple(notes), examples)
    return LoadedModel(module, source)


def _check_trust_binding(path: Path, digest: str, trust: Trust | None) -> None:
    if trust is not None and trust.sha256 is not None and trust.sha256 != digest:
        raise RefusedError(
            f"{path} has SHA-256 {digest}, not the {trust.sha256} that --trust-sha256 names",
            hint="the file changed since you trusted it; check where it came from",
        )


def _trusted_bytes(path: Path, trust: Trust) -> io.BytesIO:
    """The file's bytes, read once: the hash is checked on exactly what gets unpickled, so a
    file swapped after the first check cannot slip through."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    _check_trust_binding(path, digest, trust)
    _warn_trusted(path, digest)
    return io.BytesIO(data)


def _warn_trusted(path: Path, digest: str) -> None:
    warnings.warn(
        f"running code from {path} because of --trust (sha256:{digest})", TrustWarning, stacklevel=3
    )


class TrustWarning(UserWarning):
    """Emitted once per load that runs code from a file because the user trusted it."""


def _with_arch(
    sniffed: Sniffed, options: LoadOptions, state: Mapping[str, Any], notes: list[str]
) -> tuple[nn.Module, list[str]]:
    assert options.arch  # callers check
    state, more = unwrap_state_dict(state)
    model = build_arch(options.arch, options.arch_kwargs)
    check_state_dict(sniffed.path, _metas_of_module(model), state, options.strict)
    try:
        model.load_state_dict(state, strict=options.strict, assign=False)
    except RuntimeError as exc:
        raise ModelInputError(f"{sniffed.path}: {str(exc).splitlines()[0]}") from None
    return model, [*notes, *more]


def _load_pickle_checkpoint(sniffed: Sniffed, options: LoadOptions) -> tuple[nn.Module, list[str]]:
    import torch

    peek = read_inert(sniffed)
    is_module = inert.is_module_stub(peek.obj)
    extra: list[Any] = []
    if options.trust is None and not is_module:  # refused before anything else is read
        extra = _allowed_classes(sniffed.path, peek.globals_seen, options.allow_modules)
    if is_module and options.arch and sniffed.kind is FileKind.TORCH_ZIP:
        tensors = read_tensors_as_data(sniffed)
        return _with_arch(sniffed, options, tensors, ["read the pickled module's weights as data"])
    if is_module:
        model = _load_pickled_module(sniffed, peek, options)
        if not options.arch:
            return model, []
        return _with_arch(sniffed, options, model.state_dict(), [])
    obj = _torch_load(sniffed, options, peek, extra)
    if isinstance(obj, torch.nn.Module):
        state: Mapping[str, Any] = obj.state_dict()
    elif isinstance(obj, dict):
        state = _real_state_dict(sniffed.path, obj)
    else:
        raise BadFileError(f"{sniffed.path} holds a {type(obj).__name__}, not a state dict")
    if not options.arch:
        raise UsageError(
            f"{sniffed.path} holds a state dict, which has weights but no architecture",
            hint="give the model class: --arch pkg.module:ClassName (or path/file.py:build)",
        )
    return _with_arch(sniffed, options, state, [])


def _real_state_dict(path: Path, obj: dict[Any, Any]) -> dict[str, Any]:
    import torch

    def tensors(d: dict[Any, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}

    def module_state(value: Any) -> dict[str, Any] | None:
        return dict(value.state_dict()) if isinstance(value, torch.nn.Module) else None

    found = _search_state_dict(obj, tensors, module_state)
    if found is None:
        raise BadFileError(
            f"{path} holds a dict without a state dict (keys: {_preview(list(obj))})"
        )
    return found


def _torch_load(
    sniffed: Sniffed,
    options: LoadOptions,
    peek: inert.InertLoad,
    extra_globals: list[Any] | None = None,
) -> Any:
    import torch

    mmap = sniffed.kind is FileKind.TORCH_ZIP
    # torch.load picks the safetensors reader by extension alone: hand it an open file when
    # the name says ".safetensors" but the content is torch's (we classified it by content).
    source: Any = sniffed.path
    if sniffed.path.suffix == ".safetensors":
        source, mmap = sniffed.path.open("rb"), False
    try:
        if options.trust is not None:
            trusted = _trusted_bytes(sniffed.path, options.trust)
            return torch.load(trusted, weights_only=False, map_location="cpu")
        with torch.serialization.safe_globals(extra_globals or []):
            return torch.load(source, weights_only=True, map_location="cpu", mmap=mmap)
    except Exception as exc:
        if isinstance(exc, RefusedError):
            raise
        first = first_line(exc)
        if options.trust is None and "Unsupported global" in str(exc):
            blocked = untrusted_globals(peek.globals_seen) or ["(unknown)"]
            raise RefusedError(  # never torch's wording: it advises weights_only=False
                f"{sniffed.path} needs globals fvis does not allow: {_preview(blocked, 5)}",
                hint=_ways_forward(sniffed.path, blocked),
            ) from None
        raise BadFileError(f"{sniffed.path} could not be read: {first[:300]}") from None
    finally:
        if source is not sniffed.path:
            source.close()


def _load_pickled_module(
    sniffed: Sniffed, peek: inert.InertLoad, options: LoadOptions
) -> nn.Module:
    import torch

    classes = (
        []
        if options.trust
        else _allowed_classes(
            sniffed.path, peek.globals_seen, options.allow_modules, " is a pickled module that"
        )
    )
    model = _torch_load(sniffed, options, peek, classes)
    if not isinstance(model, torch.nn.Module):
        raise BadFileError(f"{sniffed.path} did not load as a module")
    return model


def _needed_globals(seen: tuple[str, ...]) -> list[str]:
    """The globals a file names that ``weights_only`` loading does not allow by itself."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = set(_get_allowed_globals())
    except Exception:  # private API: fall back to the rebuild helpers we know
        allowed = set()
    rebuild_helpers_safe = not allowed
    return [
        g
        for g in seen
        if g not in allowed
        and not g.endswith("Storage")
        and not (rebuild_helpers_safe and g.startswith("torch._utils._rebuild"))
        and g not in ("collections.OrderedDict", "builtins.set", "__builtin__.set")
    ]


def untrusted_globals(seen: tuple[str, ...], allow_modules: tuple[str, ...] = ()) -> list[str]:
    """The globals a pickle names that safe loading would refuse."""
    return [g for g in _needed_globals(seen) if _resolve_allowed(g, allow_modules) is None]


def _allowed_classes(
    path: Path,
    seen: tuple[str, ...],
    allow_modules: tuple[str, ...],
    subject: str = ": the checkpoint",
) -> list[Any]:
    """Resolve each needed global to a class (each once), or refuse naming what blocked."""
    resolved = {g: _resolve_allowed(g, allow_modules) for g in _needed_globals(seen)}
    blocked = [g for g, obj in resolved.items() if obj is None]
    if blocked:
        raise RefusedError(
            f"{path}{subject} needs globals fvis does not trust: {_preview(blocked, 5)}",
            hint=_ways_forward(path, blocked),
        )
    return list(resolved.values())


def _resolve_allowed(qualname: str, allow_modules: tuple[str, ...]) -> Any:
    """The class for ``qualname`` if policy allows it: torch.nn modules, or classes from a
    module the user allowed. Functions and dangerous modules never pass."""
    import torch

    module_name, _, attr = qualname.rpartition(".")
    if _is_dangerous(qualname) and not module_name.startswith("torch.nn."):
        return None
    user_allowed = any(module_name == m or module_name.startswith(m + ".") for m in allow_modules)
    if not (module_name.startswith("torch.nn.") or user_allowed):
        return None
    try:
        module = import_user(module_name) if user_allowed else importlib.import_module(module_name)
    except (ImportError, UsageError):  # a name the file made up: simply not allowed
        return None
    obj = getattr(module, attr, None)
    if not isinstance(obj, type):
        return None
    if not user_allowed and not issubclass(obj, torch.nn.Module):
        return None
    return obj


def _ways_forward(path: Path, blocked: list[str] | None = None) -> str:
    """The hint for a refused file: never ``--trust`` when a blocked global can run code."""
    if blocked and any(_is_dangerous(g) for g in blocked):
        return "the file names dangerous globals that can run commands or code; do not trust it"
    modules = sorted({g.rpartition(".")[0] for g in blocked or []} - {""})
    allow = None
    if modules and _allowable(modules[0]):
        allow = f"--allow-module {modules[0]}"
    options = ["save a state dict and pass --arch", allow, f"--trust if you trust {path.name}"]
    return "; ".join(o for o in options if o)


def _is_dangerous(qualname: str) -> bool:
    """Globals that can run code when unpickled: system modules, any torch global that is
    not a plain ``torch.nn`` module class, and anything that is not named like a class
    (functions run when a pickle REDUCEs them)."""
    module_name, _, attr = qualname.rpartition(".")
    if module_name.split(".")[0] in _DANGEROUS_ROOTS:
        return True
    if module_name.split(".")[0] == "torch" and not module_name.startswith("torch.nn.modules"):
        return True
    return not attr[:1].isupper()


def _allowable(module_name: str) -> bool:
    try:
        check_allow_modules((module_name,))
    except UsageError:
        return False
    return True


def check_allow_modules(modules: tuple[str, ...]) -> None:
    """``--allow-module`` takes a user's own module; system modules and wildcards are refused."""
    for name in modules:
        if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", name):
            raise UsageError(
                f"--allow-module {name!r} must be a dotted module name such as "
                "mypkg.models (no wildcards)"
            )
        if name.split(".")[0] in _DANGEROUS_ROOTS or name == "torch" or name.startswith("torch."):
            raise UsageError(
                f"--allow-module {name}: refusing to allowlist a module that can "
                "run commands or code"
                if name.split(".")[0] in _DANGEROUS_ROOTS
                else f"--allow-module {name}: torch.nn classes are allowed "
                "already; other torch globals are not allowlisted"
            )


def _load_safetensors(sniffed: Sniffed, options: LoadOptions) -> tuple[nn.Module, list[str]]:
    if not options.arch:
        raise UsageError(
            f"{sniffed.path} is a safetensors file: weights without an architecture",
            hint="give the model class: --arch pkg.module:ClassName",
        )
    from safetensors.torch import load_file

    read_safetensors_header(sniffed.path)  # validated, with the library's reason on failure
    return _with_arch(sniffed, options, load_file(str(sniffed.path)), [])


def _load_torchscript(sniffed: Sniffed, options: LoadOptions) -> tuple[nn.Module, list[str]]:
    if not options.arch:
        raise UsageError(
            f"{sniffed.path} is a TorchScript archive: hooks do not work on ScriptModules",
            hint="give the Python class with --arch (its weights are loaded into it), "
            "or re-export the model with torch.export",
        )
    state = read_tensors_as_data(sniffed)
    return _with_arch(sniffed, options, state, ["loaded TorchScript weights into --arch"])


def read_tensors_as_data(sniffed: Sniffed) -> dict[str, torch.Tensor]:
    """The tensors of a pickled module or TorchScript archive; no code from it runs."""
    from fvis.weights import read_tensors

    return read_tensors(sniffed.path, sniffed.prefix)


def _load_export(sniffed: Sniffed, options: LoadOptions) -> tuple[nn.Module, list[str]]:
    import torch

    scan = pt2.scan_export(sniffed)
    pt2.refuse_untrusted(scan, sniffed.path, trusted=options.trust is not None)
    if options.trust is None:
        _refuse_export_pickles(sniffed, options, scan)
    source = _trusted_bytes(sniffed.path, options.trust) if options.trust else sniffed.path
    try:
        with warnings.catch_warnings(), _quiet_torch_logging():
            warnings.simplefilter("ignore")
            with _weights_only_unless(options.trust is not None):
                program = torch.export.load(source)
            # Decompose so in-place ops (aten.relu_) become real values, then rebuild the tree.
            module = torch.export.unflatten(program.run_decompositions())
    except Exception as exc:
        raise _export_load_error(sniffed, exc, trusted=options.trust is not None) from None
    notes = ["torch.export program: decomposed and unflattened to its module tree"]
    if options.arch:
        return _with_arch(sniffed, options, module.state_dict(), notes)
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
        f"{sniffed.path}: torch.export program could not be loaded: {first_line(exc)[:300]}"
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
        hint = _ways_forward(sniffed.path, blocked)
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


@contextlib.contextmanager
def _weights_only_unless(trusted: bool) -> Iterator[None]:
    """torch.export.load unpickles some members with ``weights_only=False`` and, when a safe
    load fails, retries unsafely on its own. Unless the user trusts the file, force every
    ``torch.load`` inside it to stay safe."""
    if trusted:
        yield
        return
    names = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    previous = {name: os.environ.pop(name, None) for name in names}  # torch refuses both set
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        for name, value in previous.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


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
