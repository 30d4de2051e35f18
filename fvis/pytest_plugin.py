"""fvis's pytest plugin (entry point ``pytest11``): a fixture and a ``--fvis`` run.

- The fixture ``fvis_check(model, inputs, **options)`` runs ``fvis check``'s gates on a live
  model inside a test and fails it with the ``FAIL`` lines as the message.
- ``pytest --fvis`` adds one test item that runs the project's ``[tool.fvis]`` check (the
  ``fvis check`` command with no arguments, in the rootdir) and fails with its ``FAIL`` lines;
  each (layer, gate) case of ``fvis check --junit`` is attached to the item as a property, and
  ``--fvis-junit PATH`` keeps that JUnit file.

Loaded in every pytest session where fvis is installed, so it imports nothing heavy until used.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fvis")
    group.addoption(
        "--fvis",
        action="store_true",
        help="Run the [tool.fvis] check of pyproject.toml as one test item.",
    )
    group.addoption("--fvis-junit", metavar="PATH", help="Keep that check's JUnit XML here.")
    parser.addini("fvis_args", "Extra arguments for the --fvis check (e.g. --fail-on ...).", "args")


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    if config.getoption("fvis"):
        items.append(FvisCheckItem.from_parent(session, name="fvis check [tool.fvis]"))


class FvisCheckItem(pytest.Item):
    """The project's ``fvis check``, as a test."""

    def runtest(self) -> None:
        junit = self.config.getoption("fvis_junit")
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(junit) if junit else Path(scratch) / "fvis-junit.xml"
            args = [*self.config.getini("fvis_args")]
            completed = _run_check(Path(self.config.rootpath), path, args)
            cases = _junit_cases(path) if path.is_file() else []
        for name, failure in cases:
            self.user_properties.append((name, failure or "passed"))
        if completed.returncode == 0:
            return
        fails = [line for line in completed.stdout.splitlines() if line.startswith("FAIL ")]
        message = "\n".join(fails) or (completed.stderr.strip() or completed.stdout.strip())
        raise FvisCheckFailed(message)

    def repr_failure(self, excinfo: Any, style: Any = None) -> str:
        if isinstance(excinfo.value, FvisCheckFailed):
            return str(excinfo.value)
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Path, int, str]:
        return Path(self.config.rootpath) / "pyproject.toml", 0, self.name


class FvisCheckFailed(AssertionError):
    """The check failed: the message is its FAIL lines (or its one-line error)."""


def _run_check(root: Path, junit: Path, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """``fvis check`` in a fresh process in the rootdir, exactly as CI would run it."""
    command = [sys.executable, "-m", "fvis", "check", "--junit", str(junit), *args]
    return subprocess.run(command, cwd=root, capture_output=True, text=True, check=False)


def _junit_cases(path: Path) -> list[tuple[str, str | None]]:
    """(case name, failure message or None) for every case of a JUnit file."""
    cases = []
    for case in ET.parse(path).iter("testcase"):
        failure = case.find("failure")
        cases.append(
            (str(case.get("name")), failure.get("message") if failure is not None else None)
        )
    return cases


@pytest.fixture
def fvis_check() -> Iterator[Callable[..., Any]]:
    """``fvis_check(model, inputs, layers=(), fail_on=..., expect=(), mode="grad",
    backward=False)``: fvis check's gates on a live model; fails the test with the FAIL lines.

    >>> def test_head_is_connected(fvis_check):                      # doctest: +SKIP
    ...     fvis_check(model, [torch.randn(1, 3, 64, 64)], layers=["head"])
    """

    def run(
        model: Any,
        inputs: Any,
        layers: Sequence[str] = (),
        fail_on: str | None = None,
        expect: Sequence[str] = (),
        mode: str = "grad",
        backward: bool = False,
    ) -> Any:
        from fvis.api import CheckOptions, DumpOptions, check_module
        from fvis.gates import DEFAULT_GATES, parse_expectations, parse_gates

        gates = CheckOptions(
            gates=parse_gates(fail_on or DEFAULT_GATES),
            expectations=parse_expectations(tuple(expect)),
        )
        options = DumpOptions(layers=tuple(layers), mode=mode, images=False, backward=backward)
        result = check_module(model, inputs, options, gates)
        if not result.passed:
            lines = [f"FAIL {failure.line()}" for failure in result.failures]
            pytest.fail("\n".join(lines), pytrace=False)
        return result

    yield run
