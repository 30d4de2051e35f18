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
    notes = ("fvis: model", "fvis: no model given")  # fvis's own one-line notes
    lines = [line for line in stderr.splitlines() if line and not line.startswith(notes)]
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


# --------------------------------------------------------------------------- A2: shared storage


class Tied(nn.Module):
    """600 one-element parameters, all views of one 8 MB storage."""

    def __init__(self, base: torch.Tensor | None = None) -> None:
        super().__init__()
        base = torch.zeros(2 << 20) if base is None else base
        for i in range(600):
            self.register_parameter(f"p{i}", nn.Parameter(base[i : i + 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.p0


ARCH_FILE = """
import torch
from torch import nn

class Small(nn.Module):
    def __init__(self):
        super().__init__()
        for i in range(600):
            self.register_parameter(f"p{i}", nn.Parameter(torch.zeros(1)))

    def forward(self, x):
        return x * self.p0
"""


def test_storage_shared_by_600_tensors_is_read_once(tmp_path: Path) -> None:
    path = tmp_path / "tied.pt"
    torch.save(Tied(), path)
    assert path.stat().st_size < 9 << 20  # torch stores the storage once
    (tmp_path / "arch.py").write_text(ARCH_FILE)
    args = ["dump", str(path), "--arch", "arch.py:Small", "--shape", "1,1", "--out", "o"]
    code, stderr = run_capped(args, tmp_path)
    assert code == 0, stderr  # was 600 copies: 4.8 GB, past the cap


# --------------------------------------------------------------------------- A3: synthesized


@pytest.mark.parametrize(
    "layer",
    [nn.Conv2d(80_000, 1, 1, bias=False), nn.Linear(1, 1)],
    ids=["in_channels", "in_features"],
)
def test_synthesized_input_obeys_the_shape_cap(tmp_path: Path, layer: nn.Module) -> None:
    if isinstance(layer, nn.Linear):
        layer.in_features = 4_000_000_000  # an attribute the file sets; the weight stays small
    path = tmp_path / "wide.pt"
    torch.save(nn.Sequential(layer), path)
    code, stderr = run_capped(["dump", str(path), "--out", "o"], tmp_path)  # was 16 GB
    assert code == ExitStatus.MODEL_INPUT, stderr
    assert_one_line(stderr, "synthesized", "elements")
    assert "--shape" in stderr and not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- A4: constructors


class _Constructs:
    def __init__(self, *args: int) -> None:
        self.args = args

    def __reduce__(self) -> tuple[object, tuple[int, ...]]:
        return (nn.Linear, self.args)


def test_constructor_called_with_huge_sizes_is_refused_before_allocating(tmp_path: Path) -> None:
    path = tmp_path / "ctor.pt"
    torch.save({"model": _Constructs(70_000, 70_000)}, path)  # ~20 GB of weight
    assert path.stat().st_size < 4096
    code, stderr = run_capped(["dump", str(path), "--shape", "1,2", "--out", "o"], tmp_path)
    assert code == ExitStatus.BAD_FILE, stderr
    assert_one_line(stderr, "ctor.pt", "Linear(70000, 70000)", "would allocate")


def test_small_constructor_calls_are_not_refused(tmp_path: Path) -> None:
    from fvis.budgets import check_constructor_calls

    path = tmp_path / "small.pt"
    path.write_bytes(b"x" * 100)
    check_constructor_calls(path, [("torch.nn.modules.linear.Linear", (64, 64))], [nn.Linear])
    with pytest.raises(Exception, match="more than the 1,000"):
        calls = [("torch.nn.modules.linear.Linear", (64, 64))]
        check_constructor_calls(path, calls, [nn.Linear], max_model_bytes=1000)


# --------------------------------------------------------------------------- A5: images


def _huge_png(path: Path, width: int, height: int) -> Path:
    """A valid, highly compressible RGB PNG of ``width`` x ``height`` (all black)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    raw = zlib.compress((b"\x00" + b"\x00" * 3 * width) * height, 9)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")
    path.write_bytes(png)
    return path


def test_huge_image_is_refused_before_decoding_under_a_memory_cap(tmp_path: Path) -> None:
    image = _huge_png(tmp_path / "big.png", 8000, 8000)
    assert image.stat().st_size < 300_000
    code, stderr = run_capped(["dump", "--input", str(image), "--out", "o"], tmp_path)
    assert code == ExitStatus.BAD_FILE, stderr
    assert_one_line(stderr, "big.png", "8000x8000")
    assert "--max-input-pixels" in stderr


def test_max_input_pixels_flag_lowers_and_raises_the_cap(tmp_path: Path, cli: object) -> None:
    from fvis.inputs import InputOptions, load_input_file

    image = _huge_png(tmp_path / "small.png", 64, 64)
    args = ["layers", "--input", image, "--max-input-pixels", "4000"]
    code, _out, stderr = cli(*args)  # type: ignore[operator]
    assert code == ExitStatus.BAD_FILE and "64x64" in stderr, stderr
    tensor, _note, _display = load_input_file(image, InputOptions(max_pixels=4096), 3)
    assert tuple(tensor.shape) == (1, 3, 64, 64)


# --------------------------------------------------------------------------- C: other tracebacks


def test_baseline_without_captures_is_a_bad_file(tmp_path: Path, cli: object) -> None:
    baseline = tmp_path / "base.json"
    baseline.write_text(json.dumps({"schema": "fvis.baseline/1", "input": "x", "mode": "grad"}))
    code, _out, stderr = cli("check", "--baseline", baseline)  # type: ignore[operator]
    assert code == ExitStatus.BAD_FILE, stderr
    assert_one_line(stderr, "base.json", "captures")


def test_deep_arch_kwargs_json_is_a_usage_error(tmp_path: Path, cli: object) -> None:
    deep = '{"a": ' + "[" * 60_000 + "]" * 60_000 + "}"
    code, _out, stderr = cli("layers", "--arch-kwargs", deep)  # type: ignore[operator]
    assert code == ExitStatus.USAGE, stderr
    assert_one_line(stderr, "--arch-kwargs")
    shallow_but_deep = '{"a": ' + "[" * 100 + "]" * 100 + "}"
    code, _out, stderr = cli("layers", "--arch-kwargs", shallow_but_deep)  # type: ignore[operator]
    assert code == ExitStatus.USAGE and "nested more than" in stderr, stderr


@pytest.mark.parametrize("depth", [60_000, 100], ids=["toml-recursion", "too-deep"])
def test_deep_pyproject_values_are_a_usage_error(chdir: Path, cli: object, depth: int) -> None:
    value = "[" * depth + "]" * depth
    (chdir / "pyproject.toml").write_text(
        f'[tool.fvis]\nmodel = "m.pt"\narch-kwargs = {{a = {value}}}\n'
    )
    code, _out, stderr = cli("layers")  # type: ignore[operator]
    assert code == ExitStatus.USAGE, stderr
    assert_one_line(stderr, "pyproject.toml")


def test_deeply_nested_training_dict_is_a_bad_file(tmp_path: Path, cli: object) -> None:
    nested: dict[str, object] = {"epoch": 1}
    for _ in range(3000):
        nested = {"model": nested}
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)  # pickling itself recurses per level
    try:
        torch.save(nested, tmp_path / "nested.pt")
    finally:
        sys.setrecursionlimit(limit)
    code, _out, stderr = cli("layers", tmp_path / "nested.pt")  # type: ignore[operator]
    assert code == ExitStatus.BAD_FILE, stderr
    assert_one_line(stderr, "nested.pt")
