"""Pickled checkpoints (``torch.save`` zip and legacy files): read them inertly, screen what
they name, and load them with ``weights_only=True`` unless the user trusts the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from fvis import inert
from fvis.arch import note_config_classes, with_arch
from fvis.errors import BadFileError, RefusedError, UsageError
from fvis.formats import FileKind, Sniffed
from fvis.state_dicts import Nested, find_state_dict, flatten_tree_metas, real_state_dict
from fvis.text import preview as _preview
from fvis.trust import (
    TrustWarning,
    allowed_classes,
    check_trust_binding,
    screen,
    torch_reason,
    untrusted_globals,
    ways_forward,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fvis.loading import LoadOptions, Trust


def read_inert(sniffed: Sniffed) -> inert.InertLoad:
    """The pickle of a legacy or zip checkpoint, read with stand-ins: nothing runs."""
    if sniffed.kind is FileKind.LEGACY_PICKLE:
        return inert.read_legacy_pickle(sniffed.path)
    return inert.read_zip_pickle(sniffed.path, sniffed.prefix)


def metas_from_inert(sniffed: Sniffed, obj: Any) -> Nested:
    if inert.is_module_stub(obj):  # a pickled module used as weights for --arch
        return Nested(flatten_tree_metas(inert.tree_from_stub(obj, source=sniffed.path)), ())
    if isinstance(obj, inert.FakeTensor):
        raise BadFileError(
            f"{sniffed.path} holds a single tensor {list(obj.shape)}, not a model or state dict",
            hint="is it an input? pass it with --input",
        )
    if not isinstance(obj, dict):
        what = getattr(obj, "qualname", type(obj).__name__)
        raise BadFileError(f"{sniffed.path} holds a {what}, not a model or state dict")
    found = find_state_dict(obj)
    if found is None:
        raise BadFileError(
            f"{sniffed.path} holds a dict without tensors (keys: {_preview(list(obj))})",
            hint="fvis needs a state dict, a training checkpoint or a pickled module",
        )
    return found


def load_pickle_checkpoint(sniffed: Sniffed, options: LoadOptions) -> tuple[nn.Module, list[str]]:
    import torch

    peek = read_inert(sniffed)
    screen(sniffed.path, peek.globals_seen, options.trust is not None, sniffed.kind.value)
    is_module = inert.is_module_stub(peek.obj)
    if is_module:  # a cycle or a very deep tree is refused before torch recurses into it
        inert.tree_from_stub(peek.obj, source=sniffed.path)
    extra: list[Any] = []
    if options.trust is None and not is_module:  # refused before anything else is read
        extra = allowed_classes(sniffed.path, peek.globals_seen, options.allow_modules)
        note_config_classes(options, extra)
    if is_module and options.arch and sniffed.kind is FileKind.TORCH_ZIP:
        tensors = read_tensors_as_data(sniffed)
        return with_arch(sniffed, options, tensors, ["read the pickled module's weights as data"])
    if is_module:
        model = _load_pickled_module(sniffed, peek, options)
        if not options.arch:
            return model, []
        return with_arch(sniffed, options, model.state_dict(), [])
    obj = _torch_load(sniffed, options, peek, extra)
    if isinstance(obj, torch.nn.Module):
        found = Nested(obj.state_dict(), ())
    elif isinstance(obj, dict):
        found = real_state_dict(sniffed.path, obj)
    else:
        raise BadFileError(f"{sniffed.path} holds a {type(obj).__name__}, not a state dict")
    if not options.arch:
        raise UsageError(
            f"{sniffed.path} holds a state dict, which has weights but no architecture",
            hint="give the model class: --arch pkg.module:ClassName (or path/file.py:build)",
        )
    return with_arch(sniffed, options, found.state, found.notes)


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
            trusted = trusted_bytes(sniffed.path, options.trust)
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
    note_config_classes(options, classes)
    model = _torch_load(sniffed, options, peek, classes)
    if not isinstance(model, torch.nn.Module):
        raise BadFileError(f"{sniffed.path} did not load as a module")
    return model


def trusted_bytes(path: Path, trust: Trust) -> io.BytesIO:
    """The file's bytes, read once: the hash is checked on exactly what gets unpickled, so a
    file swapped after the first check cannot slip through."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    check_trust_binding(path, digest, trust)
    _warn_trusted(path, digest)
    return io.BytesIO(data)


def _warn_trusted(path: Path, digest: str) -> None:
    warnings.warn(
        f"running code from {path} because of --trust (sha256:{digest})", TrustWarning, stacklevel=3
    )


def read_tensors_as_data(sniffed: Sniffed) -> dict[str, torch.Tensor]:
    """The tensors of a pickled module or TorchScript archive; no code from it runs."""
    from fvis.weights import read_tensors

    return read_tensors(sniffed.path, sniffed.prefix)


@contextlib.contextmanager
def weights_only_unless(trusted: bool) -> Iterator[None]:
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
