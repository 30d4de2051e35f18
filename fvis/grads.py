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

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from fvis.capture import CallRecord, Capture, CaptureResult, Mode, flatten_tensors


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


@dataclass(frozen=True)
class Verdict:
    """One line a person can act on, plus the facts behind it."""

    connected: bool
    cause: Cause
    where: str | None  # the module (dotted name) that holds the cut, when known
    summary: str
    hint: str
    in_place: str | None = None  # set when the tensor was modified in place after capture

    def as_dict(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "cause": self.cause.value,
            "where": self.where,
            "summary": self.summary,
            "hint": self.hint,
            "in_place": self.in_place,
        }


def reachable_edges(output: Any) -> set[tuple[int, int]]:
    """Every ``(id(node), output_nr)`` gradient edge reachable back from the model's output."""
    import torch

    seen: set[tuple[int, int]] = set()
    stack: list[tuple[Any, int]] = []
    for _, tensor in flatten_tensors(output):
        if tensor.requires_grad:
            edge = torch.autograd.graph.get_gradient_edge(tensor)
            stack.append((edge.node, edge.output_nr))
    visited_nodes: set[int] = set()
    while stack:
        node, nr = stack.pop()
        seen.add((id(node), nr))
        if id(node) in visited_nodes:
            continue
        visited_nodes.add(id(node))
        stack.extend((nxt, n) for nxt, n in node.next_functions if nxt is not None)
    return seen


def diagnose(result: CaptureResult) -> dict[str, Verdict]:
    """A verdict per capture label, and per never-ran layer name.

    >>> verdicts = diagnose(capture(model, [x], ["inner.relu"]))        # doctest: +SKIP
    >>> verdicts["inner.relu"].summary
    'connected to the output'
    """
    edges = reachable_edges(result.output) if result.mode is Mode.GRAD else set()
    cuts = _cut_modules(result.trace)
    verdicts = {}
    for capture in result.captures:
        edge = result.edges.get((capture.layer, capture.call, capture.path))
        connected = edge is not None and (id(edge[0]), edge[1]) in edges
        verdict = _verdict(capture, connected, result, cuts)
        verdicts[capture.label] = _with_in_place(verdict, capture)
    for name in result.never_ran:
        verdicts[name] = Verdict(
            False,
            Cause.NEVER_RAN,
            name,
            f"never ran: {name}.__call__ did not happen",
            "it may be called as .forward() directly, used through a functional op, or sit on "
            "a branch not taken for this input; hook its parent instead",
        )
    return verdicts


def _verdict(
    capture: Capture, connected: bool, result: CaptureResult, cuts: Sequence[CallRecord]
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
        return _inference_verdict(capture, result)
    if not grad.grad_enabled:
        return _grad_off_verdict(capture, result)
    if not grad.requires_grad:
        return _no_grad_verdict(capture, result, cuts)
    return _unreachable_verdict(capture, cuts)


def _inference_verdict(capture: Capture, result: CaptureResult) -> Verdict:
    if result.mode is Mode.INFERENCE:
        return Verdict(
            False,
            Cause.INFERENCE,
            None,
            "inference mode (--mode inference): not on any autograd graph",
            "inference tensors can never join a later graph; run with --mode grad",
        )
    parent = _enclosing(capture.layer, result.trace, lambda r: not r.inference_mode)
    where = _describe(parent)
    return Verdict(
        False,
        Cause.INFERENCE,
        parent.name if parent else None,
        f"inference mode: {capture.layer} ran under torch.inference_mode() inside {where}",
        f"move the call out of the inference_mode block in {where}",
    )


def _grad_off_verdict(capture: Capture, result: CaptureResult) -> Verdict:
    if result.mode is Mode.NO_GRAD:
        return Verdict(
            False,
            Cause.GRAD_OFF,
            None,
            "grad mode off: ran under no_grad (--mode no-grad)",
            "run with --mode grad to see whether it is connected",
        )
    parent = _enclosing(capture.layer, result.trace, lambda r: r.grad_enabled)
    where = _describe(parent)
    return Verdict(
        False,
        Cause.GRAD_OFF,
        parent.name if parent else None,
        f"grad mode off: {capture.layer} ran under no_grad inside {where}",
        f"move the capture (or the call) outside the no_grad block in {where}; "
        "frozen layers need requires_grad_(False), not no_grad, to pass gradients "
        "through",
    )


def _no_grad_verdict(
    capture: Capture, result: CaptureResult, cuts: Sequence[CallRecord]
) -> Verdict:
    inside = _innermost_cut(capture.layer, cuts)
    if inside is not None:
        where = _describe(inside)
        return Verdict(
            False,
            Cause.CUT_INSIDE,
            inside.name,
            f"graph cut inside {where}: its inputs or parameters require grad, its output does not",
            f"remove the .detach() / .data / no_grad in {where}",
        )
    before = _last_cut_before(capture, result.trace, cuts)
    if before is not None:
        where = _describe(before)
        return Verdict(
            False,
            Cause.CUT_INSIDE,
            before.name,
            f"graph cut upstream, inside {where}",
            f"remove the .detach() / .data / no_grad in {where}",
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


def _unreachable_verdict(capture: Capture, cuts: Sequence[CallRecord]) -> Verdict:
    downstream = next((c for c in reversed(cuts) if _is_ancestor(c.name, capture.layer)), None)
    if downstream is not None:
        where = _describe(downstream)
        return Verdict(
            False,
            Cause.CUT_DOWNSTREAM,
            downstream.name,
            f"requires grad, but {where} cuts the graph before the output",
            f"remove the .detach() / .data / no_grad in {where}",
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
    return Verdict(
        verdict.connected,
        verdict.cause,
        verdict.where,
        f"{verdict.summary}; modified in place after capture",
        verdict.hint,
        note,
    )


def _cut_modules(trace: Sequence[CallRecord]) -> list[CallRecord]:
    """Calls that ran with grad on, whose inputs or parameters required grad and whose
    floating outputs did not, in call order."""
    return [
        r
        for r in trace
        if r.grad_enabled
        and not r.inference_mode
        and r.has_float_output
        and (r.inputs_require_grad or r.params_require_grad)
        and not r.outputs_require_grad
    ]


def _innermost_cut(layer: str, cuts: Sequence[CallRecord]) -> CallRecord | None:
    # The capture's own module or a module inside it: the deepest one is the culprit.
    inside = [c for c in cuts if c.name == layer or _is_ancestor(layer, c.name)]
    return max(inside, key=lambda c: c.name.count(".") + bool(c.name), default=None)


def _last_cut_before(
    capture: Capture, trace: Sequence[CallRecord], cuts: Sequence[CallRecord]
) -> CallRecord | None:
    position = next(
        (i for i, r in enumerate(trace) if r.name == capture.layer and r.call == capture.call),
        len(trace),
    )
    cut_ids = {id(c) for c in cuts}
    earlier = [r for r in trace[:position] if id(r) in cut_ids]
    return earlier[-1] if earlier else None


def _enclosing(layer: str, trace: Iterable[CallRecord], ok: Any) -> CallRecord | None:
    """The nearest ancestor call of ``layer`` for which ``ok(record)`` holds."""
    ancestors = [r for r in trace if _is_ancestor(r.name, layer) and ok(r)]
    return max(ancestors, key=lambda r: len(r.name) + bool(r.name), default=None)


def _is_ancestor(parent: str, child: str) -> bool:
    return parent != child and (parent == "" or child.startswith(parent + "."))


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
