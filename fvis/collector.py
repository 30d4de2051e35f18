"""The cycle collector during a capture: room for the records, so it does not chase them.

CPython runs a young-generation collection every 700 net allocations of tracked objects. A
capture makes about 14 per module call that all stay alive until it ends (the call record,
the held output and its ``grad_fn``, the statistics, the snapshot's facts, the gradient
edge): on a 400-module model that is 5-8 collections per capture, each of which finds them
alive and moves them to an older generation, until the collector runs a full collection over
everything torch and the model own (tens of milliseconds). ``room_for`` raises the young
threshold by what the capture itself will allocate, for the capture only: the model's own
garbage is collected as often as it would be without fvis, fvis's live records are not
traversed for nothing, and they die young when the caller drops them.

The threshold is the process's: captures that overlap (threads) add their room to one count,
and the threshold goes back to its own value when the last one ends. A threshold someone else
set meanwhile (the model, another library) stands.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

OBJECTS_PER_MODULE = 16  # measured: 10-14 net tracked allocations per captured leaf call

_LOCK = threading.Lock()
_room = 0  # the room of the captures under way
_base = 0  # the young threshold before them
_set = 0  # the threshold they set last (anything else was set by someone else)


@contextmanager
def room_for(modules: int) -> Iterator[None]:
    """The young-generation threshold raised by ``OBJECTS_PER_MODULE * modules`` inside.

    Left alone where the collector is off (``gc.disable()``, threshold 0)."""
    room = OBJECTS_PER_MODULE * modules
    if room <= 0 or not _widen(room):
        yield
        return
    try:
        yield
    finally:
        _narrow(room)


def _widen(room: int) -> bool:
    global _room, _base, _set
    with _LOCK:
        young, *older = gc.get_threshold()
        if not gc.isenabled() or young <= 0:
            return False
        if _room == 0 or young != _set:  # the first capture, or someone set it since
            _base, _room = young, 0
        _room += room
        _set = _base + _room
        gc.set_threshold(_set, *older)
        return True


def _narrow(room: int) -> None:
    global _room, _set
    with _LOCK:
        young, *older = gc.get_threshold()
        _room = max(0, _room - room)
        if young != _set:  # set by someone else meanwhile: theirs stands
            return
        _set = _base + _room
        gc.set_threshold(_set, *older)
