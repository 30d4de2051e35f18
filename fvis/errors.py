"""Domain exceptions, each mapped to one documented exit code.

The CLI catches ``FvisError`` in one place and prints ``fvis: error: <message>`` plus an
optional ``hint:`` line. Anything else is a bug (exit 70, traceback shown).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum
from typing import Any


class ExitStatus(IntEnum):
    """Exit codes, documented in the README and ``fvis --help``."""

    OK = 0
    CHECKS_FAILED = 1
    USAGE = 2
    BAD_FILE = 3
    REFUSED = 4
    MODEL_INPUT = 5
    OUTPUT = 6
    INTERNAL = 70
    INTERRUPTED = 130
    BROKEN_PIPE = 141
    TERMINATED = 143


class FvisError(Exception):
    """Base class: a problem fvis explains in one line, with at most one hint."""

    exit_status = ExitStatus.INTERNAL

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(FvisError):
    """Bad flag or value, missing file, unknown layer."""

    exit_status = ExitStatus.USAGE


class BadFileError(FvisError):
    """Unreadable, corrupt or unsupported file."""

    exit_status = ExitStatus.BAD_FILE


class RefusedError(FvisError):
    """Refused for safety: loading would run code the user has not trusted."""

    exit_status = ExitStatus.REFUSED


class MaliciousFileError(RefusedError):
    """Refused as malicious: the file names globals that would run commands or code.

    ``findings`` are ``fvis.trust.Finding`` records; ``file`` and ``kind`` say which file and
    format, for the ``--json`` verdict.
    """

    def __init__(
        self,
        message: str,
        hint: str | None = None,
        findings: Sequence[Any] = (),
        file: str = "",
        kind: str = "",
    ) -> None:
        super().__init__(message, hint)
        self.findings = tuple(findings)
        self.file = file
        self.kind = kind


class ModelInputError(FvisError):
    """Model and input (or checkpoint and architecture) do not fit, or forward failed."""

    exit_status = ExitStatus.MODEL_INPUT


class OutputError(FvisError):
    """The output folder cannot be used or written."""

    exit_status = ExitStatus.OUTPUT


def torchscript_refused(what: str) -> UsageError:
    """The one refusal for TorchScript, from the CLI (a file) and the API (a ScriptModule):
    hooks cannot be registered on ScriptModules, so every layer would look "never ran"."""
    return UsageError(
        f"{what} is TorchScript: hooks do not work on ScriptModules",
        hint="give the Python class with --arch (its weights are loaded into it; in Python: "
        "load its state_dict() into the class), or re-export the model with torch.export",
    )


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (or its type), for one-line errors."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]
