"""The output folder against a hostile or concurrent world: malformed manifests, symlinks,
a manifest that is a folder, and two runs into one folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import fvis.output
from fvis.errors import ExitStatus, OutputError
from fvis.output import MANIFEST, OutputDir

REPO = Path(__file__).resolve().parents[1]


def _dump(cli: Any, out: Path, *extra: str) -> tuple[int, str, str]:
    return cli("dump", "--shape", "2,10", "--out", out, "--quiet", *extra)


def _listing(folder: Path) -> dict[str, bytes | str]:
    return {
        p.name: (f"-> {os.readlink(p)}" if p.is_symlink() else p.read_bytes())
        for p in sorted(folder.iterdir())
        if p.is_symlink() or p.is_file()
    }


@pytest.mark.parametrize(
    "manifest",
    [
        {"schema": "fvis.manifest/1", "files": "report.json"},  # a string: iterated per char
        {"schema": "fvis.manifest/1", "files": ["r", 3]},
        {"schema": "fvis.manifest/9", "files": ["r"]},
        {"schema": "fvis.manifest/1", "files": ["r\x00"]},
        ["r"],
    ],
    ids=["files-is-a-string", "not-all-strings", "other-schema", "nul-in-name", "not-an-object"],
)
def test_malformed_manifest_deletes_nothing(cli: Any, tmp_path: Path, manifest: object) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "r").write_bytes(b"the user's file")
    (out / MANIFEST).write_text(json.dumps(manifest))
    before = _listing(out)
    for extra in ((), ("--overwrite",)):
        code, _out, stderr = _dump(cli, out, *extra)
        assert code == ExitStatus.OUTPUT, stderr
        assert "Traceback" not in stderr and MANIFEST in stderr and "hint:" in stderr
        assert _listing(out) == before


def test_manifest_that_is_a_folder_leaves_no_temporary(cli: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / MANIFEST).mkdir(parents=True)
    code, _out, stderr = _dump(cli, out, "--overwrite")
    assert code == ExitStatus.OUTPUT, stderr
    assert "not a regular file" in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST]


def test_aside_failure_removes_its_placeholder(tmp_path: Path) -> None:
    folder = OutputDir.open(tmp_path / "out")
    (tmp_path / "out" / "sub").mkdir()
    with pytest.raises(OSError):
        folder._aside("missing")  # nothing to move: the placeholder must go too
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["sub"]
    folder.abort()


@pytest.mark.parametrize("in_manifest", [False, True], ids=["foreign", "listed"])
def test_symlink_named_like_an_fvis_file_is_never_replaced(
    cli: Any, tmp_path: Path, in_manifest: bool
) -> None:
    out = tmp_path / "out"
    assert _dump(cli, out)[0] == 0
    target = tmp_path / "elsewhere.json"  # dangling: exists() is False for the link
    (out / "report.json").unlink()
    (out / "report.json").symlink_to(target)
    if not in_manifest:
        manifest = json.loads((out / MANIFEST).read_text())
        manifest["files"].remove("report.json")
        (out / MANIFEST).write_text(json.dumps(manifest))
    before = _listing(out)
    code, _out, stderr = _dump(cli, out, "--overwrite")
    assert code == ExitStatus.OUTPUT, stderr
    assert "report.json" in stderr and "Traceback" not in stderr
    assert _listing(out) == before and not target.exists()


# --------------------------------------------------------------------------- two processes


def _holder(out: Path, seconds: float, commit: bool) -> subprocess.Popen[str]:
    """A second process that opens ``out`` (taking its lock), waits, then commits or not."""
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from fvis.output import OutputDir\n"
        f"folder = OutputDir.open(Path({str(out)!r}), overwrite=True)\n"
        "print('locked', flush=True)\n"
        f"time.sleep({seconds})\n"
        f"if {commit}:\n"
        "    folder.write_bytes('other.txt', b'from the other run')\n"
        "    folder.commit()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "locked"
    return child


def test_second_run_into_a_busy_folder_fails_cleanly(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(fvis.output, "LOCK_WAIT_S", 0.3)
    child = _holder(out, 30, commit=False)
    try:
        started = time.monotonic()
        code, _out, stderr = _dump(cli, out)
        assert code == ExitStatus.OUTPUT, stderr
        assert "in use by another fvis run" in stderr and "hint:" in stderr
        assert time.monotonic() - started < 10
        assert list(out.iterdir()) == []
    finally:
        child.kill()
        child.wait()
    assert _dump(cli, out)[0] == 0  # the lock died with its process


def test_second_run_waits_for_the_first_and_the_manifest_stays_true(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(fvis.output, "LOCK_WAIT_S", 30)
    child = _holder(out, 1.0, commit=True)
    try:
        code, _out, stderr = _dump(cli, out, "--overwrite")
    finally:
        child.wait(timeout=60)
    assert code == 0, stderr
    listed = set(json.loads((out / MANIFEST).read_text())["files"])
    on_disk = {p.name for p in out.iterdir()} - {MANIFEST}
    # the other run committed first; this one replaced its manifest and removed its file
    assert listed == on_disk and "other.txt" not in on_disk


def test_lock_is_released_by_commit_abort_and_exit(tmp_path: Path) -> None:
    out = tmp_path / "out"
    for finish in ("commit", "abort", "with"):
        if finish == "with":
            with OutputDir.open(out, overwrite=True):
                pass
        else:
            folder = OutputDir.open(out, overwrite=True)
            getattr(folder, finish)()
        OutputDir.open(out, overwrite=True).abort()  # would wait and fail if still held


def test_busy_folder_error_is_an_output_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fvis.output, "LOCK_WAIT_S", 0.1)
    first = OutputDir.open(tmp_path / "out")
    try:
        with pytest.raises(OutputError, match="in use by another fvis run"):
            OutputDir.open(tmp_path / "out")
    finally:
        first.abort()
