"""Resource bombs, quadratic work and deep or cyclic structures: small files must end in a
one-line error with the documented exit code, never exhaust memory or CPU, never a traceback.

The memory tests run the real CLI in a child process under ``RLIMIT_AS`` (3 GiB), so a
regression fails with a ``MemoryError`` traceback (or the kernel's refusal) instead of
swapping the machine. Timing lives in ``benchmarks/bombs.py``; the tests here count work.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from fvis import inert
from fvis.errors import ExitStatus
from fvis.layers import ModuleNode, TensorMeta, walk

MEMORY_CAP = 3 << 30
REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- helpers


def run_capped(args: list[str], cwd: Path, timeout: float = 120) -> tuple[int, str]:
    """``python -m fvis ARGS`` in a child limited to MEMORY_CAP of address space."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("FVIS_DEBUG", None)
    done = subprocess.run(
        [sys.executable, "-m", "fvis", *args],
        cwd=cwd,
        env=env,
        preexec_fn=limit,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done.returncode, done.stderr


def assert_one_line(stderr: str, *words: str) -> None:
    """The contract: one ``fvis: error:`` line (and at most a hint), no traceback."""
    lines = [line for line in stderr.splitlines() if line and not line.startswith("fvis: model")]
    assert "Traceback" not in stderr, stderr
    assert lines and lines[0].startswith("fvis: error:"), stderr
    assert len(lines) <= 2 and all(line.startswith("hint:") for line in lines[1:]), stderr
    for word in words:
        assert word in lines[0], stderr


def legacy_file(path: Path, body: bytes) -> Path:
    """A legacy (non-zip) torch file: magic number, protocol, sys info, then ``body``."""
    header = [
        0x1950A86A20F9469CFC6C,
        1001,
        {"protocol_version": 1001, "little_endian": True, "type_sizes": {"int": 4}},
    ]
    path.write_bytes(b"".join(pickle.dumps(h, protocol=2) for h in header) + body)
    return path


def rewrite_pickle(src: Path, dst: Path, old: bytes, new: bytes) -> Path:
    """Copy a torch zip checkpoint with the first ``old`` in its data.pkl replaced."""
    with zipfile.ZipFile(src) as archive, zipfile.ZipFile(dst, "w") as out:
        for info in archive.infolist():
            data = archive.read(info)
            if info.filename.endswith("data.pkl"):
                assert old in data
                data = data.replace(old, new, 1)
            out.writestr(info, data)
    return dst


def _ops(value: object) -> bytes:
    """The opcodes that push ``value`` (no protocol header, memo or STOP)."""
    data = pickle.dumps(value, protocol=2)
    return data[2:].rsplit(b"q\x00", 1)[0] if b"q\x00" in data else data[2:-1]


# --------------------------------------------------------------------------- A1: op count


def test_legacy_empty_set_bomb_is_refused_under_a_memory_cap(tmp_path: Path) -> None:
    # 10 MB of EMPTY_SET: ~2.4 GB of sets if the reader built them all.
    bomb = legacy_file(tmp_path / "bomb.pt", b"\x80\x02" + b"\x8f" * 10_000_000 + b".")
    code, stderr = run_capped(["layers", str(bomb)], tmp_path)
    assert code == ExitStatus.BAD_FILE, stderr
    assert_one_line(stderr, "bomb.pt", "operations")


def test_memoized_list_copied_by_many_calls_is_refused(tmp_path: Path) -> None:
    # list(big) REDUCEd 1000 times from the memo: 4 bytes of pickle per 1M-item copy (8 GB).
    big = b"](" + b"K\x00" * 1_000_000 + b"er\x01\x00\x00\x000"
    ctor = b"cbuiltins\nlist\nr\x02\x00\x00\x000"
    calls = b"](" + b"h\x02h\x01\x85R" * 1000 + b"e."
    bomb = legacy_file(tmp_path / "copies.pt", b"\x80\x02" + big + ctor + calls)
    code, stderr = run_capped(["layers", str(bomb)], tmp_path)
    assert code == ExitStatus.BAD_FILE, stderr
    assert_one_line(stderr, "copies.pt", "resource bomb")


def test_a_real_checkpoint_stays_well_below_the_op_cap(tmp_path: Path) -> None:
    """The cap leaves room: 20k tensors take ~600k operations, a seventh of it."""
    state = OrderedDict((f"layer{i}.weight", torch.zeros(2)) for i in range(20_000))
    path = tmp_path / "many.pt"
    torch.save(state, path)
    loaded = inert.read_zip_pickle(path, "many/")
    assert len(inert.fake_tensors(loaded.obj) or {}) == 20_000


# --------------------------------------------------------------------------- C: shapes


@pytest.mark.parametrize(
    ("dims", "word"),
    [((20, 10**300), "impossible shape"), ((2, -5), "impossible shape")],
    ids=["huge", "negative"],
)
def test_impossible_tensor_shapes_are_a_bad_file(
    tmp_path: Path, cli: object, dims: tuple[int, ...], word: str
) -> None:
    good = tmp_path / "good.pt"
    torch.save({"weight": torch.zeros(2, 3)}, good)
    bad = rewrite_pickle(good, tmp_path / "bad.pt", _ops((2, 3)), _ops(dims))
    code, _out, stderr = cli("layers", bad)  # type: ignore[operator]
    assert code == ExitStatus.BAD_FILE, stderr
    assert_one_line(stderr, "bad.pt", word)
    assert "parameters" not in _out


# --------------------------------------------------------------------------- C: module trees


def test_module_that_is_its_own_child_is_a_bad_file(tmp_path: Path, cli: object) -> None:
    loop = nn.Sequential(nn.Linear(2, 2))
    loop._modules["again"] = loop
    path = tmp_path / "loop.pt"
    torch.save(loop, path)
    for command in (["layers", path], ["dump", path, "--shape", "1,2", "--out", tmp_path / "o"]):
        code, _out, stderr = cli(*command)  # type: ignore[operator]
        assert code == ExitStatus.BAD_FILE, stderr
        assert_one_line(stderr, "loop.pt", "contains itself")
    assert not (tmp_path / "o").exists()


def _deep(levels: int) -> nn.Module:
    root = inner = nn.Sequential()
    for _ in range(levels):
        child = nn.Sequential()
        inner.append(child)
        inner = child
    inner.append(nn.Linear(2, 2))
    return root


def _save_deep(path: Path, levels: int) -> Path:
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)  # pickling itself recurses per level
    try:
        torch.save(_deep(levels), path)
    finally:
        sys.setrecursionlimit(limit)
    return path


