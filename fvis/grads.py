"""The grad-tracking diagnosis: is each captured activation on the autograd graph that produced
the model's output, and if not, where was the graph cut and why. Pure functions over a
``CaptureResult``.

Connectivity is decided by gradient edge, not by ``grad_fn``: outputs of ``chunk``/``split``
share one node and differ by ``output_nr``. The graph is walked once from every tensor in the
model's output (tuples and dicts included).

Why an activation is cut comes from the trace of every module call (``CallRecord``):

- grad mode was off at capture -> the nearest enclosing call that ran with grad on is the
  ``forward`` holding the ``no_grad`` block (or ``--mode no-grad``);
- inference mode -> likewise, or ``--mode inference``;
- grad on, output does not require grad -> the innermost module whose inputs or parameters
  required grad and whose floating outputs did not holds the ``.detach()`` / ``.data`` /
  local ``no_grad`` (the three look the same from outside);
- nothing upstream required grad -> frozen parameters and an input without grad;
- requires grad but unreachable -> cut downstream by an enclosing module, or unused (dead
  branch, unused chunk).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from fvis.blame import block_site, site_inside, with_site
from fvis.capture import (
    CallRecord,
    Capture,
    CaptureResult,
    Mode,
    flatten_tensors,
    gradient_edge,
)
from fvis.errors import first_line
from fvis.notcalled import not_called_verdicts
from fvis.origins import origin_of
from fvis.records import Detach
from fvis.sources import CutSite


class Cause(StrEnum):
    """Why a capture is (not) connected to the output."""

    CONNECTED = "connected"
    GRAD_OFF = "grad-off"
    INFERENCE = "inference"
    CUT_INSIDE = "cut-inside"  # a module between the parameters/input and this tensor
    CUT_DOWNSTREAM = "cut-downstream"  # this tensor requires grad, a later module cuts it off
    FROZEN = "nothing-requires-grad"
    UNUSED = "unused"
    NOT_DIFFERENTIABLE = "not-differentiable"  # integer or boolean tensor
    NEVER_RAN = "never-ran"
    CONSTANT = "constant"  # computed from shapes or positions, not from the input values
    CHECKPOINTED = "checkpointed"  # first forward of a reentrant checkpoint: no_grad by design
    INPUT_ONLY = "input-only"  # computed from the input alone (no parameters before it)
    BACKWARD_FAILS = "backward-fails"  # on the graph, but a saved tensor changed in place
    PARAMS_USED = "params-used"  # never called, its parameters used functionally by its parent
    NOT_CALLED = "not-called"  # never called, nothing says it should have been
    CONTAINER = "container"  # ModuleList / ModuleDict: no forward, never callable
    REMOVED_BY_EXPORT = "removed-by-export"


@dataclass(frozen=True)
class Verdict:
    """One line a person can act on, plus the facts behind it."""

    connected: bool
    cause: Cause
    where: str | None  # the module (dotted name) that holds the cut, when known
    summary: str
    hint: str
    in_place: str | None = None  # set when the tensor was modified in place after capture
    origin: str | None = None  # file:line of the forward of ``where``
    library: bool = False  # ``where`` is installed library code (a cut there is by design)
    cut_at: CutSite | None = None  # the source line that cut the graph, when it was seen

    def as_dict(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "cause": self.cause.value,
            "where": self.where,
            "summary": self.summary,
            "hint": self.hint,
            "in_place": self.in_place,
            "origin": self.origin,
            "library": self.library,
            "cut_at": self.cut_at.as_dict() if self.cut_at is not None else None,
        }


def reachable_edges(output: Any) -> set[tuple[int, int]]:
    """Every ``(id(node), output_nr)`` gradient edge reachable back from the model's output."""
    edges = (gradient_edge(t) for _, t in flatten_tensors(output) if t.requires_grad)
    return _walk([e for e in edges if e is not None])


