"""Where in the source a graph cut was made: ``CutSite`` and ``locate``.

``locate`` walks the Python stack outward from the op that cut the graph (a ``.detach()``, a
``with torch.no_grad():``) past torch's own frames, fvis's and the standard library's, to the
first user-facing frame: ``models/wrap.py:42 in Wrapper.forward``. A frame under site-packages
is user-facing too (a cut inside transformers is named there), marked ``library=True`` so the
verdict can tell a cut made by design in installed code from one in the user's code.

It is called only when a cut happens, never per op.
"""

from __future__ import annotations

import ast
import functools
import linecache
import os
import sys
import sysconfig
from dataclasses import dataclass
from types import FrameType
from typing import Any

_GRAD_MODE_WORDS = ("no_grad", "inference_mode", "set_grad_enabled")


@dataclass(frozen=True, slots=True)
class CutSite:
    """The source line that cut the graph: ``file`` relative to the working directory when
    under it, ``function`` the code's qualified name (``Wrapper.forward``), ``op`` what cut
    it (``.detach()``, ``torch.no_grad()``), ``library`` whether the file is installed code."""

    file: str
    line: int
    function: str
    op: str
    library: bool

    @property
    def where(self) -> str:
        """``models/wrap.py:42 in Wrapper.forward``"""
        return f"{self.file}:{self.line} in {self.function}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "line": self.line,
            "function": self.function,
            "op": self.op,
            "library": self.library,
        }


def locate(op: str, block: bool = False) -> CutSite | None:
    """The first user-facing frame on the stack of the caller, as the site of ``op``; None
    when every frame is torch's, fvis's or the standard library's.

    ``block``: ``op`` switched grad mode off, or this is a call made inside a grad-off block:
    name the block's entry in that function (``with torch.no_grad():``, a
    ``torch.set_grad_enabled(False)`` statement) when there is one, else the call of a
    function decorated with ``@torch.no_grad()``.

    >>> locate(".detach()").function                                  # doctest: +SKIP
    'Wrapper.forward'
    """
    start = sys._getframe(1)
    frame = _user_frame(start)
    if frame is None:
        return None
    line = frame.f_lineno or frame.f_code.co_firstlineno
    if block:
        code = frame.f_code
        found = _grad_off_entry(code.co_filename, line, code.co_firstlineno)
        if found is not None:
            line, op = found
        elif _decorated(start, frame) or _decorated(frame, None):
            # The block is a decorated function: name the line that called it.
            caller = frame if _decorated(start, frame) else _user_frame(frame.f_back)
            frame = caller or frame
            line, op = frame.f_lineno or line, f"@{op}"
    code = frame.f_code
    file, library = _shown(code.co_filename)
    return CutSite(file, line, getattr(code, "co_qualname", code.co_name), op, library)


def _user_frame(frame: FrameType | None) -> FrameType | None:
    while frame is not None and _skipped(frame.f_code.co_filename):
        frame = frame.f_back
    return frame


def _decorated(frame: FrameType | None, until: FrameType | None) -> bool:
    """Whether torch's context-manager decorator (``@torch.no_grad()``) runs between
    ``frame`` and ``until`` on the stack (``until`` None: called ``frame``'s function)."""
    if until is None:
        back = frame.f_back if frame is not None else None
        return back is not None and back.f_code.co_name == "decorate_context"
    while frame is not None and frame is not until:
        if frame.f_code.co_name == "decorate_context":
            return True
        frame = frame.f_back
    return False


@functools.lru_cache(maxsize=4096)
def _skipped(filename: str) -> bool:
    """torch's, fvis's, the standard library's and the interpreter's own frames."""
    if filename.startswith("<frozen "):
        return True
    path = os.path.realpath(filename)
    if path.startswith(_own_roots()):
        return True
    # The standard library, unless installed packages live inside it (/usr/lib/python3/...)
    return not _library(filename) and path.startswith(_stdlib_roots())


@functools.cache
def _own_roots() -> tuple[str, ...]:
    import torch

    return _folders(os.path.dirname(torch.__file__), os.path.dirname(__file__))


@functools.cache
def _stdlib_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    return _folders(*(paths[k] for k in ("stdlib", "platstdlib") if k in paths))


def _folders(*paths: str) -> tuple[str, ...]:
    return tuple(os.path.join(os.path.realpath(p), "") for p in paths)


@functools.cache
def _library_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    return _folders(*(paths[k] for k in ("purelib", "platlib") if k in paths))


@functools.lru_cache(maxsize=4096)
def _library(filename: str) -> bool:
    path = os.path.realpath(filename)
    parts = path.split(os.sep)
    if "site-packages" in parts or "dist-packages" in parts:
        return True
    return any(path.startswith(root) for root in _library_roots())


def _shown(filename: str) -> tuple[str, bool]:
    """The file as shown (relative to the working directory when under it) and whether it is
    installed library code."""
    here = os.path.join(os.getcwd(), "")
    absolute = os.path.abspath(filename)
    shown = absolute[len(here) :] if absolute.startswith(here) else filename
    return shown, _library(filename)


def _grad_off_entry(filename: str, line: int, first: int) -> tuple[int, str] | None:
    """Where grad mode was switched off around ``line`` of the function starting at ``first``:
    the innermost grad-mode ``with`` holding it, else the last ``set_grad_enabled(False)``
    statement before it; its line and its text."""
    tree = _parsed(filename)
    if tree is None:
        return None
    withs: list[tuple[int, str]] = []
    calls: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if not first <= getattr(node, "lineno", 0) <= line:
            continue
        if isinstance(node, ast.With | ast.AsyncWith) and line <= (node.end_lineno or 0):
            texts = [ast.unparse(item.context_expr) for item in node.items]
            withs += [(node.lineno, t) for t in texts if any(w in t for w in _GRAD_MODE_WORDS)]
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            text = ast.unparse(node.value)
            if "set_grad_enabled(False)" in text:
                calls.append((node.lineno, text))
    return max(withs, default=None) or max(calls, default=None)


@functools.lru_cache(maxsize=64)
def _parsed(filename: str) -> ast.Module | None:
    source = "".join(linecache.getlines(filename))
    try:
        return ast.parse(source) if source else None
    except (SyntaxError, ValueError):
        return None
