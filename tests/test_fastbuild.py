"""The hot path's cheaper constructions give the very objects and numbers the plain ones give.

``fvis.fastbuild`` builds frozen slotted records in C; ``tensor_stats`` inlines the usual
case of ``_mean_std``; ``_call_record`` builds a ``CallRecord`` with ``tuple.__new__``. Each
is compared here with the construction it replaces, bit for bit."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fvis import fastbuild, stats
from fvis.capture import Capture, GradFacts, Mode, capture
from fvis.records import CallRecord
from fvis.stats import Stats, tensor_stats

native = pytest.mark.skipif(fastbuild._native is None, reason="fvis._moments not built")

STATS = (1024, -2.5, 3.0, 0.25, 1.0, 0.125, 0, 0, 0, 16, 2, 1)
CAPTURE_HEAD = ("a.b", 2, "[0]", (1, 4), "float32", "cpu")
CAPTURE_TAIL = (3, None, 7, (1, 2, 2), None)
FACTS = (True, False, True, "AddmmBackward0", False, False, 3, 4, "ReluBackward0")


@pytest.mark.parametrize(
    ("cls", "values"),
    [
        (Stats, STATS),
        (GradFacts, FACTS),
        (
            Capture,
            (*CAPTURE_HEAD, GradFacts(*FACTS), Stats(*STATS), None, *CAPTURE_TAIL),
        ),
    ],
)
def test_builder_makes_what_the_class_makes(cls: type, values: tuple) -> None:
    built, plain = fastbuild.builder(cls)(values), cls(*values)
    assert type(built) is cls
    assert built == plain and hash(built) == hash(plain) and repr(built) == repr(plain)
    assert dataclasses.astuple(built) == dataclasses.astuple(plain)
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.__setattr__(dataclasses.fields(cls)[0].name, None)


@native
def test_builder_refuses_a_tuple_of_another_length() -> None:
    build = fastbuild.builder(Stats)
    with pytest.raises(TypeError):
        build(STATS[:-1])
    with pytest.raises(TypeError):
        build((*STATS, 0))


def test_builder_falls_back_to_init_for_other_classes() -> None:
    @dataclasses.dataclass(frozen=True)
    class WithDict:  # not slotted: its __init__ is used
        a: int
        b: int = 2

    @dataclasses.dataclass(frozen=True, slots=True)
    class Checked:
        a: int

        def __post_init__(self) -> None:
            if self.a < 0:
                raise ValueError("negative")

    assert fastbuild.builder(WithDict)((1, 5)) == WithDict(1, 5)
    with pytest.raises(ValueError, match="negative"):
        fastbuild.builder(Checked)((-1,))


def _reference_stats(tensor: torch.Tensor, axis: int | None) -> Stats:
    """The native path as it was before the inline: moments, _mean_std, Stats(...)."""
    numel, shape = tensor.numel(), tensor.shape
    channels = shape[axis] if axis is not None else 0
    first = axis == 1
    layout = (shape[0], channels, numel // (shape[0] * channels)) if first else (1, 1, numel)
    low, high, total, sumsq, zeros, dead = stats._native.moments(tensor.data_ptr(), *layout)
    mean, std = stats._mean_std(tensor, numel, total, sumsq, max(-low, high))
    return Stats(numel, low, high, mean, std, zeros / numel, 0, 0, 0, channels, dead, axis)


@pytest.mark.skipif(stats._native is None, reason="no native statistics on this machine")
@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(16, 64),
        lambda: torch.relu(torch.randn(2, 8, 5, 5)),
        lambda: torch.randn(3, 4, 7) * 1e-20,  # subnormal squares: the second pass
        lambda: torch.randn(1, 3, 100) * 1e-3 + 1000.0,  # cancellation: the second pass
        lambda: torch.full((4, 4, 4), -0.0),  # zero spread, negative zeros
        lambda: torch.ones(1, 1, 1),  # one value
        lambda: torch.zeros(2, 3, 4, 4),  # every channel dead
    ],
)
def test_inline_mean_std_gives_the_same_bits(make: object) -> None:
    torch.manual_seed(0)
    tensor = make()  # type: ignore[operator]
    axis = 1 if tensor.dim() >= 3 else None
    got, want = tensor_stats(tensor), _reference_stats(tensor, axis)
    assert got == want
    assert all(
        math.copysign(1.0, a) == math.copysign(1.0, b)
        for a, b in zip(dataclasses.astuple(got), dataclasses.astuple(want), strict=True)
        if isinstance(a, float) and isinstance(b, float)
    )


def test_call_records_equal_namedtuple_construction() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    result = capture(model, [torch.randn(2, 4)], ["0", "1"], mode=Mode.GRAD)
    for record in result.trace:
        assert type(record) is CallRecord and len(record) == len(CallRecord._fields)
        assert record == CallRecord(*record) and record._asdict() == CallRecord(*record)._asdict()
    first = next(record for record in result.trace if record.name == "0")
    assert (first.name, first.class_name, first.call) == ("0", "Linear", 1)
    assert first.grad_enabled and first.params_require_grad and first.outputs_require_grad
    assert first.has_params and not first.constant and first.output_shapes == ((2, 4),)


@pytest.mark.skipif(stats._native is None, reason="no native statistics on this machine")
def test_summary_mean_std_matches_python_on_many_tensors() -> None:
    """The C mean/std of the usual case, against _mean_std in Python, over scales and sizes."""
    generator = torch.Generator().manual_seed(15)
    for size in (1, 2, 7, 64, 1000, 70000):
        for scale, offset in ((1.0, 0.0), (1e-12, 0.0), (1e5, 3.0), (0.01, 1.0), (3.0, -50.0)):
            tensor = torch.randn(size, generator=generator) * scale + offset
            assert tensor_stats(tensor) == _reference_stats(tensor, None), (size, scale, offset)