def _walk(starts: Iterable[tuple[Any, int]]) -> set[tuple[int, int]]:
    seen: set[tuple[int, int]] = set()
    stack = list(starts)
    visited_nodes: set[int] = set()
    while stack:
        node, nr = stack.pop()
        seen.add((id(node), nr))
        if id(node) in visited_nodes:
            continue
        visited_nodes.add(id(node))
        stack.extend((nxt, n) for nxt, n in node.next_functions if nxt is not None)
    return seen


class _Calls:
    """The trace as a tree of calls: who ran inside whom, and which calls cut the graph."""

    def __init__(self, result: CaptureResult) -> None:
        self.result = result
        self.by_id = {r.call_id: r for r in result.trace}
        self.by_id.update(result.op_calls)  # captured ops (fvis.ops), inside their module call
        self.cuts = [r for r in result.trace if r.is_cut]
        self._reach: dict[int, set[tuple[int, int]]] = {}
        self._detach_reach: list[tuple[Detach, set[tuple[int, int]]]] | None = None

    def ancestors(self, call_id: int) -> list[CallRecord]:
        """Enclosing calls, innermost first."""
        out = []
        record = self.by_id.get(call_id)
        while record is not None and record.parent_id is not None:
            record = self.by_id.get(record.parent_id)
            if record is not None:
                out.append(record)
        return out

    def is_within(self, call_id: int, outer_id: int) -> bool:
        return call_id == outer_id or any(a.call_id == outer_id for a in self.ancestors(call_id))

    def detached_in(self, key: tuple[int, int]) -> Detach | None:
        """The detach (in some call's forward) of a value computed from the edge ``key``."""
        if self._detach_reach is None:
            self._detach_reach = [
                (d, _walk([d.edge])) for d in self.result.detaches if d.edge is not None
            ]
        return next((d for d, reach in self._detach_reach if key in reach), None)

    def reached_from_inputs(self, cut: CallRecord) -> set[tuple[int, int]]:
        """Edges upstream of what a cut module was given (so: what it cut off)."""
        if cut.call_id not in self._reach:
            self._reach[cut.call_id] = _walk(self.result.cut_inputs.get(cut.call_id, ()))
        return self._reach[cut.call_id]


def diagnose(result: CaptureResult) -> dict[str, Verdict]:
    """A verdict per capture label, and per never-ran layer name.

    >>> verdicts = diagnose(capture(model, [x], ["inner.relu"]))        # doctest: +SKIP
    >>> verdicts["inner.relu"].summary
    'connected to the output'
    """
    edges = reachable_edges(result.output) if result.mode is Mode.GRAD else set()
    calls = _Calls(result)
    verdicts = {}
    failure = _backward_failure(result, edges) if edges else None
    for capture in result.captures:
        edge = result.edges.get((capture.layer, capture.call, capture.path))
        connected = edge is not None and (id(edge[0]), edge[1]) in edges
        verdict = _verdict(capture, connected, edge, calls)
        if connected and failure is not None:
            verdict = Verdict(
                False,
                Cause.BACKWARD_FAILS,
                None,
                f"on the graph, but backward from the output fails: {failure}",
                "a tensor saved for backward was changed in place: use out-of-place ops "
                "(inplace=False) or clone it first",
            )
        verdicts[capture.label] = _with_origin(_with_in_place(with_site(verdict), capture), calls)
    verdicts.update(not_called_verdicts(result, Verdict, Cause))
    return verdicts


def _backward_failure(result: CaptureResult, edges: set[tuple[int, int]]) -> str | None:
    """Why backward from the output to the captures fails, tried for real (a saved tensor
    modified in place is only found by unpacking it); None when it works. Tried only when
    an in-place op ran during forward."""
    import torch

    if not result.in_place_ops or not result.edges:
        return None
    tensors = [t for _, t in flatten_tensors(result.output) if t.requires_grad]
    inputs = [
        torch.autograd.graph.GradientEdge(node, nr)
        for node, nr in result.edges.values()
        if (id(node), nr) in edges
    ]
    if not tensors or not inputs:
        return None
    scalar = sum(t.float().sum() for t in tensors)
    try:
        torch.autograd.grad(scalar, inputs, retain_graph=True, allow_unused=True)
    except RuntimeError as exc:
        text = first_line(exc, 200)
        # Reentrant checkpointing refuses autograd.grad by design: that says nothing here.
        return None if "checkpoint" in text.lower() else text
    return None


