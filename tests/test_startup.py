"""Start-up cost: the CLI shell imports no torch until a command needs it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FVIS_DEBUG": ""}
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
        check=False,
    )


def test_importing_the_cli_does_not_import_torch() -> None:
    result = python("-c", "import fvis.cli, sys; print('torch' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_importing_the_package_does_not_import_torch() -> None:
    code = "import fvis, sys; fvis.__all__; print('torch' in sys.modules, 'numpy' in sys.modules)"
    result = python("-c", code)
    assert result.stdout.strip() == "False False", result.stderr


def test_help_is_fast() -> None:
    python("-m", "fvis", "--help")  # warm the bytecode cache: only a cold disk is slower
    start = time.perf_counter()
    result = python("-m", "fvis", "--help")
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert "layers" in result.stdout and "Exit codes" in result.stdout
    assert elapsed < 2.0, f"fvis --help took {elapsed:.2f} s"


HELP_WRAPPER = """
import sys
from fvis.cli import main
sys.argv = ["fvis", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
heavy = sorted(m for m in ("torch", "numpy", "PIL", "safetensors") if m in sys.modules)
print("HEAVY:" + ",".join(heavy), "EXIT:" + str(code), file=sys.stderr)
"""


def test_layers_help_does_not_import_torch() -> None:
    result = python("-c", HELP_WRAPPER, "layers", "--help")
    assert "--arch" in result.stdout and "--json" in result.stdout
    assert "HEAVY: EXIT:0" in result.stderr, result.stderr


def test_layers_help_importtime_has_no_torch() -> None:
    result = python("-X", "importtime", "-m", "fvis", "layers", "--help")
    assert result.returncode == 0
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
    assert "typer" in imported  # the import log is really there
    assert not {"torch", "numpy", "PIL"} & imported
