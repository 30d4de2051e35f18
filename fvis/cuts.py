"""Which torch functions can cut the autograd graph during a forward, and what each one cut.

The op watch (``DetachWatch``, on in the pass ``fvis.api`` runs when a verdict
blames a cut) tests every op against ``CUT_FUNCS``: one frozenset membership test, the whole
cost when nothing is cut; only a hit calls ``cut_value``.
``torch.from_numpy`` is not here: its array already left the graph through ``.numpy()`` or a
``.detach()``, which are. ``torch.as_tensor(t)`` of a tensor keeps its graph (it returns ``t``
or ``t.to(dtype)``), so only a list holding grad tensors counts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from fvis.records import Detach
from fvis.sources import locate
from fvis.tensor_facts import gradient_edge

# Every no_grad / set_grad_enabled / enable_grad enter and exit calls this (inference_mode
# does not: that one is found when the first module inside it is called).
SET_GRAD_ENABLED = torch._C._set_grad_enabled

_REQUIRES_GRAD = (torch.Tensor.requires_grad_, torch.Tensor.requires_grad.__set__)
_FACTORIES = (torch.tensor, torch.as_tensor)

CUTS: dict[Any, str] = {
    torch.Tensor.detach: ".detach()",
    torch.detach: "torch.detach()",
    torch.Tensor.data.__get__: ".data",
    torch.Tensor.detach_: ".detach_()",
    torch.Tensor.requires_grad_: ".requires_grad_(False)",
    torch.Tensor.requires_grad.__set__: ".requires_grad = False",
    torch.Tensor.item: ".item()",
    torch.Tensor.tolist: ".tolist()",
    torch.Tensor.numpy: ".numpy()",
    torch.tensor: "torch.tensor()",
    torch.as_tensor: "torch.as_tensor()",
    SET_GRAD_ENABLED: "torch.set_grad_enabled()",
}
CUT_FUNCS = frozenset(CUTS)  # what the watch tests every op against


def cut_value(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> Any:
    """The tensor whose value ``func(*args, **kwargs)`` takes off the graph (not checked for
    ``requires_grad`` here), or None when this call cuts nothing."""
    first = args[0]
    if func in _REQUIRES_GRAD:
        flag = args[1] if len(args) > 1 else (kwargs or {}).get("requires_grad", True)
        return None if flag else first
    if func in _FACTORIES:
        return _tensor_in(first, top=func is torch.tensor)
    return first


def _tensor_in(data: Any, top: bool, depth: int = 0) -> torch.Tensor | None:
    """A tensor that requires grad in the data given to ``torch.tensor``: the data itself
    (``top``), or among the first few items of a (nested) list; lists are not walked whole."""
    if isinstance(data, torch.Tensor):
        return data if top and data.requires_grad else None
    if type(data) not in (list, tuple) or depth > 4:
        return None
    for item in data[:8]:
        found = _tensor_in(item, True, depth + 1)
        if found is not None:
            return found
    return None


def cut_record(
    func: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None, call_id: int
) -> Detach | None:
    """The record of the cut this call makes inside module call ``call_id``, with its source
    line; None when what it takes off the graph does not require grad."""
    tensor = cut_value(func, args, kwargs)
    if not isinstance(tensor, torch.Tensor) or not tensor.requires_grad:
        return None
    edge = gradient_edge(tensor)
    if edge is None:
        return None
    op = CUTS[func]
    return Detach(call_id, edge, op, locate(op))


def grad_entry(enabled: bool, call_id: int, current: Detach | None) -> Detach | None:
    """The no_grad block under way after ``torch._C._set_grad_enabled(enabled)``: a new entry
    when grad goes from on to off (named by its ``with`` line), none once grad is back on."""
    if enabled:
        return None
    if not torch.is_grad_enabled():  # already off: a nested block, or one ending
        return current
    site = locate("torch.no_grad()", block=True)
    return Detach(call_id, None, site.op if site is not None else "torch.no_grad()", site)


def block_entry(entry: Detach | None, parent: int) -> Detach:
    """The entry of the grad-off block whose first module call is being made inside call
    ``parent``: the one the watch saw, or else (inference_mode, which it cannot see) the
    ``with`` around the line making this call."""
    if entry is not None and entry.call_id == parent:
        return entry
    op = "torch.inference_mode()" if torch.is_inference_mode_enabled() else "torch.no_grad()"
    return Detach(parent, None, op, locate(op, block=True))


class DetachWatch(TorchFunctionMode):
    """Sees every graph cut during forward (``fvis.cuts``: ``.detach()``, ``.data``,
    ``.item()``, entering ``no_grad`` ...; hooks see only module boundaries), so a value
    detached inside a parent's forward is not called unused, and records its source line."""

    def __init__(self, session: Any) -> None:  # a fvis.session._Session
        super().__init__()
        self.session = session

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in CUT_FUNCS and args:  # the only test for ops that cut nothing
            cut = self.session.on_cut(func, args, kwargs)
            out = func(*args, **(kwargs or {}))
            if cut is not None:  # recorded once the op worked (.numpy() of a grad tensor fails)
                self.session.detaches.append(cut)
            return out
        if (kwargs and kwargs.get("inplace")) or getattr(func, "__name__", "").endswith("_"):
            self.session.in_place_ops = True  # then a saved tensor may have changed
        return func(*args, **(kwargs or {}))