def _verdict(
    capture: Capture, connected: bool, edge: tuple[Any, int] | None, calls: _Calls
) -> Verdict:
    grad = capture.grad
    if connected:
        return Verdict(
            True,
            Cause.CONNECTED,
            None,
            "connected to the output",
            "gradients from the output reach this activation",
        )
    if not _is_float(capture.dtype):
        return Verdict(
            False,
            Cause.NOT_DIFFERENTIABLE,
            None,
            f"not differentiable: {capture.dtype} values carry no gradient",
            "only floating-point activations can be on the autograd graph",
        )
    if grad.inference_mode or grad.is_inference:
        return _inference_verdict(capture, calls)
    if not grad.grad_enabled:
        return _grad_off_verdict(capture, calls)
    if not grad.requires_grad:
        return _no_grad_verdict(capture, calls)
    return _unreachable_verdict(capture, edge, calls)


def _inference_verdict(capture: Capture, calls: _Calls) -> Verdict:
    if calls.result.mode is Mode.INFERENCE:
        return Verdict(
            False,
            Cause.INFERENCE,
            None,
            "inference mode (--mode inference): not on any autograd graph",
            "inference tensors can never join a later graph; run with --mode grad",
        )
    parent = _enclosing(capture, calls, lambda r: not r.inference_mode)
    where = _describe(parent)
    return Verdict(
        False,
        Cause.INFERENCE,
        parent.name if parent else None,
        f"inference mode: {capture.layer} ran under torch.inference_mode() inside {where}",
        f"move the call out of the inference_mode block in {where}",
        cut_at=block_site(capture.call_id, calls),
    )


def _grad_off_verdict(capture: Capture, calls: _Calls) -> Verdict:
    if capture.call_id in calls.result.checkpointed:
        return Verdict(
            False,
            Cause.CHECKPOINTED,
            None,
            "inside a reentrant activation checkpoint (torch.utils.checkpoint, "
            "use_reentrant=True): this first forward runs under no_grad by design and backward "
            "recomputes it with grad",
            "its parameters still get gradients (check with --backward); use_reentrant=False "
            "keeps the first forward on the graph",
        )
    return _grad_off_cause(capture, calls)


def _grad_off_cause(capture: Capture, calls: _Calls) -> Verdict:
    if calls.result.mode is Mode.NO_GRAD:
        return Verdict(
            False,
            Cause.GRAD_OFF,
            None,
            "grad mode off: ran under no_grad (--mode no-grad)",
            "run with --mode grad to see whether it is connected",
        )
    parent = _enclosing(capture, calls, lambda r: r.grad_enabled)
    where = _describe(parent)
    return Verdict(
        False,
        Cause.GRAD_OFF,
        parent.name if parent else None,
        f"grad mode off: {capture.layer} ran under no_grad inside {where}",
        f"move the capture (or the call) outside the no_grad block in {where}; "
        "frozen layers need requires_grad_(False), not no_grad, to pass gradients "
        "through",
        cut_at=block_site(capture.call_id, calls),
    )


