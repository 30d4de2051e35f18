"""Op capture (``--ops``, ``capture(..., ops=True)``): the tensor ops inside ``forward``.

Module hooks see module calls only; residual adds, ``softmax``, ``scaled_dot_product_attention``
or ``chunk`` written inside a ``forward`` are invisible to them. ``OpWatch`` sees each of them
during the same single forward pass and names it by the innermost module call it ran in, the
op, and its 1-based index among that call's ops of that name::

    transformer.h.1.attn:softmax#1      layer1.0:add#1      inner:chunk#1

Ops of a module's later calls carry the call number: ``act#2:mul#1``. Names depend only on the
model's code and the input shapes, so they are stable across runs.

Why ``TorchFunctionMode`` and not ``TorchDispatchMode``: a function mode sees the calls the
user's code makes, with their Python names (``F.softmax``, ``Tensor.__add__``,
``F.scaled_dot_product_attention``, ``Tensor.chunk``), once each, before any decomposition;
the outputs it sees are the user's tensors, autograd graph included. A dispatch mode sees the
ATen ops below autograd (``aten._softmax``, ``aten._scaled_dot_product_flash_attention_for_cpu``
or a dozen decomposed ops, ``aten.split.Tensor``), on tensors stripped of their graph: names
that change between backends and torch versions, no grad verdicts, and several times more
calls to pay for.

What is recorded and what is captured:

- every op that returns tensors is listed (``OpRecord``); ops returning anything else
  (``size()``, ``.shape``, ``dim()``, ``numel()``, ``__setitem__``) are not;
- each op has a kind: ``in-place`` (a name ending in ``_``, ``x += y`` as ``add_``, or
  ``inplace=True``), ``view`` (the ops in ``VIEW_OPS``, or an output that is its input, like
  dropout in eval) or ``compute``;
- captured (statistics, pictures, verdicts, like a module output) are the compute ops that a
  pattern matches, and a view or in-place op only when a pattern spells its op out:
  ``inner:view#1``, ``*:add_*`` (``inner:*`` and ``*:add*`` take compute ops only);
- when no pattern names ops, every compute op is captured except those inside a leaf module
  that is captured itself (``fc:linear#1`` is ``fc``'s output again): ``fvis dump --ops``
  adds the functional code between modules to the leaves.

The mode never changes what the model computes, with one exception it avoids: PyTorch's
``nn.MultiheadAttention`` and ``nn.TransformerEncoder(Layer)`` take a fused kernel only when
no torch function mode is active, so inside those calls, when that kernel may run (grad not
needed), the mode steps aside and their inner ops are not listed.

When ``ops`` is off no mode is installed and nothing here runs. When on, each op costs a
name lookup, a counter and one small record; a captured op also costs the session's
``_snapshot`` (statistics from ``fvis.stats`` on the spot; in ``--mode inference`` the tensor
itself is not kept).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode, _pop_mode, _push_mode
from torch.overrides import _get_current_function_mode as _current_mode

from fvis.errors import UsageError
from fvis.records import CallRecord, OpRecord

if TYPE_CHECKING:
    from fvis.session import _Session

COMPUTE, VIEW, IN_PLACE = "compute", "view", "in-place"

# Ops that return (a view of) their input's memory or a reshaped alias of it: listed, not
# captured unless named. reshape/flatten/contiguous/getitem may copy; they still only move
# values around, so they count as views here.
VIEW_OPS = frozenset(
    {
        "view", "view_as", "reshape", "reshape_as", "permute", "transpose", "t", "T", "mT",
        "H", "mH", "getitem", "squeeze", "unsqueeze", "flatten", "unflatten", "expand",
        "expand_as", "chunk", "split", "split_with_sizes", "tensor_split", "unbind", "narrow",
        "select", "contiguous", "detach", "data", "movedim", "moveaxis", "swapaxes",
        "swapdims", "as_strided", "real", "imag", "diagonal", "unfold", "view_as_real",
        "view_as_complex", "alias", "hsplit", "vsplit", "dsplit",
    }
)  # fmt: skip

# Modules whose forward takes a fused kernel unless a torch function mode is active.
_FAST_PATH = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder)

_DUNDER = {
    "truediv": "div",
    "floordiv": "floor_divide",
    "mod": "remainder",
    "and": "bitwise_and",
    "or": "bitwise_or",
    "xor": "bitwise_xor",
    "invert": "bitwise_not",
    "lshift": "bitwise_left_shift",
    "rshift": "bitwise_right_shift",
}
_BINARY = frozenset(
    {"add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor"}
    | {"lshift", "rshift"}
)


def op_name(func: Any) -> tuple[str, bool]:
    """The user-facing name of ``func`` and whether it works in place.

    >>> op_name(torch.Tensor.__add__), op_name(torch.Tensor.__iadd__), op_name(torch.softmax)
    (('add', False), ('add_', True), ('softmax', False))
    """
    name = getattr(func, "__name__", None) or type(func).__name__
    if name in ("__get__", "__set__"):  # a Tensor property: .data, .T, .grad
        return getattr(getattr(func, "__self__", None), "__name__", name), False
    if name.startswith("__") and name.endswith("__"):
        core = name[2:-2]
        if core.startswith("r") and core[1:] in _BINARY:  # reflected: 1 + x is still an add
            return ("rsub" if core == "rsub" else _DUNDER.get(core[1:], core[1:])), False
        if core.startswith("i") and core[1:] in _BINARY:  # x += y runs add_
            return _DUNDER.get(core[1:], core[1:]) + "_", True
        return _DUNDER.get(core, core), False
    return name, name.endswith("_")


def is_op_pattern(pattern: str) -> bool:
    """Whether a ``--layer`` pattern names ops (``inner:*``) rather than modules."""
    return ":" in pattern


def take_op_pattern(pattern: str, ops: bool) -> bool:
    """Whether ``pattern`` is an op pattern to match during forward; one without ``--ops``
    is refused (it could only ever match nothing)."""
    if not is_op_pattern(pattern):
        return False
    if not ops:
        raise UsageError(
            f"--layer {pattern!r} names tensor ops (module:op#index): add --ops",
            hint="'fvis layers MODEL --input ... --ops' lists the op names",
        )
    return True


def ops_outcome(
    layers: Sequence[str], records: Sequence[OpRecord], missing_ok: bool, notes: list[str]
) -> list[str]:
    """The op patterns among ``layers`` that matched no op (raised as a usage error unless
    ``missing_ok``); a note for each that matched only views or in-place ops."""
    missing, uncaptured = unmatched(split_patterns(layers)[1], records)
    for pattern in uncaptured:
        notes.append(
            f"--layer {pattern!r} matched only views or in-place ops: listed, not captured "
            "(spell the op out to capture one, e.g. 'inner:view#1')"
        )
    if missing and not missing_ok:
        raise UsageError(f"no op matched {missing[0]!r}", hint=_unmatched_hint(missing[0], records))
    return missing


def _unmatched_hint(pattern: str, records: Sequence[OpRecord]) -> str:
    """Name the ops that ran inside the pattern's module's children: an op is named by the
    innermost module it ran in, so ``inner:*`` holds only ``inner``'s own functional ops."""
    module = pattern.split(":", 1)[0]
    inside = [
        r.name for r in records if fnmatch.fnmatchcase(r.name.split(":", 1)[0], module + ".*")
    ]
    if inside:
        shown = ", ".join(inside[:3]) + (", ..." if len(inside) > 3 else "")
        return (
            f"{module}'s forward runs no tensor op of its own; its children's ops are named by "
            f"them ({shown}): try '{module}.*:*'"
        )
    return "'fvis layers MODEL --input ... --ops' lists the op names"


