"""The end of a capture's hook session: the version check that sees outputs changed in place
after their call, and the ``CaptureResult`` built from what the hooks recorded. A mixin of
``fvis.session._Session`` (its C counterpart is fvis/_trace_end.c: ``fast_check_versions``,
``fast_captures``)."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fvis.call_records import not_called
from fvis.choices import Mode
from fvis.records import CallRecord, Capture, CaptureResult, Detach, _Live, referent
from fvis.tensor_facts import _grad_fn_name

if TYPE_CHECKING:
    from fvis.capture import _Tree


class SessionEnd:
    """Mixed into ``fvis.session._Session``, whose records it reads and ends (and whose C
    base, ``fvis._moments.Tracer``, has the ``fast_`` methods where the extension is built)."""

    native: bool
    fast_check_versions: Callable[[], None]
    fast_captures: Callable[..., tuple[tuple[Capture, ...], bool]]
    _read_back: Callable[[], None]
    live: list[_Live]
    done: list[_Live]
    trace: list[CallRecord]
    calls: dict[int, int]
    targets: dict[int, Any]
    batch: int | None
    in_place_ops: bool
    edges: dict[tuple[str, int, str], tuple[Any, int]]
    cut_inputs: dict[int, tuple[tuple[Any, int], ...]]
    fed_by_cut: dict[int, int]
    notes: dict[str, list[str]]
    detaches: list[Detach]
    checkpointed: set[int]
    grad_off_blocks: dict[int, Detach]

    def _check_versions(self) -> None:
        # Called after every module call: an in-place op by a later module (ReLU(inplace=True))
        # is seen while the tensor is still alive, even if it is freed before forward ends.
        if self.native:  # the same loop in C (fvis/_trace.c)
            self.fast_check_versions()
            return
        still: list[_Live] = []
        for item in self.live:
            tensor = referent(item.ref)
            if tensor is None:
                self.done.append(item)
                continue
            version = tensor._version
            if version != item.last_version:  # the rare case: only then name the new grad_fn
                item.last_version = version
                item.last_grad_fn = _grad_fn_name(tensor)
            still.append(item)
        self.live = still

    def finish(self) -> None:
        self._read_back()  # what accelerators computed during the forward: one transfer
        self._check_versions()
        self.done.extend(self.live)
        self.live = []

    def ran_summary(self, limit: int = 5) -> str:
        names = list(dict.fromkeys(r.name for r in self.trace if r.name))
        shown = ", ".join(names[-limit:])
        return (f"... {shown}" if len(names) > limit else shown) + (
            f" ({len(names)} in all)" if len(names) > limit else ""
        )

    def result(self, output: Any, mode: Mode, exported: bool, tree: _Tree) -> CaptureResult:
        if self.native:  # the same records, built in C (sorted there too)
            captures, modified = self.fast_captures(self.done, self.batch, self.calls)
        else:
            done = sorted(self.done, key=_by_seq)
            captures = tuple(
                item.capture(self.batch, self.calls.get(item.key, 1), final=True) for item in done
            )
            modified = any(c.grad.modified_in_place for c in captures)
        self.in_place_ops = self.in_place_ops or modified
        ran = self.calls.__contains__
        missed = (
            {
                name: not_called(name, module, exported)
                for key, (name, module) in self.targets.items()
                if not ran(key)
            }
            if not all(map(ran, self.targets))
            else {}
        )
        # A container (ModuleList, ModuleDict) has no forward: it can never run, so it never
        # "never ran"; its items are what runs.
        never = tuple(name for name, info in missed.items() if not info.container)
        return CaptureResult(
            captures,
            tuple(self.trace),
            never,
            output,
            self.edges,
            mode,
            self.cut_inputs,
            self.fed_by_cut,
            {layer: tuple(notes) for layer, notes in self.notes.items()},
            tuple(self.detaches),
            missed,
            tree.kinds,
            self.in_place_ops,
            frozenset(self.checkpointed),
            grad_off_blocks=self.grad_off_blocks,
        )


_by_seq = operator.attrgetter("seq")