def _no_grad_verdict(capture: Capture, calls: _Calls) -> Verdict:
    record = calls.by_id.get(capture.call_id)
    if record is not None and record.op:
        return _op_no_graph_verdict(record)
    if record is not None and record.constant:
        return Verdict(
            False,
            Cause.CONSTANT,
            None,
            "constant with respect to the inputs (computed from shapes or positions): "
            "not on the graph, and not a cut",
            "its output did not change when fvis re-ran it on other input values",
        )
    inside = _innermost_cut(capture, calls)
    if inside is not None:
        where = _describe(inside)
        return Verdict(
            False,
            Cause.CUT_INSIDE,
            inside.name,
            f"graph cut inside {where}: its inputs or parameters require grad, its output does not",
            f"remove the .detach() / .data / no_grad in {where}",
            cut_at=site_inside(inside.call_id, calls),
        )
    origin = calls.result.fed_by_cut.get(capture.call_id)
    before = calls.by_id.get(origin) if origin is not None else None
    if before is None:
        before = _earlier_no_grad_block(capture, calls)
    if before is not None and before.is_no_grad_inside:
        return _after_no_grad_verdict(capture, before, calls)
    if before is not None:
        where = _describe(before)
        return Verdict(
            False,
            Cause.CUT_INSIDE,
            before.name,
            f"graph cut upstream, inside {where}",
            f"remove the .detach() / .data / no_grad in {where}",
            cut_at=site_inside(before.call_id, calls),
        )
    if not _parameters_before(capture, calls):
        return Verdict(
            False,
            Cause.INPUT_ONLY,
            None,
            "computed from the input alone (no module with parameters ran before it), and "
            "the input does not require grad: nothing to differentiate here",
            "expected for input preprocessing (a detector's transform); to follow gradients "
            "to the input, run with --input-requires-grad",
        )
    return Verdict(
        False,
        Cause.FROZEN,
        None,
        "nothing upstream requires grad: the parameters before it are frozen and "
        "the input does not require grad",
        "expected for a frozen backbone; to check gradient flow anyway, run with "
        "--input-requires-grad",
    )


def _op_no_graph_verdict(record: CallRecord) -> Verdict:
    """A captured op (``fvis.ops``) whose output carries no graph with grad on: the op cut
    it, or its inputs already carried none (then the op is not where the graph was lost)."""
    if record.is_cut:
        where = f"{record.class_name} in {record.name or 'the model'}'s forward"
        return Verdict(
            False,
            Cause.CUT_INSIDE,
            record.name,
            f"graph cut by {where}: its inputs require grad, its output does not",
            "use a differentiable op there, or remove the .detach() / .data around it",
        )
    return Verdict(
        False,
        Cause.CONSTANT,
        None,
        "its tensor inputs carry no graph (constants, masks, the input, or values cut "
        "before it): not on the graph, and not a cut here",
        "where the graph was lost (if it was) shows in the capture that feeds this op",
    )


def _parameters_before(capture: Capture, calls: _Calls) -> bool:
    """Whether any module holding parameters finished before this capture's call did (the
    trace lists calls as they finish: its own children before it, its parents after)."""
    for record in calls.result.trace:
        if record.has_params:
            return True
        if record.call_id == capture.call_id:
            return False
    return True  # no record: assume parameters, the old verdict


def _after_no_grad_verdict(capture: Capture, block: CallRecord, calls: _Calls) -> Verdict:
    parent = calls.by_id.get(block.parent_id) if block.parent_id is not None else None
    where = _describe(parent)
    return Verdict(
        False,
        Cause.GRAD_OFF,
        parent.name if parent else None,
        f"nothing upstream requires grad: {block.name or block.class_name} ran under no_grad "
        f"inside {where} before it, so its input carries no graph (parameters are not frozen)",
        f"move the no_grad block in {where}; frozen layers need requires_grad_(False), not "
        "no_grad, to pass gradients through",
        cut_at=block_site(block.call_id, calls),
    )


def _earlier_no_grad_block(capture: Capture, calls: _Calls) -> CallRecord | None:
    """The last no_grad block that ran before this call inside one of its enclosing calls:
    the link to this call may go through functional code, which hooks cannot see."""
    enclosing = {a.call_id for a in calls.ancestors(capture.call_id)}
    return next(
        (
            r
            for r in reversed(calls.result.trace)
            if r.call_id < capture.call_id
            and r.is_no_grad_inside
            and r.parent_id in enclosing
            and not calls.is_within(capture.call_id, r.call_id)
        ),
        None,
    )


