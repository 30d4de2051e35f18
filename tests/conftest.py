"""Shared fixtures: the sample zoo built once per session, a CLI runner, an empty cwd."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from typer.testing import CliRunner

# (exit code, stdout, stderr)
CliResult = tuple[int, str, str]
RunCli = Callable[..., CliResult]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every sample in every checkpoint format, built once per session (about 4 s).

    Tests must treat these files as read-only: copy one into ``tmp_path`` to change it.
    """
    from sample_models.build import build_all

    out = tmp_path_factory.mktemp("zoo")
    build_all(out, None, echo=lambda _line: None)
    return out


@pytest.fixture
def cli() -> RunCli:
    """Run ``fvis.cli.app`` in-process; returns ``(exit_code, stdout, stderr)``.

    typer 0.29's ``CliRunner`` keeps stdout and stderr apart by default (no ``mix_stderr``).
    ``FVIS_DEBUG`` is removed so a developer's environment cannot add tracebacks.
    """
    from fvis.cli import app

    def run(*args: str | Path, env: Mapping[str, str | None] | None = None) -> CliResult:
        runner = CliRunner(env={"FVIS_DEBUG": None, **(env or {})})
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr

    return run


@pytest.fixture
def chdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty ``tmp_path`` (no pyproject.toml), so the bundled default is used."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
