"""fvis.collector: a capture raises the young threshold for its own records, and only that.

Ground truth is ``gc.get_threshold()`` itself, read around the contexts."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from fvis import collector


@pytest.fixture(autouse=True)
def threshold() -> Iterator[int]:
    before = gc.get_threshold()
    gc.set_threshold(700, *before[1:])
    yield 700
    gc.set_threshold(*before)


def test_a_capture_gets_room_for_its_records_and_gives_it_back(threshold: int) -> None:
    with collector.room_for(10):
        assert gc.get_threshold()[0] == threshold + 10 * collector.OBJECTS_PER_MODULE
    assert gc.get_threshold()[0] == threshold


def test_overlapping_captures_give_it_back_in_any_order(threshold: int) -> None:
    """Two captures in threads may end in either order: the threshold ends where it was."""
    first, second = collector.room_for(10), collector.room_for(5)
    first.__enter__()
    second.__enter__()
    assert gc.get_threshold()[0] == threshold + 15 * collector.OBJECTS_PER_MODULE
    first.__exit__(None, None, None)
    assert gc.get_threshold()[0] == threshold + 5 * collector.OBJECTS_PER_MODULE
    second.__exit__(None, None, None)
    assert gc.get_threshold()[0] == threshold


def test_a_threshold_set_meanwhile_stands(threshold: int) -> None:
    with collector.room_for(10):
        gc.set_threshold(5000, *gc.get_threshold()[1:])
    assert gc.get_threshold()[0] == 5000
    with collector.room_for(10):  # and it is the base of the next capture
        assert gc.get_threshold()[0] == 5000 + 10 * collector.OBJECTS_PER_MODULE
    assert gc.get_threshold()[0] == 5000


def test_a_disabled_collector_is_left_alone(threshold: int) -> None:
    gc.disable()
    try:
        with collector.room_for(10):
            assert gc.get_threshold()[0] == threshold
    finally:
        gc.enable()


def test_an_error_inside_gives_the_room_back(threshold: int) -> None:
    with pytest.raises(RuntimeError), collector.room_for(10):
        raise RuntimeError("forward failed")
    assert gc.get_threshold()[0] == threshold