def test_modules_nested_600_deep_are_a_bad_file(tmp_path: Path, cli: object) -> None:
    path = _save_deep(tmp_path / "deep.pt", 600)
    for command in (["layers", path], ["dump", path, "--shape", "1,2", "--out", tmp_path / "o"]):
        code, _out, stderr = cli(*command)  # type: ignore[operator]
        assert code == ExitStatus.BAD_FILE, stderr
        assert_one_line(stderr, "deep.pt", "nested more than")


def test_modules_nested_to_the_limit_are_listed(tmp_path: Path, cli: object) -> None:
    path = _save_deep(tmp_path / "deep.pt", inert.MAX_MODULE_DEPTH - 1)
    code, out, stderr = cli("layers", path, "--json")  # type: ignore[operator]
    assert code == 0, stderr
    assert max(row["depth"] for row in json.loads(out)["layers"]) == inert.MAX_MODULE_DEPTH


# --------------------------------------------------------------------------- B1: TorchScript


def test_buffers_regex_matches_only_its_own_line() -> None:
    # A leading "\s+" spanning blank lines made every blank line a new, failing attempt that
    # scanned all the following ones (200k blank lines: minutes). See benchmarks/bombs.py.
    text = "class A(Module):\n" + "\n" * 50 + '  __buffers__ = ["running_mean", ]\n'
    found = inert._BUFFERS_RE.search(text)
    assert found is not None and found.group(1) == '"running_mean", '
    assert found.start() == text.index("  __buffers__")
    unclosed = 'class B(Module):\n  __buffers__ = ["a",\n  x = "]"\n'
    assert inert._BUFFERS_RE.search(unclosed) is None


# --------------------------------------------------------------------------- B2: alias trees


class _CountingChildren(tuple):  # type: ignore[type-arg]
    """A ``children`` tuple that counts how often it is iterated."""

    visits = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        _CountingChildren.visits += 1
        return super().__iter__()


def _alias_tree(levels: int, names: int) -> tuple[ModuleNode, int]:
    """Each level one module referenced under ``names`` names by the level above."""
    weight = TensorMeta("weight", (3,), "float32")
    node = ModuleNode("Leaf", 0, (weight,))
    for key in range(1, levels + 1):
        children = _CountingChildren((f"n{i}", node) for i in range(names))
        node = ModuleNode("Level", key, (weight,), children)
    return node, levels + 1


def test_walk_visits_each_module_a_bounded_number_of_times() -> None:
    root, unique = _alias_tree(levels=60, names=200)
    _CountingChildren.visits = 0
    rows = list(walk(root))
    assert len(rows) == 1 + 60 * 200  # each level's subtree only under its first name
    assert rows[0].params == 3 * unique  # each module counted once
    assert _CountingChildren.visits <= 8 * unique  # was once per name per module below it


def test_shared_module_rows_keep_a_bounded_alias_list() -> None:
    root, _ = _alias_tree(levels=1, names=5000)
    rows = list(walk(root))
    assert {row.alias_count for row in rows[1:]} == {4999}
    assert max(len(row.aliases) for row in rows) <= 32
