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


class OpenForWritingPayload:
    """Unpickles as ``opener(VICTIM, "w")``: a stdlib class whose constructor truncates the
    victim file (``_io.FileIO``, ``zipfile.ZipFile``, ``logging.FileHandler``...). No code
    runs, which is why an allowlist of "classes only" does not make it safe."""

    def __init__(self, opener: Callable[..., Any], victim: Path) -> None:
        self.opener = opener
        self.victim = victim

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (self.opener, (str(self.victim), "w"))


def file_openers() -> dict[str, Callable[..., Any]]:
    """The module to allow (the old hint's suggestion) -> a class that opens for writing."""
    import _io
    import _pyio
    import gzip
    import logging
    import zipfile

    return {
        "_io": _io.FileIO,
        "_pyio": _pyio.FileIO,
        "zipfile": zipfile.ZipFile,
        "logging": logging.FileHandler,
        "gzip": gzip.GzipFile,
    }


def module_holding(payload: Any) -> Any:
    """A pickled-module-to-be: plain ``torch.nn`` layers with ``payload`` as an attribute."""
    from torch import nn

    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    model.note = payload  # a plain attribute: pickled in the module's __dict__
    return model


def swap_pickle(archive: Path, out: Path, payload: bytes, member: str = "data.pkl") -> Path:
    """A copy of the zip ``archive`` whose ``member`` holds ``payload`` instead."""
    import zipfile

    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = payload if info.filename.endswith("/" + member) else src.read(info)
            dst.writestr(zipfile.ZipInfo(info.filename), data)
    return out


def duplicate_pickle(clean: Path, out: Path, payload: bytes) -> Path:
    """``clean`` with a second ``data.pkl`` entry (the payload) that torch reads but zipfile
    does not: zipfile takes the last copy of a name, torch's reader here takes the other."""
    import warnings
    import zipfile

    with zipfile.ZipFile(clean) as src:
        entries = [(i.filename, src.read(i)) for i in src.infolist()]
    pickle_name = next(name for name, _ in entries if name.endswith("/data.pkl"))
    good = dict(entries)[pickle_name]
    entries[0:1] = [(pickle_name, payload)]  # data.pkl is the first entry torch.save writes
    entries.insert(5, (pickle_name, good))
    with zipfile.ZipFile(out, "w") as dst, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name": the point of this file
        for name, data in entries:
            dst.writestr(zipfile.ZipInfo(name), data)
    return out
