"""fvis.output and the dump command's output folder: atomic writes, the manifest, refusal rules,
and what a full disk, SIGTERM and Ctrl-C leave behind (exit codes 6, 143, 130)."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest
import torch
from torch import nn

import fvis.output
from fvis.api import DumpOptions, ModelRef, dump
from fvis.errors import ExitStatus, OutputError
from fvis.inputs import InputOptions
from fvis.output import MANIFEST, MANIFEST_SCHEMA, OutputDir


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CLI runs use the bundled default model: run in an empty folder (no pyproject.toml)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FVIS_DEBUG", raising=False)


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file in ``folder`` (hidden ones included) and its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _temps(folder: Path) -> list[str]:
    if not folder.exists():  # a failed run removes the --out folder it created
        return []
    return [p.name for p in folder.iterdir() if p.name.endswith(".fvis-tmp")]


def _manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST).read_text())


def _dump(cli: Any, out: Path, *args: str) -> tuple[int, str, str]:
    return cli("dump", "--layer", "inner.relu", *args, "--out", out)


# --------------------------------------------------------------------------- refusals


def test_out_is_an_existing_file(cli: Any, tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.write_bytes(b"mine")
    code, stdout, stderr = _dump(cli, target)
    assert code == ExitStatus.OUTPUT == 6
    assert "is a file, not a folder" in stderr and stderr.count("fvis: error:") == 1
    assert target.read_bytes() == b"mine" and stdout == ""


def test_out_under_a_file_cannot_be_created(cli: Any, tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    code, _, stderr = _dump(cli, tmp_path / "file" / "sub")
    assert code == ExitStatus.OUTPUT and "cannot create --out" in stderr
    assert "Traceback" not in stderr


def test_folder_with_foreign_file_is_refused(cli: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_bytes(b"my notes\x00\xff")
    before = _snapshot(out)
    code, _, stderr = _dump(cli, out)
    assert code == ExitStatus.OUTPUT
    assert "1 files fvis did not write (notes.txt)" in stderr
    assert "hint:" in stderr and "--overwrite" in stderr
    assert _snapshot(out) == before


def test_overwrite_replaces_only_manifest_files(cli: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _dump(cli, out, "--seed", "1")[0] == 0
    first = _snapshot(out)
    (out / "notes.txt").write_bytes(b"keep me")
    code, _, stderr = _dump(cli, out, "--seed", "2")
    assert code == ExitStatus.OUTPUT, "a foreign file without --overwrite is refused"
    code, _, stderr = _dump(cli, out, "--seed", "2", "--overwrite")
    assert code == 0, stderr
    second = _snapshot(out)
    assert second["notes.txt"] == b"keep me"
    assert set(second) == set(first) | {"notes.txt"}
    assert second["report.json"] != first["report.json"]  # replaced: new seed, new values
    assert "notes.txt" not in _manifest(out)["files"]


def test_clash_with_a_foreign_file_is_refused_before_writing(cli: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "inner.relu.png").write_bytes(b"not fvis's picture")
    before = _snapshot(out)
    code, _, stderr = _dump(cli, out, "--overwrite")
    assert code == ExitStatus.OUTPUT
    assert "inner.relu.png exists and was not written by fvis" in stderr
    assert _snapshot(out) == before  # nothing written: no report, no manifest, no temp


def test_rerun_into_fvis_folder_replaces_and_removes_stale(cli: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, _, stderr = cli("dump", "--layer", "inner.linear", "--layer", "inner.relu", "-o", out)
    assert code == 0, stderr
    assert (out / "inner.linear.png").exists()
    code, _, stderr = _dump(cli, out)  # no --overwrite needed: every file is fvis's
    assert code == 0, stderr
    assert not (out / "inner.linear.png").exists()
    on_disk = sorted(p.name for p in out.iterdir() if p.name != MANIFEST)
    assert _manifest(out)["files"] == on_disk
    assert {"inner.relu.png", "report.json"} <= set(on_disk)
    assert [n for n in on_disk if n.endswith(".png")] == ["inner.relu.png"]


def test_stale_entry_naming_a_foreign_path_is_not_deleted(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "outside.txt").write_bytes(b"precious")
    (out / MANIFEST).write_text(json.dumps({"files": ["../outside.txt", "..", "old.png"]}))
    (out / "old.png").write_bytes(b"old")
    folder = OutputDir.open(out)
    folder.write_bytes("new.png", b"new")
    folder.commit()
    assert (tmp_path / "outside.txt").read_bytes() == b"precious"
    assert not (out / "old.png").exists()
    assert _manifest(out)["files"] == ["new.png"]


# --------------------------------------------------------------------------- atomic writes


def test_writer_that_raises_leaves_no_temp_and_no_partial_target(tmp_path: Path) -> None:
    out = tmp_path / "out"
    folder = OutputDir.open(out)
    folder.write_bytes("a.png", b"complete old picture")
    folder.commit()

    def half_then_fail(fh: IO[bytes]) -> None:
        fh.write(b"partial")
        raise ValueError("renderer broke")

    folder = OutputDir.open(out)
    with pytest.raises(ValueError, match="renderer broke"):
        folder.write("a.png", half_then_fail)
    with pytest.raises(ValueError):
        folder.write("b.png", half_then_fail)
    assert _temps(out) == []
    assert (out / "a.png").read_bytes() == b"complete old picture"
    assert not (out / "b.png").exists()
    assert folder.written == []


def test_writer_os_error_becomes_output_error(tmp_path: Path) -> None:
    folder = OutputDir.open(tmp_path / "out")

    def no_space(fh: IO[bytes]) -> None:
        fh.write(b"x")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match="No space left on device"):
        folder.write("x.png", no_space)
    assert _temps(tmp_path / "out") == [] and not (tmp_path / "out" / "x.png").exists()


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "a\\b", MANIFEST])
def test_write_refuses_names_that_are_not_plain_files(tmp_path: Path, name: str) -> None:
    folder = OutputDir.open(tmp_path / "out")
    with pytest.raises(OutputError, match="not a plain file name"):
        folder.write_bytes(name, b"x")
    assert list((tmp_path / "out").iterdir()) == []


def test_temp_files_of_a_crashed_run_are_not_foreign(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / ".report.json.abc123.fvis-tmp").write_bytes(b"half")
    OutputDir.open(out)  # not refused


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_permissions_follow_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    previous = os.umask(umask)
    try:
        folder = OutputDir.open(tmp_path / "out")
        folder.write_bytes("a.png", b"x")
        manifest = folder.commit()
        path = folder.root / "a.png"
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert stat.S_IMODE(manifest.stat().st_mode) == mode


def test_manifest_written_last_and_lists_every_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    order: list[str] = []
    real_replace = os.replace

    def spy(src: Any, dst: Any) -> None:
        order.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(fvis.output.os, "replace", spy)
    out = tmp_path / "out"
    result = dump(
        ModelRef(None),
        InputOptions(shape=(1, 10)),
        DumpOptions(all_leaves=True, save_tensors=True),
        out,
    )
    assert order[-1] == MANIFEST and order.count(MANIFEST) == 1
    manifest = _manifest(out)
    assert manifest["schema"] == MANIFEST_SCHEMA and manifest["report"] == "report.json"
    on_disk = sorted(p.name for p in out.iterdir() if p.name != MANIFEST)
    assert manifest["files"] == on_disk == sorted(result.files) == sorted(order[:-1])
    assert "activations.safetensors" in on_disk


# --------------------------------------------------------------------------- failures mid-run


def _fail_on(name: str) -> Callable[..., Any]:
    """An ``OutputDir.write`` that runs out of disk space while writing ``name``."""
    real_write = OutputDir.write

    def write(self: OutputDir, target: str, writer: Callable[[IO[bytes]], object]) -> Path:
        if target != name:
            return real_write(self, target, writer)

        def disk_full(fh: IO[bytes]) -> None:
            fh.write(b"half a report")
            raise OSError(errno.ENOSPC, "No space left on device")

        return real_write(self, target, disk_full)

    return write


def test_disk_full_while_writing_is_exit_6_without_temp_or_partial_files(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(OutputDir, "write", _fail_on("report.md"))
    out = tmp_path / "out"
    code, _, stderr = _dump(cli, out)
    assert code == ExitStatus.OUTPUT
    assert "No space left on device" in stderr and "Traceback" not in stderr
    assert _temps(out) == []
    assert not (out / "report.md").exists() and not (out / MANIFEST).exists()


def test_disk_full_while_writing_leaves_nothing_new(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(OutputDir, "write", _fail_on("report.md"))
        assert _dump(cli, out)[0] == ExitStatus.OUTPUT
    assert not out.exists()  # the folder this run created is gone again: nothing new is left
    assert _dump(cli, out)[0] == 0  # and the rerun works


FVIS = (sys.executable, "-m", "fvis")


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "FVIS_DEBUG"}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def test_full_disk_in_subprocess_exits_6_and_leaves_no_temp(tmp_path: Path) -> None:
    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))

    out = tmp_path / "out"
    proc = subprocess.run(
        [*FVIS, "dump", "--layer", "inner.relu", "--out", str(out)],
        cwd=tmp_path,
        env=_child_env(),
        preexec_fn=limit_file_size,
        capture_output=True,
        text=True,
        timeout=120,
    )
    leftovers = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert proc.returncode == ExitStatus.OUTPUT, (proc.returncode, proc.stderr[-500:])
    assert "Traceback" not in proc.stderr
    assert [n for n in leftovers if n.endswith(".fvis-tmp")] == []
    assert leftovers == []


SLOW_ARCH = """
import sys
import time

