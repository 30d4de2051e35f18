"""The hook session's fast path: ``_Session``'s base class and its C hooks (fvis/_trace.c,
fvis/_wrap.c).

``Base`` is ``fvis._moments.Tracer`` where the extension was built and configured: a C type
whose members hold the session's state, with ``fast_pre`` / ``fast_post`` hooks that do the
usual module call (one tensor in, one plain tensor out, nothing cut, on the host) in C and
hand every other call to the session's Python ``_pre`` / ``_post``. Elsewhere ``Base`` is
``object`` and the Python hooks do everything; ``FVIS_NATIVE=0`` also keeps them (tests
compare the two). Nothing the capture records differs between the paths.

The C hooks are not installed as global module hooks where that can be avoided: any global
hook sends every module call through the slow path of ``Module._call_impl`` (1.5-2 us a
call). ``wrap_forwards`` puts the hooks around each module's ``forward`` instead (an
instance attribute, removed at the end), where they see what the global hooks would see:
the call's arguments before its forward runs and its output before its own forward hooks.
That holds unless a module has forward pre-hooks of its own (the global pre-hook runs before
them), overrides ``__call__`` (``torch.fx.GraphModule``) or is scripted, or another global
forward hook is already installed (global hooks run in the order they were registered, so
one registered before fvis's changes the output before fvis sees it: ``fvis.dumping``'s
``--input-requires-grad`` hook on an embedding does): then the capture keeps the global
hooks (``wrappable``).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import types
from collections.abc import Callable, Collection, Iterable, Sequence
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from fvis import stats
from fvis.records import CallRecord, Capture, GradFacts, _Frame, _Live
from fvis.stats import Stats, tensor_stats
from fvis.tensor_facts import _dtype, _grad_fn_name, gradient_edge, sample_values

# The order fvis/_trace.c reads _Live's slot offsets in (its LIVE_* enum).
LIVE_SLOTS = (
    "call",
    "call_id",
    "device",
    "dtype",
    "facts",
    "key",
    "last_grad_fn",
    "last_version",
    "layer",
    "path",
    "ref",
    "saved",
    "seq",
    "shape",
    "stats",
    "token_grid",
    "values",
)


def _load() -> Any:
    try:
        native = importlib.import_module("fvis._moments")
    except ImportError:  # built without a C compiler
        return None
    needed = ("Tracer", "configure_wrap", "wrap_forwards", "walk_modules", "untrack", "targets_of")
    return native if all(hasattr(native, n) for n in needed) else None  # an older build


def _offsets(native: Any, cls: type, names: tuple[str, ...]) -> tuple[int, ...] | None:
    """Slot offsets of ``names``, or None unless they are exactly the class's own slots."""
    if set(getattr(cls, "__slots__", ())) != set(names):
        return None
    return native.slot_offsets(tuple(vars(cls)[n] for n in names))


def _fields(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]


def _configure(native: Any, frame: type) -> bool:
    records = (Stats, Capture, GradFacts)  # frozen dataclasses, built slot by slot
    layouts = (
        _offsets(native, _Live, LIVE_SLOTS),
        *(_offsets(native, cls, _fields(cls)) for cls in records),
    )
    plain = all(
        f.init
        for cls in records
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
    ) and not any(hasattr(cls, "__post_init__") for cls in records)
    if any(layout is None for layout in layouts) or not plain:
        return False
    native.configure_trace(
        (torch.Tensor, torch.nn.Parameter, CallRecord, frame, _Live, *records),
        layouts,
        (
            torch.is_grad_enabled,
            torch.is_inference_mode_enabled,
            torch.float32,
            sample_values,
            gradient_edge,
            _dtype,
            tensor_stats,
            stats,
            _grad_fn_name,
        ),
    )
    native.configure_wrap(
        _call_sites(), nn.Module.__call__, nn.Module._call_impl, torch.jit.ScriptModule
    )
    return True