def _unreachable_verdict(capture: Capture, edge: tuple[Any, int] | None, calls: _Calls) -> Verdict:
    cut = calls.detached_in((id(edge[0]), edge[1])) if edge is not None else None
    detached = calls.by_id.get(cut.call_id) if cut is not None else None
    if cut is not None and detached is not None:
        where = _describe(detached)
        return Verdict(
            False,
            Cause.CUT_DOWNSTREAM,
            detached.name,
            f"used, then detached: {where} detaches a value computed from it, so no "
            "gradient from the output reaches it",
            f"remove the .detach() / .data in {where} if gradients should flow here",
            cut_at=cut.site,
        )
    downstream = _cut_fed_by(edge, calls) or next(
        (a for a in calls.ancestors(capture.call_id) if a.is_cut), None
    )
    if downstream is not None:
        where = _describe(downstream)
        return Verdict(
            False,
            Cause.CUT_DOWNSTREAM,
            downstream.name,
            f"requires grad, but {where} cuts the graph before the output",
            f"remove the .detach() / .data / no_grad in {where}",
            cut_at=site_inside(downstream.call_id, calls),
        )
    return Verdict(
        False,
        Cause.UNUSED,
        None,
        "computed but not used by the output (a dead branch or unused output)",
        "a loss on the model's output sends no gradient here; check that the "
        "branch is meant to be unused",
    )


def _with_in_place(verdict: Verdict, capture: Capture) -> Verdict:
    grad = capture.grad
    if not grad.modified_in_place:
        return verdict
    note = (
        f"modified in place after capture (_version {grad.version} -> "
        f"{grad.version_after}, grad_fn {grad.grad_fn} -> {grad.grad_fn_after}): the "
        "picture shows the values at capture; code that keeps a reference sees the "
        "later values. Edits through .data cannot be detected."
    )
    return dataclasses.replace(
        verdict, summary=f"{verdict.summary}; modified in place after capture", in_place=note
    )


def _with_origin(verdict: Verdict, calls: _Calls) -> Verdict:
    """Name the source of the module blamed, and whether it is library code."""
    if verdict.where is None or verdict.cause in (Cause.CONNECTED, Cause.CONSTANT):
        return verdict
    cls = calls.result.classes.get(verdict.where)
    if cls is None:
        return verdict
    origin = origin_of(cls)
    if verdict.cut_at is not None:  # the cut's own line is named: say only whose it is
        whose = "library code" if verdict.cut_at.library else "your code"
        summary = f"{verdict.summary} ({whose})"
    else:
        whose = "library code" if origin.library else "your code"
        summary = f"{verdict.summary} [{whose}: {origin.where}]"
    return dataclasses.replace(
        verdict, summary=summary, origin=origin.where, library=origin.library
    )


def _cut_fed_by(edge: tuple[Any, int] | None, calls: _Calls) -> CallRecord | None:
    """The first cut module whose inputs lead back to this tensor (a ``.detach()`` after it)."""
    if edge is None:
        return None
    key = (id(edge[0]), edge[1])
    return next((cut for cut in calls.cuts if key in calls.reached_from_inputs(cut)), None)


def _innermost_cut(capture: Capture, calls: _Calls) -> CallRecord | None:
    # The capture's own call or a call inside it: the deepest one is the culprit.
    inside = [c for c in calls.cuts if calls.is_within(c.call_id, capture.call_id)]
    return max(inside, key=lambda c: len(calls.ancestors(c.call_id)), default=None)


def _enclosing(capture: Capture, calls: _Calls, ok: Any) -> CallRecord | None:
    """The nearest call enclosing the capture's call for which ``ok(record)`` holds."""
    return next((a for a in calls.ancestors(capture.call_id) if ok(a)), None)


def _describe(record: CallRecord | None) -> str:
    if record is None:
        return "the code that called the model"
    if not record.name:
        return f"{record.class_name}.forward"
    return f"{record.name} ({record.class_name}.forward)"


def _is_float(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat", "complex"))


def verdict_dicts(verdicts: Mapping[str, Verdict]) -> dict[str, dict[str, Any]]:
    return {label: v.as_dict() for label, v in verdicts.items()}
