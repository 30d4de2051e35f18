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
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn

from fvis import hf, inert, pt2
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
from fvis.text import preview as _preview
from fvis.trust import (  # the policy lives in fvis.trust; these names stay importable here
    TrustWarning,
    allowed_classes,
    check_allow_modules,
    import_user,
    screen,
    torch_reason,
    untrusted_globals,
    ways_forward,
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
    # The pyproject.toml that supplied ``arch`` / ``allow_modules`` (None: a flag or the
    # caller did): importing code a checkout names is announced with a TrustWarning.
    arch_config: Path | None = None
    allow_modules_config: Path | None = None


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
    folder = _hf_folder(path)
    if folder is not None:
        return _inspect_folder(folder, options)
    # Listing reads data.pkl only (zipfile checks that member's CRC as it reads it); verifying
    # every CRC would read all the tensor data, which listing promises not to do.
    limits = options.limits
    if limits.verify_crc is None:
        limits = dataclasses.replace(limits, verify_crc=False)
    sniffed = sniff(path, limits)
    if sniffed.kind in (FileKind.TORCH_ZIP, FileKind.LEGACY_PICKLE, FileKind.TORCHSCRIPT):
        loaded = read_inert(sniffed)
        screen(path, loaded.globals_seen, options.trust is not None, sniffed.kind.value)
        if inert.is_module_stub(loaded.obj) and not options.arch:
            buffers = (
                inert.torchscript_buffers(path, sniffed.prefix)
                if sniffed.kind is FileKind.TORCHSCRIPT
                else None
            )
            tree = inert.tree_from_stub(loaded.obj, buffers, source=path)
            note = (
                "TorchScript archive"
                if sniffed.kind is FileKind.TORCHSCRIPT
                else ("pickled module (read without running it)")
            )
            return ModelTree.of(tree, note, kind=sniffed.kind.value)
        found = _metas_from_inert(sniffed, loaded.obj)
    elif sniffed.kind is FileKind.SAFETENSORS:
        found = Nested(_metas_from_safetensors(path), ())
    else:
        scan = pt2.scan_export(sniffed)
        pt2.refuse_untrusted(scan, path, trusted=options.trust is not None)
        found = Nested(_metas_from_export(scan), ())
        if not options.arch:
            return ModelTree.of(
                _tree_from_export(sniffed, found.state),
                "torch.export program",
                kind=sniffed.kind.value,
            )
    if options.arch:
        model, built = _build_arch_for_listing(options)
        expected = _metas_of_module(model)
        state, notes = unwrap_state_dict(found.state, expected)
        check_state_dict(path, expected, fill_tied(expected, state)[0], options.strict)
        notes = [*found.notes, *built, *notes]
        return ModelTree.of(node_from_module(model), "; ".join(notes), kind=sniffed.kind.value)
    state, notes = unwrap_state_dict(found.state)
    notes = [*found.notes, *notes]
    note = "state dict only: parameter-free modules (ReLU, pooling) are not visible"
    return ModelTree.of(
        node_from_state_dict(state), "; ".join([*notes, note]), kind=sniffed.kind.value
    )


def _hf_folder(path: Path) -> hf.HFFolder | None:
    """A Hugging Face folder (or one of its shards or index files, which name the folder)."""
    if hf.is_folder(path):
        return hf.read_folder(path)
    owner = hf.shard_folder(path)
    if owner is not None:
        raise UsageError(
            f"{path} is one part of the sharded model in {owner}",
            hint=f"pass the folder: {owner}",
        )
    return None


def _inspect_folder(folder: hf.HFFolder, options: LoadOptions) -> ModelTree:
    if options.arch:
        model, built = _build_arch_for_listing(options)
        expected = _metas_of_module(model)
        state, notes = unwrap_state_dict(hf.header_metas(folder), expected)
        notes = [*built, *notes]
        check_state_dict(folder.path, expected, fill_tied(expected, state)[0], options.strict)
        return ModelTree.of(node_from_module(model), "; ".join(notes), kind="hf-folder")
    if folder.config is not None and hf.have_transformers():
        model = hf.build_on_meta(folder, trusted=options.trust is not None)
        return ModelTree.of(node_from_module(model), folder.describe(), kind="hf-folder")
    note = (
        "no config.json: the tree comes from the weights"
        if folder.config is None
        else "transformers is not installed (pip install 'fvis[hf]')"
    )
    return ModelTree.of(
        node_from_state_dict(hf.header_metas(folder)),
        f"{folder.describe()}; {note}: parameter-free modules (ReLU, pooling) are not visible",
        kind="hf-folder",
    )


def _load_folder(folder: hf.HFFolder, options: LoadOptions) -> LoadedModel:
    if options.trust is not None and options.trust.sha256 is not None:
        raise UsageError(
            "--trust-sha256 names one file; a folder can only be trusted whole", hint="use --trust"
        )
    if options.arch:
        state = hf.read_shards(folder)
        sniffed = Sniffed(folder.path, FileKind.SAFETENSORS)
        module, notes = _with_arch(sniffed, options, state, [folder.describe()])
    else:
        if options.trust is None:
            _refuse_untrusted_shards(folder, options)
        module, notes = hf.load_folder(folder, options.trust is not None, options.strict)
    module.eval()
    return LoadedModel(module, ModelSource(folder.path, "hf-folder", "", tuple(notes)))


def _refuse_untrusted_shards(folder: hf.HFFolder, options: LoadOptions) -> None:
    """Pickled ``.bin`` shards pass the same inert scan as any checkpoint before transformers
    reads them (it loads with ``weights_only=True``; fvis names what blocked, and why)."""
    if folder.weight_format == "safetensors":
        return
    for shard in folder.weights:
        sniffed = sniff(shard, options.limits)
        if sniffed.kind not in (FileKind.TORCH_ZIP, FileKind.LEGACY_PICKLE):
            raise BadFileError(f"{shard} is a {sniffed.kind.value} file, not pickled weights")
        seen = read_inert(sniffed).globals_seen
        screen(shard, seen, False, sniffed.kind.value)
        allowed_classes(shard, seen, options.allow_modules)


def read_inert(sniffed: Sniffed) -> inert.InertLoad:
    """The pickle of a legacy or zip checkpoint, read with stand-ins: nothing runs."""
    if sniffed.kind is FileKind.LEGACY_PICKLE:
        return inert.read_legacy_pickle(sniffed.path)
    return inert.read_zip_pickle(sniffed.path, sniffed.prefix)


def _metas_from_inert(sniffed: Sniffed, obj: Any) -> Nested:
    if inert.is_module_stub(obj):  # a pickled module used as weights for --arch
        return Nested(_flatten_tree_metas(inert.tree_from_stub(obj, source=sniffed.path)), ())
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


def _find_state_dict(obj: dict[Any, Any]) -> Nested | None:
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
            deeper = _search_state_dict(value, tensors_of, module_state, depth + 1)
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
        name: TensorMeta(name, tuple(t.shape), str(t.dtype), key=id(t))
        for name, t in model.state_dict(keep_vars=True).items()
    }


