"""The hook session's fast path: ``_Session``'s base class and its C hooks (fvis/_trace.c).

``Base`` is ``fvis._moments.Tracer`` where the extension was built and configured: a C type
whose members hold the session's state, with ``fast_pre`` / ``fast_post`` hooks that do the
usual module call (one tensor in, one plain tensor out, nothing cut, on the host) in C and
hand every other call to the session's Python ``_pre`` / ``_post``. Elsewhere ``Base`` is
``object`` and the Python hooks do everything; ``FVIS_NATIVE=0`` also keeps them (tests
compare the two). Nothing the capture records differs between the paths.

The C hooks are not installed as global module hooks where that can be avoided: any global
hook sends every module call through the slow path of ``Module._call_impl`` (1.5-2 us a
call). ``wrapped_forwards`` puts the hooks around each module's ``forward`` instead (an
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
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from fvis import stats
from fvis.records import CallRecord, Capture, GradFacts, _Frame, _Held, _Live
from fvis.stats import Stats, tensor_stats
from fvis.tensor_facts import _dtype, _grad_fn_name, gradient_edge, sample_values

# The order fvis/_trace.c reads _Live's slot offsets in (its LIVE_* enum).
LIVE_SLOTS = (
    "call",
    "call_id",
    "facts",
    "key",
    "last_grad_fn",
    "last_version",
    "layer",
    "path",
    "ref",
    "saved",
    "seq",
    "stats",
    "tensor_info",
    "token_grid",
    "values",
)


def _load() -> Any:
    try:
        native = importlib.import_module("fvis._moments")
    except ImportError:  # built without a C compiler
        return None
    return native if hasattr(native, "Tracer") else None  # an older in-place build


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
        _offsets(native, _Held, ("tensor",)),
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
        (torch.Tensor, torch.nn.Parameter, CallRecord, frame, _Live, _Held, *records),
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
    native.set_call_sites(_call_sites())
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
    hooks = torch.nn.modules.module
    if not USE_WRAP or hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return False
    plain, impl = nn.Module.__call__, nn.Module._call_impl
    return all(
        type(module).__call__ is plain
        and type(module)._call_impl is impl
        and not module._forward_pre_hooks
        and not isinstance(module, torch.jit.ScriptModule)
        for module in modules
    )


@contextmanager
def wrapped_forwards(session: Any, modules: Collection[nn.Module]) -> Iterator[None]:
    """Each module's ``forward`` wrapped by the session's C hooks inside; every module's own
    ``__dict__`` exactly as it was after (an instance ``forward``, as accelerate sets, is
    wrapped and put back)."""
    saved: list[tuple[dict[str, Any], Any]] = []
    try:
        for module in modules:
            own = module.__dict__
            previous = own.get("forward", _ABSENT)
            forward = module.forward if previous is _ABSENT else previous
            own["forward"] = session.wrap(module, forward)
            saved.append((own, previous))
        yield
    finally:
        for own, previous in reversed(saved):
            if previous is _ABSENT:
                own.pop("forward", None)
            else:
                own["forward"] = previous


_ABSENT = object()


def native_session(session: Any) -> bool:
    """Whether ``session`` runs on the C path (then its bookkeeping helpers do too)."""
    return _native is not None and isinstance(session, _native.Tracer) and enabled()


def enabled() -> bool:
    return _native is not None and os.environ.get("FVIS_NATIVE", "1") != "0" and USE_NATIVE


USE_NATIVE = True  # tests switch the C hooks off to compare them with the Python ones
USE_WRAP = True  # and the wrapped forwards off, to compare them with the global hooks
