"""Pickle payloads for the trust-boundary tests: each one, when unpickled, creates a marker
file (``touch MARKER``) by a different route. Tests assert the marker is absent."""

from __future__ import annotations

import builtins
import os
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any


class SystemPayload:
    """Unpickles as ``os.system("touch MARKER")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


class ExecPayload:
    """Unpickles as ``builtins.exec("open(MARKER, 'w').close()")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


class SubprocessPayload:
    """Unpickles as ``subprocess.call(["touch", MARKER])``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (subprocess.call, (["touch", str(self.marker)],))


class TorchExecPayload:
    """Unpickles as ``torch.fx.graph_module._exec_with_source(code, {})``: a torch global that
    runs arbitrary code, which no deny-list of system modules catches."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        from torch.fx.graph_module import _exec_with_source

        return (_exec_with_source, (f"open({str(self.marker)!r}, 'w').close()", {}))