def split_patterns(layers: Iterable[str]) -> tuple[list[str], list[str]]:
    """``layers`` as (module names, op patterns)."""
    modules, ops = [], []
    for layer in layers:
        (ops if is_op_pattern(layer) else modules).append(layer)
    return modules, ops


def _spells(pattern: str, op: str) -> bool:
    """Whether the op part of ``pattern`` spells ``op`` out (``view#1``, ``add_*``)."""
    part = pattern.rpartition(":")[2]
    return part.startswith(op) and part[len(op) : len(op) + 1] in ("", "#", "*", "?", "[")


class OpWatch(TorchFunctionMode):
    """Sees every tensor op during forward; records it, and captures the chosen ones through
    the session's ``_snapshot`` (a synthetic ``CallRecord`` inside the module call)."""

    def __init__(self, session: _Session, patterns: Sequence[str] = (), every: bool = True) -> None:
        super().__init__()
        self.session = session
        self.every = every  # with no pattern: capture every compute op (else list them only)
        # ...but not inside a captured leaf module: its output already is that op's output
        self.covered = {k for k, (_, m) in session.targets.items() if not m._modules}
        self.patterns = tuple(patterns)
        self.regex = (
            re.compile("|".join(fnmatch.translate(p) for p in self.patterns))
            if self.patterns
            else None
        )
        self.names: dict[Any, tuple[str, bool]] = {}
        self.counts: dict[tuple[int, str], int] = {}
        self.records: list[OpRecord] = []
        self.calls: dict[int, CallRecord] = {}
        self.params_ran = False  # a module holding parameters finished before this op
        self.seen = 0  # how much of the trace params_ran has looked at
        self.suspended: list[Any] = []  # fast-path modules running with this mode popped
        self.handles: list[Any] = []

    def __enter__(self) -> OpWatch:
        super().__enter__()
        hooks = torch.nn.modules.module
        self.handles = [
            hooks.register_module_forward_pre_hook(self._suspend),
            hooks.register_module_forward_hook(self._resume, always_call=True),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        while self.suspended:  # a forward that raised past its module's hooks
            self.suspended.pop()
            _push_mode(self)
        super().__exit__(*exc)

    def _suspend(self, module: nn.Module, args: Any) -> None:
        """PyTorch's fused fast path of nn.MultiheadAttention and nn.TransformerEncoder(Layer)
        is refused whenever a torch function mode is active: it would compute other (equal
        within 1e-6, not identical) values. Inside such a call, when that path may be taken,
        this mode steps aside; its ops are then not listed (the module's output still is)."""
        if not isinstance(module, _FAST_PATH) or _current_mode() is not self:
            return
        if torch.is_grad_enabled() and (
            any(p.requires_grad for p in module.parameters()) or _inputs_need_grad(args)
        ):
            return  # the fast path is not taken with grad needed
        _pop_mode()
        self.suspended.append(module)

    def _resume(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.suspended and self.suspended[-1] is module:
            self.suspended.pop()
            _push_mode(self)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **kwargs) if kwargs else func(*args)
        session = self.session
        if session.in_hook or session.replaying or not session.stack:
            return out  # fvis's own work in a hook, a re-run, or outside the model
        if isinstance(out, torch.Tensor):
            self._record(func, args, kwargs, out, None)
        elif (
            isinstance(out, (tuple, list)) and out and all(isinstance(t, torch.Tensor) for t in out)
        ):
            self._record(func, args, kwargs, out, out)
        return out

    def _record(self, func: Any, args: Any, kwargs: Any, out: Any, parts: Any) -> None:
        known = self.names.get(func)
        if known is None:
            known = self.names[func] = op_name(func)
        op, in_place = known
        if kwargs and kwargs.get("inplace") is True:  # F.relu(x, inplace=True)
            op, in_place = op + "_", True
        session = self.session
        frame = session.stack[-1]
        key = (frame.call_id, op)
        index = self.counts[key] = self.counts.get(key, 0) + 1
        call = session.calls.get(frame.module_id, 0) + 1  # what _record gives it on return
        name = f"{frame.name}:{op}#{index}"
        if in_place:
            kind = IN_PLACE
            session.in_place_ops = True  # a tensor saved for backward may have changed
        elif op in VIEW_OPS or (args and out is args[0]):
            kind = VIEW
        else:
            kind = COMPUTE
        captured = self._wanted(name, frame, call, op, kind)
        tensors = (out,) if parts is None else parts
        shapes = tuple(tuple(t.shape) for t in tensors)
        self.records.append(OpRecord(name, op, kind, frame.name, call, shapes, captured))
        if captured:
            self._capture(frame, call, op, index, args, tensors, parts is not None)

    def _wanted(self, name: str, frame: Any, call: int, op: str, kind: str) -> bool:
        regex = self.regex
        if regex is None:
            return self.every and kind == COMPUTE and frame.module_id not in self.covered
        alias = f"{frame.name}#{call}:{name.partition(':')[2]}"
        if not (regex.match(name) or regex.match(alias)):
            return False
        if kind == COMPUTE:
            return True
        return any(
            _spells(p, op) and (fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(alias, p))
            for p in self.patterns
        )

    def _capture(
        self, frame: Any, call: int, op: str, index: int, args: Any, tensors: Any, many: bool
    ) -> None:
        session = self.session
        floats = [t for t in tensors if t.is_floating_point() or t.is_complex()]
        grad = torch.is_grad_enabled()
        record = CallRecord(
            frame.name,
            op,
            call,
            grad,
            torch.is_inference_mode_enabled(),
            grad and _inputs_need_grad(args),
            False,
            any(t.requires_grad for t in floats),
            bool(floats),
            tuple(tuple(t.shape) for t in tensors),
            session.next_call_id,
            frame.call_id,
            constant=not any(isinstance(a, torch.Tensor) for a in args),  # zeros, arange
            has_params=self._params_ran(),
            op=True,
        )
        session.next_call_id += 1
        self.calls[record.call_id] = record
        path = f":{op}#{index}"
        session.in_hook = True  # the snapshot's own ops are not the model's
        try:
            for i, tensor in enumerate(tensors):
                part = f"{path}[{i}]" if many else path
                session._snapshot(frame.module_id, frame.name, record, part, tensor)
        finally:
            session.in_hook = False

    def _params_ran(self) -> bool:
        if not self.params_ran:
            trace = self.session.trace
            self.params_ran = any(r.has_params for r in trace[self.seen :])
            self.seen = len(trace)
        return self.params_ran


def _inputs_need_grad(args: Any) -> bool:
    """Whether a tensor argument (or one in a list argument: ``torch.cat``) requires grad;
    a flat loop, not ``flatten_tensors``: this runs for every captured op."""
    for arg in args:
        if isinstance(arg, torch.Tensor):
            if arg.requires_grad:
                return True
        elif type(arg) in (list, tuple) and any(
            isinstance(t, torch.Tensor) and t.requires_grad for t in arg
        ):
            return True
    return False


def unmatched(patterns: Sequence[str], records: Sequence[OpRecord]) -> tuple[list[str], list[str]]:
    """Op patterns that matched no op, and those that matched only ops not captured (views
    and in-place ops the pattern does not spell out)."""
    missing, uncaptured = [], []
    for pattern in patterns:
        hits = [
            r
            for r in records
            if fnmatch.fnmatchcase(r.name, pattern)
            or fnmatch.fnmatchcase(f"{r.module}#{r.call}:{r.name.partition(':')[2]}", pattern)
        ]
        if not hits:
            missing.append(pattern)
        elif not any(r.captured for r in hits):
            uncaptured.append(pattern)
    return missing, uncaptured
