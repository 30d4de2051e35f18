"""Checkpoint I/O: list a model without running it, or load it safely to run it.

Two entry points:

- ``inspect_model`` builds the module tree of any checkpoint **without running code from the
  file and without reading tensor data** (stand-in unpickling, headers, JSON metadata).
- ``load_model`` returns a runnable ``nn.Module``. It always passes ``weights_only=True`` to
  ``torch.load`` unless the user passed ``--trust``; it never falls back to unsafe loading.

This module sniffs and dispatches; each concern lives in its own module: ``fvis.formats``
(what a file is), ``fvis.trust`` (what may be loaded, and what marks a file malicious),
``fvis.pickles`` (torch.save zip and legacy files), ``fvis.export_loading`` and ``fvis.pt2``
(``.pt2`` programs), ``fvis.hf`` (Hugging Face folders), ``fvis.state_dicts`` (finding,
unwrapping and fitting state dicts), ``fvis.arch`` (building ``--arch``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fvis import hf, inert, pt2
from fvis.arch import build_arch, build_for_listing, with_arch
from fvis.errors import BadFileError, UsageError
from fvis.export_loading import (
    export_example_inputs,
    load_export,
    metas_from_export,
    screen_export,
    tree_from_export,
)
from fvis.formats import (
    FileKind,
    Limits,
    Sniffed,
    read_safetensors_header,
    safetensors_metas,
    sniff,
)
from fvis.layers import ModelTree, node_from_module, node_from_state_dict
from fvis.pickles import load_pickle_checkpoint, metas_from_inert, read_inert, read_tensors_as_data
from fvis.state_dicts import (
    Nested,
    check_state_dict,
    fill_tied,
    metas_of_module,
    unwrap_state_dict,
)
from fvis.trust import (  # the policy lives in fvis.trust; these names stay importable here
    Trust,
    TrustWarning,
    allowed_classes,
    check_allow_modules,
    check_trust_binding,
    screen,
    untrusted_globals,
)

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "LoadOptions",
    "LoadedModel",
    "ModelSource",
    "Trust",
    "TrustWarning",
    "build_arch",
    "check_allow_modules",
    "inspect_model",
    "load_model",
    "read_inert",
    "screen",
    "sha256_of",
    "untrusted_globals",
    "unwrap_state_dict",
]


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
    attn_implementation: str | None = None  # a transformers model's attention kernel
    big: Any = None  # fvis.big.BigModel: --device-map auto through accelerate


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
        found = metas_from_inert(sniffed, loaded.obj)
    elif sniffed.kind is FileKind.SAFETENSORS:
        found = Nested(safetensors_metas(path), ())
    else:
        scan = pt2.scan_export(sniffed)
        pt2.refuse_untrusted(scan, path, trusted=options.trust is not None)
        screen_export(sniffed, scan, trusted=options.trust is not None)
        found = Nested(metas_from_export(scan), ())
        if not options.arch:
            return ModelTree.of(
                tree_from_export(sniffed, found.state),
                "torch.export program",
                kind=sniffed.kind.value,
            )
    if options.arch:
        model, built = build_for_listing(options)
        expected = metas_of_module(model)
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
        model, built = build_for_listing(options)
        expected = metas_of_module(model)
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
        module, notes = with_arch(sniffed, options, state, [folder.describe()])
    else:
        if options.trust is None:
            _refuse_untrusted_shards(folder, options)
        module, notes = hf.load_folder(
            folder, options.trust is not None, options.strict, options.big
        )
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


# --------------------------------------------------------------------------- loading to run


def load_model(path: Path | str, options: LoadOptions = LoadOptions()) -> LoadedModel:
    """Load a checkpoint as a runnable module, safely.

    >>> load_model(Path("outer.state_dict.pt"), LoadOptions(arch="sample_models.zoo:OuterModel"))
    ... # doctest: +SKIP
    """
    loaded = _load_model(Path(path), options)
    module, notes = loaded.module, list(loaded.source.notes)
    if options.attn_implementation is not None:
        from fvis.attention import set_implementation

        notes.append(set_implementation(module, options.attn_implementation))
    if options.big is not None and getattr(module, "hf_device_map", None) is None:
        from fvis.big import dispatch

        module, note = dispatch(module, options.big)  # a folder was loaded into its map
        notes.append(note)
    if notes == list(loaded.source.notes):
        return loaded
    return LoadedModel(module, dataclasses.replace(loaded.source, notes=tuple(notes)))


def _load_model(path: Path, options: LoadOptions) -> LoadedModel:
    check_allow_modules(options.allow_modules)
    folder = _hf_folder(path)
    if folder is not None:
        return _load_folder(folder, options)
    sniffed = sniff(path, options.limits)
    digest = sha256_of(path)
    check_trust_binding(path, digest, options.trust)
    loaders = {
        FileKind.TORCH_ZIP: load_pickle_checkpoint,
        FileKind.LEGACY_PICKLE: load_pickle_checkpoint,
        FileKind.SAFETENSORS: _load_safetensors,
        FileKind.TORCHSCRIPT: _load_torchscript,
        FileKind.EXPORT_PROGRAM: load_export,
    }
    module, notes = loaders[sniffed.kind](sniffed, options)
    module.eval()  # as a pickled module comes back; BatchNorm must not use batch statistics
    examples = export_example_inputs(sniffed) if sniffed.kind is FileKind.EXPORT_PROGRAM else ()
    source = ModelSource(path, sniffed.kind.value, digest, tuple(notes), examples)
    return LoadedModel(module, source)


def _load_safetensors(sniffed: Sniffed, options: LoadOptions) -> tuple[nn.Module, list[str]]:
    if not options.arch:
        raise UsageError(
            f"{sniffed.path} is a safetensors file: weights without an architecture",
            hint="give the model class: --arch pkg.module:ClassName",
        )
    from safetensors.torch import load_file

    read_safetensors_header(sniffed.path)  # validated, with the library's reason on failure
    return with_arch(sniffed, options, load_file(str(sniffed.path)), [])


def _load_torchscript(sniffed: Sniffed, options: LoadOptions) -> tuple[nn.Module, list[str]]:
    if not options.arch:
        from fvis.errors import torchscript_refused  # one message with fvis.capture's refusal

        raise torchscript_refused(f"{sniffed.path} (a TorchScript archive)")
    peek = read_inert(sniffed)  # the tensors are read as data, but a payload is still news
    screen(sniffed.path, peek.globals_seen, options.trust is not None, sniffed.kind.value)
    state = read_tensors_as_data(sniffed)
    return with_arch(sniffed, options, state, ["loaded TorchScript weights into --arch"])
