"""Run one capture on a chosen hook path (C hooks wrapped around each forward, C hooks as
global hooks, or the Python session alone) and compare two results field by field: shared by
tests/test_fast_hooks.py and tests/real_models/test_fast_hooks_real.py."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fvis import fasthooks, session
from fvis.capture import Capture, CaptureResult, capture


def run_capture(
    model: nn.Module,
    x: torch.Tensor,
    native: bool,
    monkeypatch: pytest.MonkeyPatch,
    wrap: bool = True,
    **options: Any,
) -> tuple[CaptureResult, int, list[Capture]]:
    """A capture of every module, the C path's call count, and what the callback got."""
    monkeypatch.setattr(fasthooks, "USE_NATIVE", native)
    monkeypatch.setattr(fasthooks, "USE_WRAP", wrap)
    seen: list[int] = []
    finish = session._Session.finish

    def counted(self: session._Session) -> None:
        seen.append(getattr(self, "fast_calls", 0))
        finish(self)

    monkeypatch.setattr(session._Session, "finish", counted)
    delivered: list[Capture] = []
    layers = [name for name, _ in model.named_modules() if name]
    torch.manual_seed(0)  # dropout in train mode, perturbed re-runs
    result = capture(model, [x], layers, on_capture=delivered.append, **options)
    return result, seen[0], delivered


def capture_fields(c: Capture) -> tuple[Any, ...]:
    return tuple(
        getattr(c, f.name) for f in dataclasses.fields(c) if f.name not in ("values", "saved")
    )


def same_values(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return (a is None and b is None) or (
        a is not None and b is not None and np.array_equal(a, b, equal_nan=True)
    )


def assert_same(fast: CaptureResult, slow: CaptureResult) -> None:
    assert fast.trace == slow.trace
    assert [capture_fields(c) for c in fast.captures] == [capture_fields(c) for c in slow.captures]
    assert all(
        same_values(a.values, b.values) for a, b in zip(fast.captures, slow.captures, strict=True)
    )
    assert fast.never_ran == slow.never_ran
    assert fast.output_notes == slow.output_notes
    assert fast.in_place_ops == slow.in_place_ops
    assert fast.checkpointed == slow.checkpointed
    assert fast.fed_by_cut == slow.fed_by_cut
    assert fast.detaches == slow.detaches
    assert fast.grad_off_blocks == slow.grad_off_blocks
    assert fast.cut_inputs.keys() == slow.cut_inputs.keys()
    assert fast.not_called.keys() == slow.not_called.keys()
    assert {k: (n.name(), i) for k, (n, i) in fast.edges.items()} == {
        k: (n.name(), i) for k, (n, i) in slow.edges.items()
    }