def fill_tied(
    expected: Mapping[str, TensorMeta], state: Mapping[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """Tied weights are stored once (``lm_head.weight`` is ``wte.weight``): a missing name of
    a tied tensor takes the value stored under another of its names.

    >>> fill_tied(_metas_of_module(gpt2), {"transformer.wte.weight": w})[1]   # doctest: +SKIP
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


# --------------------------------------------------------------------------- state dicts


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
        raise UsageError(f"--arch {spec}: {first_line(exc)}", hint="check --arch-kwargs") from None
    except Exception as exc:
        from fvis.downloads import download_refusal, tried_to_download

        if tried_to_download(exc):
            raise download_refusal(spec, exc) from None
        raise ModelInputError(
            f"--arch {spec} failed to build the model: {first_line(exc)}"
        ) from None
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"--arch {spec} returned a {type(model).__name__}, not an nn.Module")
    return model


def _build_arch(options: LoadOptions, device: str = "cpu") -> nn.Module:
    assert options.arch  # callers check
    if options.arch_config is not None:
        _warn_config_code(f"importing {options.arch}", "arch", options.arch_config)
    return build_arch(options.arch, options.arch_kwargs, device=device)


def _note_config_classes(options: LoadOptions, classes: list[Any]) -> None:
    """Announce classes imported from a module that ``[tool.fvis] allow-modules`` allowed."""
    if options.allow_modules_config is None:
        return
    modules = sorted({getattr(c, "__module__", "") for c in classes} - {""})
    allowed = [
        m for m in modules if any(m == a or m.startswith(a + ".") for a in options.allow_modules)
    ]
    if allowed:
        what = f"imported {_preview(allowed)} for the file's classes"
        _warn_config_code(what, "allow-modules", options.allow_modules_config)


def _warn_config_code(what: str, key: str, config: Path) -> None:
    warnings.warn(
        f"{what} because [tool.fvis] {key} in {config} says so (code from this checkout runs)",
        TrustWarning,
        stacklevel=3,
    )


def _build_arch_for_listing(options: LoadOptions) -> tuple[nn.Module, list[str]]:
    """The architecture on the meta device (no memory, no data); a builder that cannot run
    there (it copies weights in, as ``from_pretrained`` or torchvision's RegNet do) is built
    for real instead, and the note says so."""
    assert options.arch  # callers check
    try:
        return _build_arch(options, device="meta"), []
    except ModelInputError as exc:
        model = build_arch(options.arch, options.arch_kwargs)
        return model, [f"built on the CPU: the builder fails on the meta device ({exc.message})"]


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
            f"--arch: importing {path} failed: {type(exc).__name__}: {first_line(exc)}",
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
    folder = _hf_folder(path)
    if folder is not None:
        return _load_folder(folder, options)
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


def _with_arch(
    sniffed: Sniffed, options: LoadOptions, state: Mapping[str, Any], notes: list[str]
) -> tuple[nn.Module, list[str]]:
    assert options.arch  # callers check
    model = _build_arch(options)
    expected = _metas_of_module(model)
    state, more = unwrap_state_dict(state, expected)
    state, tied = fill_tied(expected, state)
    warned = check_state_dict(sniffed.path, expected, state, options.strict)
    try:
        model.load_state_dict(state, strict=options.strict, assign=False)
    except RuntimeError as exc:
        raise ModelInputError(f"{sniffed.path}: {str(exc).splitlines()[0]}") from None
    return model, [*notes, *more, *tied, *warned]


def _load_pickle_checkpoint(sniffed: Sniffed, options: LoadOptions) -> tuple[nn.Module, list[str]]:
    import torch

    peek = read_inert(sniffed)
    screen(sniffed.path, peek.globals_seen, options.trust is not None, sniffed.kind.value)
    is_module = inert.is_module_stub(peek.obj)
    if is_module:  # a cycle or a very deep tree is refused before torch recurses into it
        inert.tree_from_stub(peek.obj, source=sniffed.path)
    extra: list[Any] = []
    if options.trust is None and not is_module:  # refused before anything else is read
        extra = allowed_classes(sniffed.path, peek.globals_seen, options.allow_modules)
        _note_config_classes(options, extra)
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
        found = Nested(obj.state_dict(), ())
    elif isinstance(obj, dict):
        found = _real_state_dict(sniffed.path, obj)
    else:
        raise BadFileError(f"{sniffed.path} holds a {type(obj).__name__}, not a state dict")
    if not options.arch:
        raise UsageError(
            f"{sniffed.path} holds a state dict, which has weights but no architecture",
            hint="give the model class: --arch pkg.module:ClassName (or path/file.py:build)",
        )
    return _with_arch(sniffed, options, found.state, found.notes)


def _real_state_dict(path: Path, obj: dict[Any, Any]) -> Nested:
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

    if options.trust is None and peek.constructor_calls:  # before torch runs any of them
        from fvis.budgets import check_constructor_calls

        limit = options.limits.max_model_bytes
        check_constructor_calls(sniffed.path, peek.constructor_calls, extra_globals or [], limit)
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
        _refuse_torch_error(sniffed, options, peek, exc)
    finally:
        if source is not sniffed.path:
            source.close()


def _refuse_torch_error(
    sniffed: Sniffed, options: LoadOptions, peek: inert.InertLoad, exc: Exception
) -> NoReturn:
    """fvis's own message for a failed ``torch.load``, never torch's wording: it advises
    ``weights_only=False``, even for files that carry payloads."""
    text = str(exc)
    if options.trust is None and "unsupported global" in text.lower():
        blocked = untrusted_globals(peek.globals_seen) or ["(unknown)"]
        raise RefusedError(
            f"{sniffed.path} needs globals fvis does not allow: {_preview(blocked, 5)}",
            hint=ways_forward(sniffed.path, blocked),
        ) from None
    if options.trust is None and "Weights only load failed" in text:
        raise RefusedError(
            f"{sniffed.path}: torch's safe loader refused it ({torch_reason(exc)})"
        ) from None
    raise BadFileError(f"{sniffed.path} could not be read: {torch_reason(exc)}") from None


def _load_pickled_module(
    sniffed: Sniffed, peek: inert.InertLoad, options: LoadOptions
) -> nn.Module:
    import torch

    classes = (
        []
        if options.trust
        else allowed_classes(
            sniffed.path, peek.globals_seen, options.allow_modules, " is a pickled module that"
        )
    )
    _note_config_classes(options, classes)
    model = _torch_load(sniffed, options, peek, classes)
    if not isinstance(model, torch.nn.Module):
        raise BadFileError(f"{sniffed.path} did not load as a module")
    return model


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
        from fvis.errors import torchscript_refused  # one message with fvis.capture's refusal

        raise torchscript_refused(f"{sniffed.path} (a TorchScript archive)")
    peek = read_inert(sniffed)  # the tensors are read as data, but a payload is still news
    screen(sniffed.path, peek.globals_seen, options.trust is not None, sniffed.kind.value)
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
