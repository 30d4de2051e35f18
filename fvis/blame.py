"""Which recorded cut a grad verdict blames, and how the verdict names its source line.

The forward records each cut with its source line (``fvis.cuts``, ``fvis.sources``): a
``.detach()`` / ``.item()`` ... inside some module call, or the entry into a no_grad block
whose first module call is known. A verdict that blames a module (``fvis.grads``) is given
the cut recorded there, and reads ``...; graph cut by .detach() at models/wrap.py:42 in
Wrapper.forward``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from fvis.records import CaptureResult, Detach
from fvis.sources import CutSite

if TYPE_CHECKING:
    from fvis.grads import _Calls

# Reading a value out (for a Python number, a list, an array) cuts the graph only when that
# value is fed back in; a detach, .data or no_grad block cuts it outright, so blame those first.
_READS = frozenset({".item()", ".tolist()", ".numpy()"})


def site_inside(call_id: int, calls: _Calls) -> CutSite | None:
    """The cut recorded inside call ``call_id``: in its own forward first, else in a call
    inside it; the last outright cut there, else the last read-out."""
    result = calls.result
    cuts = [d for d in _recorded(result) if calls.is_within(d.call_id, call_id)]
    own = [d for d in cuts if d.call_id == call_id] or cuts
    strong = [d for d in own if d.op not in _READS] or own
    return next((d.site for d in reversed(strong) if d.site is not None), None)


def block_site(call_id: int, calls: _Calls) -> CutSite | None:
    """Where the grad-off block that call ``call_id`` ran in was entered: the entry linked to
    the call itself or to its nearest enclosing call that was a block's first call."""
    blocks = calls.result.grad_off_blocks
    if call_id in blocks:
        return blocks[call_id].site
    entry = next((blocks[a.call_id] for a in calls.ancestors(call_id) if a.call_id in blocks), None)
    return entry.site if entry is not None else None


def _recorded(result: CaptureResult) -> list[Detach]:
    """Every cut, in the order the forward made them (blocks by their first call)."""
    entries = [entry for _, entry in sorted(result.grad_off_blocks.items())]
    return list(result.detaches) + entries


def with_site(verdict: Any) -> Any:
    """``verdict`` with its cut's source line at the end of its summary."""
    site: CutSite | None = verdict.cut_at
    if site is None:
        return verdict
    summary = f"{verdict.summary}; graph cut by {site.op} at {site.where}"
    return dataclasses.replace(verdict, summary=summary)
