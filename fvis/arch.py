"""Architectures: build ``--arch pkg.module:callable`` (or ``path/file.py:callable``), on the
meta device to list, for real to run, and load a state dict into it.

Importing the user's module runs its code: that is the user's decision (``--arch``) or the
checkout's (``[tool.fvis] arch``, announced on stderr), never the checkpoint's.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fvis.errors import ModelInputError, UsageError, first_line
from fvis.formats import Sniffed
from fvis.state_dicts import check_state_dict, fill_tied, metas_of_module, unwrap_state_dict
from fvis.text import preview as _preview
from fvis.trust import TrustWarning, import_user

if TYPE_CHECKING:
    from torch import nn

    from fvis.loading import LoadOptions


def build_arch(spec: str, kwargs: Mapping[str, Any], device: str = "cpu") -> nn.Module:
    """Call ``module:callable`` or ``path/file.py:callable`` with ``kwargs`` on ``device``.

    >>> build_arch("sample_models.zoo:build_nested_cnn", {})   # doctest: +SKIP
    """
    import torch

    factory = import_callable(spec)
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


def build_for_run(options: LoadOptions, device: str = "cpu") -> nn.Module:
    assert options.arch  # callers check
    if options.arch_config is not None:
        _warn_config_code(f"importing {options.arch}", "arch", options.arch_config)
    return build_arch(options.arch, options.arch_kwargs, device=device)


def note_config_classes(options: LoadOptions, classes: list[Any]) -> None:
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


def build_for_listing(options: LoadOptions) -> tuple[nn.Module, list[str]]:
    """The architecture on the meta device (no memory, no data); a builder that cannot run
    there (it copies weights in, as ``from_pretrained`` or torchvision's RegNet do) is built
    for real instead, and the note says so."""
    assert options.arch  # callers check
    try:
        return build_for_run(options, device="meta"), []
    except ModelInputError as exc:
        model = build_arch(options.arch, options.arch_kwargs)
        return model, [f"built on the CPU: the builder fails on the meta device ({exc.message})"]


def import_callable(spec: str) -> Callable[..., Any]:
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


def with_arch(
    sniffed: Sniffed, options: LoadOptions, state: Mapping[str, Any], notes: list[str]
) -> tuple[nn.Module, list[str]]:
    assert options.arch  # callers check
    model = build_for_run(options)
    expected = metas_of_module(model)
    state, more = unwrap_state_dict(state, expected)
    state, tied = fill_tied(expected, state)
    warned = check_state_dict(sniffed.path, expected, state, options.strict)
    try:
        model.load_state_dict(state, strict=options.strict, assign=False)
    except RuntimeError as exc:
        raise ModelInputError(f"{sniffed.path}: {str(exc).splitlines()[0]}") from None
    return model, [*notes, *more, *tied, *warned]