def _call_sites() -> tuple[Any, ...]:
    """The code of ``Module._call_impl``, of the function nested in it, and of
    ``Module._slow_forward``: the frames ``module(...)`` calls ``forward`` from."""
    call_impl = nn.Module._call_impl.__code__
    nested = tuple(c for c in call_impl.co_consts if isinstance(c, types.CodeType))
    return (call_impl, *nested, nn.Module._slow_forward.__code__)


_native = _load()
if _native is not None and not _configure(_native, _Frame):  # a layout it cannot build
    _native = None
Base: type = _native.Tracer if _native is not None else object


def hooks(session: Any) -> tuple[Callable[..., None], Callable[..., None]]:
    """The pre-hook and forward hook to install for ``session``: the C ones where usable."""
    if native_session(session):
        return session.fast_pre, session.fast_post
    return session._pre, session._post


def wrappable(modules: Collection[nn.Module]) -> bool:
    """Whether wrapping each forward sees what global hooks would (see the module doc)."""
    return _no_other_global_hook() and _native.forwards_wrappable(tuple(modules))


def _no_other_global_hook() -> bool:
    hooks = torch.nn.modules.module
    return (  # global backward hooks replace every module's arguments before its forward
        _native is not None
        and USE_WRAP
        and not hooks._global_forward_hooks
        and not hooks._global_forward_pre_hooks
        and not hooks._global_backward_hooks
        and not hooks._global_backward_pre_hooks
    )


def wrap_forwards(session: Any, modules: Collection[nn.Module], stack: ExitStack) -> bool:
    """Each module's ``forward`` wrapped by the session's C hooks (fvis/_wrap.c) until
    ``stack`` closes, every module's own ``__dict__`` exactly as it was after (an instance
    ``forward``, as accelerate sets, is wrapped and put back); False, with nothing done,
    where that would not see what the global hooks see (``wrappable``)."""
    if not _no_other_global_hook():
        return False
    saved = _native.wrap_forwards(session, tuple(modules))
    if saved is None:
        return False
    stack.callback(_native.unwrap_forwards, saved)
    return True


def untrack(containers: Iterable[Any]) -> None:
    """Takes a capture's own per-module tuples, lists and dicts out of the cycle collector
    (see fvis/_wrap.c: alive for the whole capture, they would trigger full collections).
    Only for containers nothing can make part of a garbage cycle; a no-op without the C
    extension."""
    if _native is not None:
        _native.untrack(containers)


def walk(model: nn.Module) -> tuple[Any, ...] | None:
    """``fvis.capture._walk``'s dicts built in C (fvis/_walk.c), or None where Python walks:
    without the extension, with ``FVIS_NATIVE=0``, or where a ``_modules`` is not exactly a
    dict or a child's name not exactly a str."""
    return _native.walk_modules(model) if enabled() else None


def targets_of(
    by_name: dict[str, nn.Module], layers: Sequence[str]
) -> tuple[dict[int, tuple[str, nn.Module]] | None, str | None] | None:
    """``fvis.capture._targets`` in C: (targets, None), (None, the first unknown layer), or
    None where Python does it (without the extension, or ``FVIS_NATIVE=0``)."""
    return _native.targets_of(by_name, list(layers)) if enabled() else None


def training_flags(modules: tuple[nn.Module, ...]) -> bytes | None:
    """Each module's ``training`` flag as one byte, in C; None where Python reads them."""
    return _native.training_flags(modules) if enabled() else None


def restore_training(modules: tuple[nn.Module, ...], flags: bytes) -> bool:
    """Puts back every ``training`` flag that changed, in C; False where Python must."""
    if not enabled():
        return False
    _native.restore_training(modules, flags)
    return True


def native_session(session: Any) -> bool:
    """Whether ``session`` runs on the C path (then its bookkeeping helpers do too)."""
    return _native is not None and isinstance(session, _native.Tracer) and enabled()


def enabled() -> bool:
    return USE_NATIVE and _native is not None


# FVIS_NATIVE=0 keeps the Python hooks (read once, as fvis.stats does: a capture asked the
# environment five times); tests switch the C hooks off to compare them with the Python ones
USE_NATIVE = os.environ.get("FVIS_NATIVE", "1") != "0"
USE_WRAP = True  # and the wrapped forwards off, to compare them with the global hooks
