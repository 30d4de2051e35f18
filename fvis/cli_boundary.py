"""The one error boundary of the CLI: domain errors become one line, a hint and their exit
code; bugs a traceback and 70; Ctrl-C, SIGTERM and a closed pipe exit as a shell expects."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from fvis.errors import ExitStatus, FvisError

F = TypeVar("F", bound=Callable[..., Any])


def _debug(ctx: typer.Context | None) -> bool:
    flag = bool(ctx and ctx.find_root().meta.get("fvis.debug"))
    return flag or os.environ.get("FVIS_DEBUG", "") not in ("", "0")


def boundary(func: F) -> F:
    """Map domain errors to one line + hint + exit code; bugs to a traceback and 70."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = kwargs.get("ctx")  # every command takes the typer context first
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning
                return func(*args, **kwargs)
        except FvisError as exc:
            if _debug(ctx):
                traceback.print_exc()
            say_error(exc.message, exc.hint)
            raise typer.Exit(int(exc.exit_status)) from None
        except KeyboardInterrupt as exc:
            terminated = type(exc).__name__ == "Terminated"
            say_error("terminated" if terminated else "interrupted")
            status = ExitStatus.TERMINATED if terminated else ExitStatus.INTERRUPTED
            raise typer.Exit(int(status)) from None
        except typer.Exit:
            raise
        except BrokenPipeError:
            # `fvis layers | head`: the reader went away; exit like a shell does on SIGPIPE.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise typer.Exit(int(ExitStatus.BROKEN_PIPE)) from None
        except Exception:
            traceback.print_exc()
            say_error(
                "internal error: this is a bug in fvis", "please report it with the traceback above"
            )
            raise typer.Exit(int(ExitStatus.INTERNAL)) from None

    return wrapper  # type: ignore[return-value]


def _show_warning(message: Any, category: type[Warning], *_args: Any, **_kwargs: Any) -> None:
    """fvis's own warnings (``--trust``) as one line; others as Python prints them."""
    from fvis.trust import TrustWarning

    if issubclass(category, TrustWarning):
        say_note(f"warning: {message}")
    else:
        sys.stderr.write(warnings.formatwarning(message, category, *_args[:2]))


def say_error(message: str, hint: str | None = None) -> None:
    from fvis.text import for_terminal_plain

    sys.stderr.write(f"fvis: error: {for_terminal_plain(message)}\n")
    if hint:
        sys.stderr.write(f"hint: {for_terminal_plain(hint)}\n")


def say_note(message: str) -> None:
    from fvis.text import for_terminal_plain

    sys.stderr.write(f"fvis: {for_terminal_plain(message)}\n")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process was so cleanup runs as for Ctrl-C."""


@contextlib.contextmanager
def terminate_as_interrupt() -> Any:
    import signal

    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. some test runners)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