from torch import nn


class Slow(nn.Module):
    def forward(self, x):
        sys.stderr.write("FORWARD-STARTED\\n")
        sys.stderr.flush()
        time.sleep(30)  # interrupted by the test's signal long before this ends
        return x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.slow = Slow()

    def forward(self, x):
        return self.slow(self.linear(x))


def build():
    return Net()
"""


@pytest.fixture
def slow_model(tmp_path: Path) -> tuple[Path, Path]:
    arch = tmp_path / "slow_arch.py"
    arch.write_text(SLOW_ARCH)
    weights = tmp_path / "slow.pt"
    torch.save({f"linear.{k}": v for k, v in nn.Linear(4, 4).state_dict().items()}, weights)
    return arch, weights


@pytest.mark.parametrize(
    ("sig", "code", "word"),
    [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")],
)
def test_signal_mid_run_exits_cleanly(
    cli: Any,
    tmp_path: Path,
    slow_model: tuple[Path, Path],
    sig: signal.Signals,
    code: int,
    word: str,
) -> None:
    arch, weights = slow_model
    out = tmp_path / "out"
    assert _dump(cli, out)[0] == 0  # a previous run's files must survive untouched
    before = _snapshot(out)
    proc = subprocess.Popen(
        [*FVIS, "dump", str(weights), "--arch", f"{arch}:build", "--all", "--out", str(out)],
        cwd=tmp_path,
        env=_child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:  # blocks until the forward has started: no sleeps
            lines.append(line)
            if "FORWARD-STARTED" in line:
                break
        else:
            pytest.fail(f"fvis exited before the forward: {''.join(lines)}")
        proc.send_signal(sig)
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, rest
    assert rest.strip() == f"fvis: error: {word}"
    assert _temps(out) == []
    assert _snapshot(out) == before
