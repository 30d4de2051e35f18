"""The bad-input contract (shared/notes/bad-input.md), case by case, through the real CLI.

Every case runs ``fvis`` in-process in an empty working folder whose ``out/`` already holds a
previous fvis run and a file of the user's, then checks all six points of the contract:

1. the documented exit code;
2. stderr is one ``fvis: error:`` line naming the file and the problem, at most one ``hint:``
   line, nothing else but fvis's own one-line notes before it (``fvis: model X from
   pyproject.toml``), no traceback, and no raw ESC byte on either stream;
3. nothing new anywhere: no partial PNG, no ``*.fvis-tmp``, no report, no new folder;
4. every file that was there (the output folder, the inputs, the zoo) is byte-identical;
5. no code from the file ran: payloads ``touch`` a marker in the kit's ``markers/`` folder;
6. ``--trust`` (or ``weights_only=False``) is suggested only where the file really needs it.

Cases that must work (a safetensors file named ``.pt``, RGBA images, ...) assert exit 0, no
error line, the user's file untouched, no temporaries, nothing written outside ``--out``, every
file in ``--out`` listed in fvis's manifest, and no payload run.

Cases that once exposed a bug keep its description in ``fixed_bug`` (all are fixed now; a
new bug would be marked ``xfail(strict=True)`` with a reason starting ``BUG:``).

Every fixture is built at test time, once per module, in ``kit`` (payloads included).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import struct
import sys
import time
import types
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from payloads import (
    ExecPayload,
    OpenForWritingPayload,
    SubprocessPayload,
    SystemPayload,
    TorchExecPayload,
    duplicate_pickle,
    file_openers,
    module_holding,
    swap_pickle,
)
from PIL import Image
from torch import nn
from typer.testing import CliRunner

import fvis.output
from fvis.errors import ExitStatus
from fvis.output import MANIFEST
from fvis.sample import build_sample
from sample_models.zoo import build

OK = ExitStatus.OK
CHECKS_FAILED = ExitStatus.CHECKS_FAILED
USAGE = ExitStatus.USAGE
BAD_FILE = ExitStatus.BAD_FILE
REFUSED = ExitStatus.REFUSED
MODEL_INPUT = ExitStatus.MODEL_INPUT
OUTPUT = ExitStatus.OUTPUT
INTERRUPTED = ExitStatus.INTERRUPTED

IO_ARCH = "fvis.sample:OuterModel"
CNN_ARCH = "sample_models.zoo:Classifier"
USER_FILE = "my-notes.txt"
ESC = "\x1b"
# "weights_only=False", or torch's own prose: "with `weights_only` set to `False`"
UNSAFE_LOAD = re.compile(r"weights_only`?\s*(=|set to)\s*`?False")

# --------------------------------------------------------------------------- payloads

GLOBAL_NAMED = {  # how each payload's global reads in the refusal
    "os.system": "posix.system",
    "builtins.exec": "exec",
    "subprocess.call": "call",
    "torch.fx.exec": "torch.fx.graph_module._exec_with_source",
}
PAYLOADS: dict[str, type] = {
    "os.system": SystemPayload,
    "builtins.exec": ExecPayload,
    "subprocess.call": SubprocessPayload,
    "torch.fx.exec": TorchExecPayload,
}

# --------------------------------------------------------------------------- the kit


@dataclass(frozen=True)
class Kit:
    """Every crafted file, in one folder built once per module."""

    root: Path
    zoo: Path
    markers: Path
    previous: Path  # an output folder holding a previous fvis run and the user's file


ARCH_SOURCE = '''
import torch
from torch import nn


class Small(nn.Module):
    """One 5x5 convolution without padding: inputs under 5x5 pixels cannot pass."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 5)

    def forward(self, x):
        return self.conv(x)


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        raise ValueError("this layer is broken")


class Explodes(nn.Module):
    """``stem`` runs, then ``inner`` raises."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(10, 4)
        self.inner = Broken()

    def forward(self, x):
        return self.inner(self.stem(x))


class Wide(nn.Module):
    """A 1x1 convolution to 4096 channels."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4096, 1)

    def forward(self, x):
        return self.conv(x)


NOT_CALLABLE = 3
'''


def _save(obj: Any, path: Path, **kwargs: Any) -> Path:
    torch.save(obj, path, **kwargs)
    return path


def _zip_entries(path: Path) -> list[tuple[str, bytes, int]]:
    with zipfile.ZipFile(path) as archive:
        return [(i.filename, archive.read(i.filename), i.compress_type) for i in archive.infolist()]


def _write_zip(path: Path, entries: Iterable[tuple[str, bytes, int]]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data, compression in entries:
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = struct.pack(">I", zlib.crc32(kind + data))
    return struct.pack(">I", len(data)) + kind + data + crc


def _huge_png(path: Path, width: int, height: int) -> Path:
    """A valid PNG header claiming ``width x height`` RGB pixels, with almost no data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )
    return path


def _images(root: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "cat.png")
    Image.fromarray(rgb).save(root / "cat.jpg")
    rgba = rng.integers(0, 255, (32, 32, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    Image.fromarray(rgb[..., 0], "L").save(root / "grey.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette.png")
    noise = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(noise, "PNG")
    (root / "truncated.png").write_bytes(noise.getvalue()[: len(noise.getvalue()) // 2])
    _huge_png(root / "huge.png", 100_000, 100_000)
    _huge_png(root / "over-cap.png", 8_500, 8_500)  # under Pillow's bomb limit, over fvis's cap


def _model_files(root: Path, zoo: Path) -> None:
    (root / "empty.pt").write_bytes(b"")
    (root / "notes.pt").write_text("epoch 3: loss 0.12\nthis is where the weights were\n")
    (root / "random.pt").write_bytes(np.random.default_rng(1).bytes(4096))
    _write_zip(root / "docs.zip.pt", [("readme.txt", b"not a model", zipfile.ZIP_STORED)])
    whole = (zoo / "nested_cnn.state_dict.pt").read_bytes()
    n = len(whole)
    (root / "cut-half.pt").write_bytes(whole[: n // 2])
    (root / "cut-tail.pt").write_bytes(whole[:-10])
    (root / "cut-middle.pt").write_bytes(whole[: n // 3] + whole[2 * n // 3 :])
    (root / "zeroed-middle.pt").write_bytes(
        whole[: n // 3] + bytes(n // 3) + whole[n // 3 + n // 3 :]
    )
    shutil.copy(zoo / "inner_outer.safetensors", root / "safetensors-named.pt")
    tensors = (zoo / "inner_outer.safetensors").read_bytes()
    (root / "cut.safetensors").write_bytes(tensors[:-16])
    shutil.copy(zoo / "inner_outer.state_dict.pt", root / "torch-named.safetensors")
    state = build_sample().state_dict()
    _save({k: v for k, v in state.items() if k != "linear_out.bias"}, root / "missing-key.pt")
    _save({**state, "extra.weight": torch.zeros(3)}, root / "unexpected-key.pt")
    _save({**state, "linear_out.weight": torch.zeros(3, 5)}, root / "shape.pt")
    _save({f"module.{k}": v for k, v in state.items()}, root / "ddp.pt")
    junk = {f"junk.{i}.weight": torch.zeros(1) for i in range(10_000)}
    _save({**state, **junk}, root / "10k-keys.pt")
    nan = {k: v.clone() for k, v in state.items()}
    nan["inner.linear.weight"][0, 0] = float("nan")
    _save(nan, root / "nan.pt")
    folder = root / "mes modèles ✓"
    folder.mkdir()
    shutil.copy(zoo / "inner_outer.state_dict.pt", folder / "poids du modèle ✓.pt")
    (folder / "vide ✓.pt").write_bytes(b"")


def _zip_attacks(root: Path, zoo: Path) -> None:
    entries = _zip_entries(zoo / "inner_outer.state_dict.pt")
    deflated = [
        (name, data, zipfile.ZIP_DEFLATED if name.endswith("data.pkl") else kind)
        for name, data, kind in entries
    ]
    _write_zip(root / "deflated-pickle.pt", deflated)
    top = entries[0][0].split("/")[0]
    escape = (f"{top}/../../escaped.txt", b"x", zipfile.ZIP_STORED)
    _write_zip(root / "dotdot.pt", [*entries, escape])
    bomb = (f"{top}/extra/bomb.bin", bytes(8 << 20), zipfile.ZIP_DEFLATED)
    _write_zip(root / "bomb.pt", [*entries, bomb])


def _pt2_variants(root: Path, zoo: Path, markers: Path) -> None:
    entries = _zip_entries(zoo / "inner_outer.pt2")
    prefix = entries[0][0].split("/")[0] + "/"
    config_name = f"{prefix}data/weights/model_weights_config.json"
    config = json.loads(dict((n, d) for n, d, _ in entries)[config_name])
    bias = config["config"]["linear_out.bias"]
    bias["use_pickle"] = True
    weight_name = f"{prefix}data/weights/{bias['path_name']}"

    def with_pickled_bias(payload: bytes) -> list[tuple[str, bytes, int]]:
        replaced = {config_name: json.dumps(config).encode(), weight_name: payload}
        return [(n, replaced.get(n, d), k) for n, d, k in entries]

    benign = io.BytesIO()
    torch.save(torch.zeros(2), benign)
    _write_zip(root / "pickled-weight.pt2", with_pickled_bias(benign.getvalue()))
    evil = io.BytesIO()
    torch.save(SystemPayload(markers / "pt2-weight"), evil)
    _write_zip(root / "pickled-weight-payload.pt2", with_pickled_bias(evil.getvalue()))
    # torch.export.load unpickles the sample inputs and falls back to weights_only=False.
    sample = io.BytesIO()
    torch.save(((SystemPayload(markers / "pt2-sample-inputs"),), {}), sample)
    _write_zip(
        root / "sample-inputs-payload.pt2",
        [
            (n, sample.getvalue() if n.endswith("sample_inputs/model.pt") else d, k)
            for n, d, k in entries
        ],
    )
    _write_zip(root / "second-program.pt2", _second_program(entries, prefix, markers))


def _second_program(
    entries: list[tuple[str, bytes, int]], prefix: str, markers: Path
) -> list[tuple[str, bytes, int]]:
    """The same program saved a second time under the name ``zz``, with one pickled weight."""
    data = {n: d for n, d, _ in entries}
    config = json.loads(data[f"{prefix}data/weights/model_weights_config.json"])
    extra = []
    for entry in config["config"].values():
        source = data[f"{prefix}data/weights/{entry['path_name']}"]
        entry["path_name"] = f"zz_{entry['path_name']}"
        extra.append((f"{prefix}data/weights/{entry['path_name']}", source, zipfile.ZIP_STORED))
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    first["path_name"] += "_pickled"
    evil = io.BytesIO()
    torch.save(SystemPayload(markers / "pt2-second-program"), evil)
    extra.append((f"{prefix}data/weights/{first['path_name']}", evil.getvalue(), 0))
    copies = {
        "models/zz.json": "models/model.json",
        "data/sample_inputs/zz.pt": "data/sample_inputs/model.pt",
        "data/constants/zz_constants_config.json": "data/constants/model_constants_config.json",
    }
    extra += [(prefix + new, data[prefix + old], zipfile.ZIP_STORED) for new, old in copies.items()]
    extra.append((f"{prefix}data/weights/zz_weights_config.json", json.dumps(config).encode(), 0))
    return [*entries, *extra]


def _payload_files(root: Path, markers: Path, zoo: Path) -> None:
    state = build_sample().state_dict()
    for name, cls in PAYLOADS.items():
        for layout in ("zip", "legacy"):
            obj = {**state, "extra": cls(markers / f"{name}-{layout}")}
            _save(obj, root / f"{name}.{layout}.pt", _use_new_zipfile_serialization=layout == "zip")
    (root / "plain-pickle.pt").write_bytes(pickle.dumps(SystemPayload(markers / "plain-pickle")))
    _save({**state, "extra": SystemPayload(markers / "named-st")}, root / "payload.safetensors")
    hidden = build("nested_cnn")
    hidden.note = SystemPayload(markers / "module-attribute")  # a plain attribute: in __dict__
    _save(hidden, root / "module-with-payload.pt")
    objects = np.array([SystemPayload(markers / "npy")], dtype=object)
    np.save(root / "payload.npy", objects, allow_pickle=True)
    _save(SystemPayload(markers / "input-pt"), root / "payload-input.pt")
    ts_payload = pickle.dumps(SystemPayload(markers / "torchscript"), protocol=2)
    swap_pickle(zoo / "nested_cnn.torchscript.pt", root / "payload.torchscript.pt", ts_payload)
    clean = _save({"w": torch.zeros(2)}, root / "clean.pt")
    evil = io.BytesIO()
    torch.save({"w": torch.zeros(2), "x": SystemPayload(markers / "twice")}, evil)
    with zipfile.ZipFile(evil) as archive:
        duplicate_pickle(clean, root / "twice.pt", archive.read("archive/data.pkl"))
    # the victim lives in the kit, whose every file the contract checks byte for byte
    opener = OpenForWritingPayload(file_openers()["_io"], root / "victim.txt")
    (root / "victim.txt").write_text("precious\n")
    _save(module_holding(opener), root / "file-opener.pt")


def _escape_files(root: Path) -> None:
    """Pickled modules whose layer and class names carry ANSI escapes and rich markup."""
    children = OrderedDict(
        [("\x1b[31mred\x1b[0m", nn.ReLU()), ("[/bold]", nn.Identity()), ("fc", nn.Linear(2, 2))]
    )
    _save(nn.Sequential(children), root / "ansi-layers.pt")
    name = "evil\x1b[2J"
    module = types.ModuleType(name)
    cls = type("Net", (nn.Module,), {"__module__": name})
    module.Net = cls  # type: ignore[attr-defined]
    sys.modules[name] = module
    try:
        _save(cls(), root / "ansi-class.pt")
    finally:
        del sys.modules[name]


def _fake_torch_global(root: Path) -> None:
    """A state dict naming ``torch.nn.not_a_module.Foo``: a torch.nn path that cannot import."""
    name = "torch.nn.not_a_module"
    module = types.ModuleType(name)
    cls = type("Foo", (), {"__module__": name})
    module.Foo = cls  # type: ignore[attr-defined]
    sys.modules[name] = module
    try:
        _save({**build_sample().state_dict(), "extra": cls()}, root / "fake-torch-global.pt")
    finally:
        del sys.modules[name]


def _arch_files(root: Path) -> None:
    (root / "archs.py").write_text(ARCH_SOURCE)
    (root / "raises_at_import.py").write_text("raise RuntimeError('no GPU driver found')\n")
    small = {"conv.weight": torch.zeros(4, 3, 5, 5), "conv.bias": torch.zeros(4)}
    _save(small, root / "small.pt")
    _save(
        {"conv.weight": torch.randn(4096, 3, 1, 1), "conv.bias": torch.zeros(4096)},
        root / "wide.pt",
    )
    explodes = {
        "stem.weight": torch.zeros(4, 10),
        "stem.bias": torch.zeros(4),
        "inner.fc.weight": torch.zeros(4, 4),
        "inner.fc.bias": torch.zeros(4),
    }
    _save(explodes, root / "explodes.pt")
    np.save(root / "four-channels.npy", np.zeros((1, 4, 32, 32), dtype=np.float32))


def _previous_run(root: Path, zoo: Path) -> Path:
    """An output folder holding one real fvis run and a file the user put there."""
    from fvis.cli import app

    previous = root / "previous"
    args = ["dump", str(zoo / "inner_outer.state_dict.pt"), "--arch", IO_ARCH]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # no pyproject.toml
        result = CliRunner().invoke(app, [*args, "--out", str(previous), "-q"])
    assert result.exit_code == 0, result.stderr
    (previous / USER_FILE).write_text("my notes: do not touch\n")
    return previous


@pytest.fixture(scope="module")
def kit(zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Kit:
    root = tmp_path_factory.mktemp("bad-input")
    markers = root / "markers"
    markers.mkdir()
    (root / "folder").mkdir()
    _images(root)
    _model_files(root, zoo)
    _zip_attacks(root, zoo)
    _pt2_variants(root, zoo, markers)
    _payload_files(root, markers, zoo)
    _escape_files(root)
    _fake_torch_global(root)
    _arch_files(root)
    return Kit(root, zoo, markers, _previous_run(root, zoo))


def test_payloads_are_live(tmp_path: Path) -> None:
    """Control: naive unpickling runs every payload, so "marker absent" below means something."""
    for name, cls in PAYLOADS.items():
        probe = tmp_path / name
        pickle.loads(pickle.dumps(cls(probe)))
        assert probe.exists(), name


# --------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    """One command line and what the contract expects of it.

    ``argv`` and ``says`` may use ``{kit}``, ``{zoo}``, ``{out}`` and ``{tmp}``. For a failure,
    ``says`` are substrings of the ``fvis: error:`` line (the file first); for a success, of
    stdout. ``setup`` prepares the working folder; ``fault`` patches fvis to fail mid-run.
    """

    id: str
    argv: tuple[str, ...]
    code: int | tuple[int, ...]  # several: any of these documented codes is right
    says: tuple[str, ...] = ()
    hint: tuple[str, ...] = ()
    trust_ok: bool = False  # the file really needs --trust, so the hint may say so
    setup: Callable[[Path, Kit], None] | None = None
    fault: Callable[[pytest.MonkeyPatch, Path], None] | None = None
    env: tuple[tuple[str, str], ...] = ()
    max_s: float | None = None
    fixed_bug: str | None = None  # the bug this case found, now fixed (history)


def dump(*args: str) -> tuple[str, ...]:
    """``fvis dump ARGS`` into the prepared output folder (it holds a user file: --overwrite)."""
    return ("dump", *args, "--out", "{out}", "--overwrite")


def _write(name: str, text: str) -> Callable[[Path, Kit], None]:
    """Write ``text`` (``{kit}`` expanded) to ``name`` in the working folder."""

    def setup(cwd: Path, kit: Kit) -> None:
        target = cwd / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text.replace("{kit}", str(kit.root)))

    return setup


def _symlink(name: str, target: str, text: str | None = None) -> Callable[[Path, Kit], None]:
    """``name`` -> ``target`` in the working folder; the target holds ``text`` if given."""

    def setup(cwd: Path, kit: Kit) -> None:
        if text is not None:
            (cwd / target).write_text(text)
        (cwd / name).symlink_to(cwd / target)

    return setup


def _fsync_fails_on(call: int) -> Callable[[pytest.MonkeyPatch, Path], None]:
    """The disk fills up while the ``call``-th file is staged."""

    def fault(monkeypatch: pytest.MonkeyPatch, out: Path) -> None:
        real, calls = os.fsync, [0]

        def fsync(fd: int) -> None:
            calls[0] += 1
            if calls[0] >= call:
                raise OSError(errno.ENOSPC, "No space left on device")
            real(fd)

        monkeypatch.setattr(fvis.output.os, "fsync", fsync)

    return fault


def _replace_fails_on(
    call: int, error: BaseException
) -> Callable[[pytest.MonkeyPatch, Path], None]:
    """The ``call``-th rename into ``out`` raises ``error`` (Ctrl-C, or an I/O error)."""

    def fault(monkeypatch: pytest.MonkeyPatch, out: Path) -> None:
        real, calls = os.replace, [0]

        def replace(src: Any, dst: Any) -> None:
            if Path(dst).parent == out:
                calls[0] += 1
                if calls[0] == call:
                    raise error
            real(src, dst)

        monkeypatch.setattr(fvis.output.os, "replace", replace)

    return fault


def _unreadable(name: str) -> Callable[[pytest.MonkeyPatch, Path], None]:
    """The file called ``name`` is not readable: ``os.access(R_OK)`` is false and opening it
    fails with EACCES, as for a file of another user (tests run as root: chmod is no use).
    Checked against the real thing: ``setpriv --inh-caps=-dac_override,-dac_read_search``."""

    def fault(monkeypatch: pytest.MonkeyPatch, out: Path) -> None:
        real_open, real_access = Path.open, os.access

        def open_(self: Path, *args: Any, **kwargs: Any) -> Any:
            if self.name == name:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real_open(self, *args, **kwargs)

        def access(path: Any, mode: int, *args: Any, **kwargs: Any) -> bool:
            if Path(path).name == name and mode & os.R_OK:
                return False
            return real_access(path, mode, *args, **kwargs)

        monkeypatch.setattr(Path, "open", open_)
        monkeypatch.setattr(os, "access", access)

    return fault


ZIP_TRUNCATIONS = ["cut-half", "cut-tail", "cut-middle", "zeroed-middle"]
ZIP_PAYLOADS = [(name, layout) for name in PAYLOADS for layout in ("zip", "legacy")]
DANGEROUS_ALLOW = ["os", "builtins", "*", "subprocess", "os.path", "torch", "posix"]
SEED_1 = ("--shape", "1,10", "--seed", "1")  # a run whose files differ from the previous one

CNN_STATE = ("{zoo}/nested_cnn.state_dict.pt", "--arch", CNN_ARCH)
IO_STATE = ("{zoo}/inner_outer.state_dict.pt", "--arch", IO_ARCH)
SMALL = ("{kit}/small.pt", "--arch", "{kit}/archs.py:Small")

MODEL_FILE = [
    Case("missing", dump("{kit}/nope.pt"), USAGE, ("{kit}/nope.pt", "no such file")),
    Case("directory", dump("{kit}/folder"), USAGE, ("{kit}/folder", "folder")),
    Case("empty", dump("{kit}/empty.pt"), BAD_FILE, ("{kit}/empty.pt", "empty")),
    Case(
        "png-as-model",
        dump("{kit}/cat.png", "--input", "{zoo}/inner_outer.state_dict.pt"),
        BAD_FILE,
        ("{kit}/cat.png", "PNG"),
        hint=("--input",),
    ),
    Case("jpeg-as-model", dump("{kit}/cat.jpg"), BAD_FILE, ("{kit}/cat.jpg", "JPEG"), ("--input",)),
    Case("text-as-model", dump("{kit}/notes.pt"), BAD_FILE, ("{kit}/notes.pt", "text file")),
    Case("random-bytes", dump("{kit}/random.pt"), BAD_FILE, ("{kit}/random.pt", "not a PyTorch")),
    Case("zip-not-checkpoint", dump("{kit}/docs.zip.pt"), BAD_FILE, ("{kit}/docs.zip.pt", "zip")),
    *[
        Case(f"zip-{cut}", dump(f"{{kit}}/{cut}.pt", "--arch", CNN_ARCH), BAD_FILE, (f"{cut}.pt",))
        for cut in ZIP_TRUNCATIONS
    ],
    Case(
        "safetensors-truncated",
        dump("{kit}/cut.safetensors", "--arch", IO_ARCH),
        BAD_FILE,
        ("{kit}/cut.safetensors", "damaged"),
    ),
    Case(
        "model-is-a-fifo",
        dump("{tmp}/pipe.pt"),
        (USAGE, BAD_FILE),
        ("{tmp}/pipe.pt",),
        setup=lambda cwd, kit: os.mkfifo(cwd / "pipe.pt"),
        max_s=5.0,
    ),
    Case("safetensors-named-pt", dump("{kit}/safetensors-named.pt", "--arch", IO_ARCH), OK),
    Case("torch-named-safetensors", dump("{kit}/torch-named.safetensors", "--arch", IO_ARCH), OK),
    Case(
        "arch-missing-key",
        dump("{kit}/missing-key.pt", "--arch", IO_ARCH),
        MODEL_INPUT,
        ("{kit}/missing-key.pt", "1 missing key: linear_out.bias"),
        hint=("--arch",),
    ),
    Case(
        "arch-unexpected-key",
        dump("{kit}/unexpected-key.pt", "--arch", IO_ARCH),
        MODEL_INPUT,
        ("{kit}/unexpected-key.pt", "1 unexpected key: extra.weight"),
    ),
    Case(
        "arch-shape-mismatch",
        dump("{kit}/shape.pt", "--arch", IO_ARCH),
        MODEL_INPUT,
        ("{kit}/shape.pt", "linear_out.weight [3, 5] vs [2, 5]"),
    ),
    Case("arch-module-prefix", dump("{kit}/ddp.pt", "--arch", IO_ARCH), OK),
    Case("training-dict", dump("{zoo}/nested_cnn.training.pt", "--arch", CNN_ARCH), OK),
    Case(
        "training-dict-no-arch",
        dump("{zoo}/nested_cnn.training.pt"),
        USAGE,
        ("{zoo}/nested_cnn.training.pt", "state dict"),
        hint=("--arch",),
    ),
    Case(
        "safetensors-no-arch",
        dump("{zoo}/nested_cnn.safetensors"),
        USAGE,
        ("{zoo}/nested_cnn.safetensors", "safetensors"),
        hint=("--arch",),
    ),
    Case(
        "model-unreadable",
        dump(*IO_STATE),
        BAD_FILE,
        ("{zoo}/inner_outer.state_dict.pt", "Permission denied"),
        fault=_unreadable("inner_outer.state_dict.pt"),
        fixed_bug="BUG: fvis/cli.py ModelArg: typer's Path argument defaults to readable=True, so "
        "click rejects an unreadable model with its own 4-line 'Usage/Try/Error' text and "
        "exit 2 instead of one 'fvis: error:' line and exit 3; past click (a race, EIO), "
        "fvis/formats.py sniff's path.stat/path.open are unguarded: OSError -> exit 70",
    ),
    Case(
        "input-unreadable",
        dump(*CNN_STATE, "--input", "{kit}/cat.png"),
        BAD_FILE,
        ("{kit}/cat.png", "Permission denied"),
        fault=_unreadable("cat.png"),
        fixed_bug="BUG: fvis/inputs.py load_input_file: path.open(...) is unguarded; a "
        "PermissionError becomes exit 70 'internal error' with a traceback",
    ),
    Case(
        "unicode-path",
        dump("{kit}/mes modèles ✓/poids du modèle ✓.pt", "--arch", IO_ARCH),
        OK,
    ),
    Case(
        "unicode-path-empty",
        dump("{kit}/mes modèles ✓/vide ✓.pt"),
        BAD_FILE,
        ("{kit}/mes modèles ✓/vide ✓.pt", "empty"),
    ),
]

TRUST_BOUNDARY = [
    *[
        Case(
            f"payload-{name}-{layout}{'-arch' if arch else ''}",
            dump(f"{{kit}}/{name}.{layout}.pt", *arch),
            REFUSED,
            (f"{name}.{layout}.pt", "dangerous globals", GLOBAL_NAMED[name], "would "),
            hint=("dangerous",),
            fixed_bug=(
                "BUG: fvis/loading.py _ways_forward: a torch global that runs code "
                "(torch.fx.graph_module._exec_with_source) is not in _DANGEROUS_ROOTS, so the "
                "hint suggests '--allow-module torch.fx.graph_module' (which "
                "check_allow_modules itself refuses) and '--trust'"
                if name == "torch.fx.exec"
                else None
            ),
        )
        for name, layout in ZIP_PAYLOADS
        for arch in ((), ("--arch", IO_ARCH))
    ],
    Case(
        "plain-pickle-payload",
        dump("{kit}/plain-pickle.pt", "--arch", IO_ARCH),
        BAD_FILE,
        ("{kit}/plain-pickle.pt", "not a PyTorch checkpoint"),
        fixed_bug="BUG (minor): fvis/inert.py read_legacy_pickle loads all three header pickles "
        "before checking the magic number, so a plain pickle.dumps file is reported as 'a "
        "corrupt or truncated checkpoint (Ran out of input)' instead of 'a Python pickle, not "
        "a PyTorch checkpoint'",
    ),
    Case(
        "torchscript-payload-arch",
        dump("{kit}/payload.torchscript.pt", "--arch", CNN_ARCH),
        REFUSED,
        ("{kit}/payload.torchscript.pt", "posix.system"),
        fixed_bug="BUG: fvis/loading.py _load_torchscript read a TorchScript archive whose "
        "data.pkl calls os.system as data for --arch and ran silently, exit 0",
    ),
    Case(
        "duplicate-data-pkl",
        dump("{kit}/twice.pt", "--arch", IO_ARCH),
        REFUSED,
        ("{kit}/twice.pt", "more than one zip entry named"),
        fixed_bug="BUG: fvis/loading.py _torch_load relayed torch's 'Re-running torch.load with "
        "weights_only set to False will likely succeed' for a zip whose second data.pkl "
        "(the one torch reads, not the one fvis checked) calls os.system",
    ),
    Case(
        "file-opener-module",
        dump("{kit}/file-opener.pt"),
        REFUSED,
        ("{kit}/file-opener.pt", "_io.FileIO (would open, write or delete files)"),
        fixed_bug="BUG: fvis/loading.py _ways_forward hinted '--allow-module _io' for a "
        "pickled module holding _io.FileIO(victim, 'w'); following it truncated the victim",
    ),
    Case(
        "file-opener-module-allowed",
        dump("{kit}/file-opener.pt", "--allow-module", "_io"),
        USAGE,
        ("--allow-module _io", "standard-library"),
    ),
    Case(
        "payload-named-safetensors",
        dump("{kit}/payload.safetensors", "--arch", IO_ARCH),
        REFUSED,
        ("{kit}/payload.safetensors", "posix.system"),
    ),
    Case(
        "pickled-user-module",
        dump("{zoo}/nested_cnn.module.pt"),
        REFUSED,
        ("{zoo}/nested_cnn.module.pt", "sample_models.zoo.Classifier"),
        hint=("--allow-module sample_models.zoo", "--arch"),
        trust_ok=True,
    ),
    Case(
        "pickled-user-module-allowed",
        dump("{zoo}/nested_cnn.module.pt", "--allow-module", "sample_models.zoo"),
        OK,
    ),
    Case(
        "pickled-user-module-weights-into-arch",
        dump("{zoo}/nested_cnn.module.pt", "--arch", CNN_ARCH),
        OK,
    ),
    Case(
        "pickled-module-with-hidden-payload",
        dump("{kit}/module-with-payload.pt", "--allow-module", "sample_models.zoo"),
        REFUSED,
        ("{kit}/module-with-payload.pt", "posix.system"),
        hint=("dangerous",),
    ),
    Case(
        "fake-torch-nn-global",
        dump("{kit}/fake-torch-global.pt", "--arch", IO_ARCH),
        REFUSED,
        ("{kit}/fake-torch-global.pt", "torch.nn.not_a_module.Foo"),
        trust_ok=True,
        fixed_bug="BUG: fvis/loading.py _resolve_allowed calls importlib.import_module on any "
        "'torch.nn.*' module a file names, unguarded: ModuleNotFoundError -> exit 70",
    ),
    Case(
        "torchscript-no-arch",
        dump("{zoo}/nested_cnn.torchscript.pt"),
        USAGE,
        ("{zoo}/nested_cnn.torchscript.pt", "TorchScript"),
        hint=("--arch", "torch.export"),
    ),
    Case(
        "torchscript-trust-no-arch",
        dump("{zoo}/nested_cnn.torchscript.pt", "--trust"),
        USAGE,
        ("{zoo}/nested_cnn.torchscript.pt", "TorchScript"),
        hint=("--arch", "torch.export"),
        trust_ok=True,  # the user typed it
    ),
    Case("torchscript-arch", dump("{zoo}/nested_cnn.torchscript.pt", "--arch", CNN_ARCH), OK),
    Case("pt2", dump("{zoo}/nested_cnn.pt2"), OK),
    Case(
        "pt2-pickled-weight",
        dump("{kit}/pickled-weight.pt2"),
        REFUSED,
        ("{kit}/pickled-weight.pt2", "linear_out.bias"),
        hint=("--trust",),
        trust_ok=True,
    ),
    Case(
        "pt2-pickled-weight-payload",
        dump("{kit}/pickled-weight-payload.pt2"),
        REFUSED,
        ("{kit}/pickled-weight-payload.pt2", "posix.system"),
        fixed_bug="BUG: fvis/loading.py _load_export refuses a use_pickle weight without reading "
        "it, so a weight whose pickle calls os.system gets the hint '--trust if you trust ...'",
    ),
    Case(
        "pt2-sample-inputs-payload",
        dump("{kit}/sample-inputs-payload.pt2"),
        REFUSED,
        ("{kit}/sample-inputs-payload.pt2", "posix.system"),
        fixed_bug="BUG: fvis/loading.py _load_export: torch.export.load unpickles "
        "data/sample_inputs/model.pt and silently retries with weights_only=False: the "
        "payload RUNS without --trust",
    ),
    Case(
        "pt2-second-program-payload",
        dump("{kit}/second-program.pt2"),
        REFUSED,
        ("{kit}/second-program.pt2", "pickle"),
        fixed_bug="BUG: fvis/loading.py _load_export checks use_pickle only in the 'model' "
        "program's configs; torch.export.load also loads models/zz.json, whose pickled "
        "weight it unpickles with weights_only=False: the payload RUNS without --trust",
    ),
    *[
        Case(
            f"allow-module-{name.replace('*', 'star')}",
            dump("{zoo}/nested_cnn.module.pt", "--allow-module", name),
            USAGE,
            ("--allow-module", name),
        )
        for name in DANGEROUS_ALLOW
    ],
    Case(
        "trust-sha256-mismatch",
        dump("{zoo}/nested_cnn.module.pt", "--trust-sha256", "0" * 64),
        REFUSED,
        ("{zoo}/nested_cnn.module.pt", "SHA-256"),
        trust_ok=True,  # the message names the flag the user gave
    ),
]

SWAPPED_BUG = (
    "BUG: fvis/inputs.py load_input_file: only a plain state dict passed as --input gets the "
    "swapped-arguments hint"
)
SWAPPED_INPUTS = {  # a model file given as --input, and what goes wrong today
    "state_dict.pt": None,
    "training.pt": "'holds a dict, not a tensor', no hint",
    "safetensors": "the hint says 'use --input name=FILE per keyword'",
    "torchscript.pt": "a raw torch UserWarning on stderr and torch's weights_only prose",
    "pt2": "'PytorchStreamReader failed locating file data.pkl ... checkpoint file is corrupted'",
    "module.pt": "torch's prose 'This file can still be loaded ... only if you trust the "
    "source' with escaped ANSI codes",
}

THE_INPUT = [
    *[
        Case(f"image-{mode}", dump(*CNN_STATE, "--input", f"{{kit}}/{mode}.png"), OK)
        for mode in ("cat", "rgba", "grey", "palette")
    ],
    Case(
        "image-truncated",
        dump(*CNN_STATE, "--input", "{kit}/truncated.png"),
        BAD_FILE,
        ("{kit}/truncated.png", "truncated"),
    ),
    Case(
        "image-huge-header",
        dump(*CNN_STATE, "--input", "{kit}/huge.png"),
        BAD_FILE,
        ("{kit}/huge.png",),
        max_s=5.0,
    ),
    Case(
        "image-over-fvis-cap",
        dump(*CNN_STATE, "--input", "{kit}/over-cap.png"),
        BAD_FILE,
        ("{kit}/over-cap.png", "8500x8500"),
        max_s=5.0,
    ),
    *[
        Case(
            f"checkpoint-as-input-{fmt}",
            dump(*CNN_STATE, "--input", f"{{zoo}}/nested_cnn.{fmt}"),
            (BAD_FILE, MODEL_INPUT),
            (f"{{zoo}}/nested_cnn.{fmt}",),
            hint=("the model comes first",),
            fixed_bug=f"{SWAPPED_BUG}: {problem}" if problem else None,
        )
        for fmt, problem in SWAPPED_INPUTS.items()
    ],
    Case(
        "payload-as-input",
        dump(*CNN_STATE, "--input", "{kit}/payload-input.pt"),
        (BAD_FILE, REFUSED),
        ("{kit}/payload-input.pt",),
        fixed_bug="BUG: fvis/inputs.py _load_torch_tensor relays the first line of torch's "
        "weights_only error, which for an os.system payload reads 'Re-running torch.load "
        "with weights_only set to False': it suggests unsafe loading of a payload",
    ),
    Case(
        "npy-payload-as-input",
        dump(*CNN_STATE, "--input", "{kit}/payload.npy"),
        BAD_FILE,
        ("{kit}/payload.npy",),
    ),
    Case(
        "image-swapped-and-missing",
        dump(*CNN_STATE, "--input", "{kit}/nope.png"),
        USAGE,
        ("{kit}/nope.png", "no such file"),
    ),
    Case(
        "empty-input",
        dump(*CNN_STATE, "--input", "{kit}/empty.pt"),
        BAD_FILE,
        ("empty.pt", "empty"),
    ),
    Case(
        "text-as-input",
        dump(*CNN_STATE, "--input", "{kit}/notes.pt"),
        BAD_FILE,
        ("{kit}/notes.pt",),
    ),
    Case(
        "wrong-channels-shape",
        dump(*CNN_STATE, "--shape", "1,4,32,32"),
        MODEL_INPUT,
        ("backbone.conv1",),
    ),
    Case(
        "wrong-channels-npy",
        dump(*CNN_STATE, "--input", "{kit}/four-channels.npy"),
        MODEL_INPUT,
        ("backbone.conv1",),
    ),
    Case("too-small-spatial", dump(*SMALL, "--shape", "1,3,2,2"), MODEL_INPUT, ("conv",)),
    Case(
        "forward-raises",
        dump("{kit}/explodes.pt", "--arch", "{kit}/archs.py:Explodes", "--shape", "1,10"),
        MODEL_INPUT,
        ("inner", "this layer is broken"),
    ),
]

LAYERS = [
    Case("constant-activation", dump(*SMALL, "--shape", "1,3,8,8"), OK),
    Case(
        "4096-channels",
        dump("{kit}/wide.pt", "--arch", "{kit}/archs.py:Wide", "--shape", "1,3,4,4"),
        OK,
    ),
    Case(
        "tuple-and-dict-outputs",
        dump(
            "{zoo}/tiny_transformer.state_dict.pt",
            "--arch",
            "sample_models.zoo:TinyTransformer",
            "--shape",
            "1,6,16",
        ),
        OK,
    ),
    Case(
        "module-called-twice",
        dump("{zoo}/shared_mixed.state_dict.pt", "--arch", "sample_models.zoo:SharedMixed"),
        OK,
    ),
    Case(
        "layers-payload-refused",
        ("layers", "{kit}/os.system.zip.pt"),
        REFUSED,
        ("{kit}/os.system.zip.pt", "posix.system (would run a shell command)"),
        fixed_bug="BUG: fvis/loading.py inspect_model listed a file whose pickle calls "
        "os.system as a normal checkpoint, exit 0: nothing told the user it is malicious",
    ),
    Case(
        "layers-torchscript-payload-refused",
        ("layers", "{kit}/payload.torchscript.pt"),
        REFUSED,
        ("{kit}/payload.torchscript.pt", "posix.system (would run a shell command)"),
    ),
    Case(
        "layers-payload-trusted",
        ("layers", "{kit}/os.system.zip.pt", "--trust"),
        OK,
        ("67 params",),
    ),
    Case(
        "layers-pt2-payload-refused",
        ("layers", "{kit}/sample-inputs-payload.pt2"),
        REFUSED,
        ("{kit}/sample-inputs-payload.pt2", "posix.system (would run a shell command)"),
    ),
    Case(
        "layers-payload-run",
        ("layers", "{kit}/os.system.zip.pt", "--shape", "1,10"),
        REFUSED,
        ("{kit}/os.system.zip.pt", "posix.system"),
    ),
    Case("layers-truncated-zip", ("layers", "{kit}/cut-tail.pt"), BAD_FILE, ("{kit}/cut-tail.pt",)),
    Case(
        "unknown-layer",
        dump("{zoo}/inner_outer.state_dict.pt", "--arch", IO_ARCH, "--layer", "inner.rleu"),
        USAGE,
        ("'inner.rleu'", "did you mean", "inner.relu (ReLU)"),
        hint=("fvis layers {zoo}/inner_outer.state_dict.pt",),
    ),
    Case(
        "unknown-layer-glob",
        dump("{zoo}/inner_outer.state_dict.pt", "--arch", IO_ARCH, "--layer", "backbone.*"),
        USAGE,
        ("'backbone.*'",),
    ),
    Case(
        "layer-never-runs",
        dump(
            "{zoo}/never_runs.state_dict.pt",
            "--arch",
            "sample_models.zoo:NeverRuns",
            "--layer",
            "skipped",
        ),
        OK,
        ("never ran", "skipped"),
    ),
]

OUTPUT_CASES = [
    Case(
        "out-is-a-file",
        ("dump", *IO_STATE, "--out", "{tmp}/taken.txt"),
        OUTPUT,
        ("{tmp}/taken.txt", "is a file"),
        setup=_write("taken.txt", "mine"),
    ),
    Case(
        "out-holds-foreign-files",
        ("dump", *IO_STATE, "--out", "{out}"),
        OUTPUT,
        ("{out}", USER_FILE),
        hint=("--overwrite",),
    ),
    Case(
        "out-under-a-file",
        ("dump", *IO_STATE, "--out", "{tmp}/taken.txt/sub/out"),
        OUTPUT,
        ("{tmp}/taken.txt/sub/out",),
        setup=_write("taken.txt", "mine"),
    ),
    Case(
        "out-symlink-to-a-file",
        ("dump", *IO_STATE, "--out", "{tmp}/link"),
        OUTPUT,
        ("{tmp}/link",),
        setup=_symlink("link", "secret.txt", "keep"),
    ),
    Case(
        "out-dangling-symlink",
        ("dump", *IO_STATE, "--out", "{tmp}/link"),
        OUTPUT,
        ("{tmp}/link",),
        setup=_symlink("link", "gone/away"),
    ),
    Case(
        "out-clashes-with-a-foreign-report",
        ("dump", *IO_STATE, "--out", "{tmp}/mine", "--overwrite"),
        OUTPUT,
        ("{tmp}/mine", "report.json"),
        setup=_write("mine/report.json", '{"mine": true}\n'),
    ),
    Case(
        "new-out-folder-on-failure",
        ("dump", "{kit}/empty.pt", "--out", "{tmp}/fresh/run1"),
        BAD_FILE,
        ("{kit}/empty.pt",),
        fixed_bug="BUG (minor): fvis/output.py OutputDir.open creates --out (parents=True) before "
        "the work, and a failed run leaves the new empty folders fresh/ and fresh/run1/",
    ),
    Case("rerun-into-fvis-folder", dump(*IO_STATE, *SEED_1), OK),
    Case(
        "disk-full-while-staging",
        dump(*IO_STATE, *SEED_1),
        OUTPUT,
        ("{out}", "No space left"),
        fault=_fsync_fails_on(2),
    ),
    Case(
        "rename-fails-mid-commit",
        dump(*IO_STATE, *SEED_1),
        OUTPUT,
        ("{out}",),
        fault=_replace_fails_on(2, OSError(errno.EIO, "Input/output error")),
        fixed_bug="BUG: fvis/output.py OutputDir.commit renames staged files one by one over the "
        "old ones; when a later rename fails the earlier ones stay replaced (old files lost, "
        "no manifest lists the new ones)",
    ),
    Case(
        "ctrl-c-mid-commit",
        dump(*IO_STATE, *SEED_1),
        INTERRUPTED,
        ("interrupted",),
        fault=_replace_fails_on(2, KeyboardInterrupt()),
        fixed_bug="BUG: fvis/output.py OutputDir.commit: a KeyboardInterrupt between renames "
        "leaves the first files replaced and leaks the manifest temporary "
        "(.fvis-manifest.json.*.fvis-tmp), which only OSError cleans up",
    ),
]

CHECK = [
    Case(
        "check-payload",
        ("check", "{kit}/os.system.zip.pt"),
        REFUSED,
        ("os.system.zip.pt", "posix.system"),
    ),
    Case(
        "check-junit-under-a-file",
        ("check", *IO_STATE, "--junit", "{tmp}/taken.txt/junit.xml"),
        OUTPUT,
        ("{tmp}/taken.txt/junit.xml",),
        setup=_write("taken.txt", "mine"),
    ),
    Case(
        "check-write-baseline-under-a-file",
        ("check", *IO_STATE, "--write-baseline", "{tmp}/taken.txt/baseline.json"),
        OUTPUT,
        ("{tmp}/taken.txt/baseline.json",),
        setup=_write("taken.txt", "mine"),
    ),
    Case(
        "check-baseline-is-a-folder",
        ("check", *IO_STATE, "--baseline", "{kit}/folder"),
        BAD_FILE,
        ("{kit}/folder", "baseline"),
    ),
    Case(
        "check-step-summary-is-a-folder",
        ("check", *IO_STATE),
        OUTPUT,
        ("{kit}/folder",),
        env=(("GITHUB_STEP_SUMMARY", "{kit}/folder"),),
        fixed_bug="BUG: fvis/cli.py _report_check opens $GITHUB_STEP_SUMMARY unguarded: an "
        "IsADirectoryError / PermissionError becomes exit 70 with a traceback",
    ),
]

ATTACKER = [
    Case(
        "zip-deflated-pickle",
        dump("{kit}/deflated-pickle.pt"),
        BAD_FILE,
        ("{kit}/deflated-pickle.pt", "compressed"),
    ),
    Case("zip-dotdot-entry", dump("{kit}/dotdot.pt"), BAD_FILE, ("{kit}/dotdot.pt", "unsafe name")),
    Case("zip-bomb-entry", dump("{kit}/bomb.pt"), BAD_FILE, ("{kit}/bomb.pt", "zip bomb")),
    Case(
        "10k-unexpected-keys",
        dump("{kit}/10k-keys.pt", "--arch", IO_ARCH),
        MODEL_INPUT,
        ("{kit}/10k-keys.pt", "10000 unexpected keys", "(+9997 more)"),
    ),
    Case("nan-weights-dump", dump("{kit}/nan.pt", "--arch", IO_ARCH), OK),
    Case(
        "nan-weights-check",
        ("check", "{kit}/nan.pt", "--arch", IO_ARCH),
        CHECKS_FAILED,
        ("nonfinite",),
    ),
    Case("ansi-layer-names-listed", ("layers", "{kit}/ansi-layers.pt"), OK, ("\\x1b[31mred",)),
    Case("ansi-layer-names-dumped", dump("{kit}/ansi-layers.pt"), OK),
    Case("ansi-class-name-listed", ("layers", "{kit}/ansi-class.pt"), OK, ("Net",)),
    Case(
        "ansi-class-name-refused",
        dump("{kit}/ansi-class.pt"),
        REFUSED,
        ("{kit}/ansi-class.pt", "\\x1b[2J"),
        trust_ok=True,  # an unknown user class: the file does need --trust or --allow-module
    ),
    Case(
        "arch-raises-at-import",
        dump("{zoo}/inner_outer.state_dict.pt", "--arch", "{kit}/raises_at_import.py:Net"),
        USAGE,
        ("raises_at_import.py", "no GPU driver found"),
    ),
    Case(
        "arch-module-raises-at-import",
        dump("{zoo}/inner_outer.state_dict.pt", "--arch", "raises_at_import:Net"),
        USAGE,
        ("raises_at_import", "no GPU driver found"),
        setup=_write("raises_at_import.py", "raise RuntimeError('no GPU driver found')\n"),
    ),
    Case(
        "arch-not-callable",
        dump("{zoo}/inner_outer.state_dict.pt", "--arch", "{kit}/archs.py:NOT_CALLABLE"),
        USAGE,
        ("archs.py", "NOT_CALLABLE"),
    ),
    Case(
        "arch-missing-file",
        dump("{zoo}/inner_outer.state_dict.pt", "--arch", "{kit}/nope.py:Net"),
        USAGE,
        ("{kit}/nope.py",),
    ),
    Case(
        "arch-kwargs-not-json",
        dump("{zoo}/inner_outer.state_dict.pt", "--arch", IO_ARCH, "--arch-kwargs", "{width: 3}"),
        USAGE,
        ("--arch-kwargs", "JSON"),
    ),
    Case(
        "arch-kwargs-not-object",
        dump("{zoo}/inner_outer.state_dict.pt", "--arch", IO_ARCH, "--arch-kwargs", "[1, 2]"),
        USAGE,
        ("--arch-kwargs", "object"),
    ),
    Case(
        "arch-kwargs-unknown",
        dump(
            "{zoo}/nested_cnn.state_dict.pt", "--arch", CNN_ARCH, "--arch-kwargs", '{"depth": 50}'
        ),
        USAGE,
        (CNN_ARCH, "depth"),
    ),
    Case(
        "max-model-bytes",
        dump(*CNN_STATE, "--max-model-bytes", "1000"),
        BAD_FILE,
        ("{zoo}/nested_cnn.state_dict.pt", "--max-model-bytes"),
    ),
    Case(
        "broken-pyproject",
        ("dump", "--out", "{out}", "--overwrite"),
        USAGE,
        ("{tmp}/pyproject.toml", "TOML"),
        setup=_write("pyproject.toml", "[tool.fvis\nmodel = 'x.pt'\n"),
    ),
    Case(
        "pyproject-names-a-payload",
        ("dump", "--out", "{out}", "--overwrite"),
        REFUSED,
        ("{kit}/os.system.zip.pt", "posix.system"),
        setup=_write("pyproject.toml", '[tool.fvis]\nmodel = "{kit}/os.system.zip.pt"\n'),
    ),
]

CASES = [*MODEL_FILE, *TRUST_BOUNDARY, *THE_INPUT, *LAYERS, *OUTPUT_CASES, *CHECK, *ATTACKER]
PARAMS = [
    pytest.param(
        case,
        id=case.id,
    )
    for case in CASES
]


def test_case_ids_are_unique() -> None:
    assert len({c.id for c in CASES}) == len(CASES)


# --------------------------------------------------------------------------- the checks


def _tree(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (hidden ones, folders and links too) and its content hash."""
    found: dict[str, str] = {}
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(folder, name)
            key = path.relative_to(root).as_posix()
            if path.is_symlink():
                found[key] = "link:" + os.readlink(path)
            elif path.is_dir():
                found[key] = "folder"
            elif not path.is_file():  # a FIFO: reading it would block
                found[key] = "special"
            else:
                found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _expand(text: str, places: dict[str, Path]) -> str:
    for key, value in places.items():
        text = text.replace("{" + key + "}", str(value))
    return text


def _run(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str, float]:
    from fvis.cli import app

    runner = CliRunner(env={"FVIS_DEBUG": None, "GITHUB_STEP_SUMMARY": None, **(env or {})})
    start = time.monotonic()
    result = runner.invoke(app, argv, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr, time.monotonic() - start


def _check_failure(case: Case, stdout: str, stderr: str, places: dict[str, Path]) -> None:
    lines = stderr.splitlines()
    errors = [line for line in lines if line.startswith("fvis: error: ")]
    hints = [line for line in lines if line.startswith("hint: ")]
    # fvis's own one-line notes ("model X from pyproject.toml") may come before the error
    notes = [line for line in lines if line.startswith("fvis: ") and line not in errors]
    assert len(errors) == 1 and len(hints) <= 1, stderr
    assert lines == notes + errors + hints, stderr
    for part in case.says:
        assert _expand(part, places) in errors[0], (part, errors[0])
    for part in case.hint:
        assert hints and _expand(part, places) in hints[0], (part, stderr)
    if not case.trust_ok:
        assert "--trust" not in stderr, stderr
    assert not UNSAFE_LOAD.search(stderr + stdout), stderr


def _check_success(case: Case, stdout: str, stderr: str, places: dict[str, Path]) -> None:
    assert "fvis: error:" not in stderr, stderr
    for part in case.says:
        assert _expand(part, places) in stdout, (part, stdout)
    out = places["out"]
    assert (out / USER_FILE).read_text() == "my notes: do not touch\n"
    assert not list(places["tmp"].rglob("*.fvis-tmp"))
    if (out / MANIFEST).exists():  # every file but the user's is one fvis lists as its own
        listed = set(json.loads((out / MANIFEST).read_text())["files"])
        assert {p.name for p in out.iterdir()} == listed | {USER_FILE, MANIFEST}


def _outside(tree: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in tree.items() if not key.startswith("out/")}


def _prepare(case: Case, kit: Kit, tmp: Path) -> None:
    shutil.copytree(kit.previous, tmp / "out", symlinks=True)
    if case.setup is not None:
        case.setup(tmp, kit)


@pytest.mark.parametrize("case", PARAMS)
def test_bad_input_contract(
    case: Case, kit: Kit, chdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp = chdir
    for marker in kit.markers.iterdir():  # left by a case whose payload ran
        marker.unlink()
    _prepare(case, kit, tmp)
    places = {"kit": kit.root, "zoo": kit.zoo, "out": tmp / "out", "tmp": tmp}
    before = {p: _tree(p) for p in (tmp, kit.root, kit.zoo)}
    if case.fault is not None:
        case.fault(monkeypatch, tmp / "out")
    env = {key: _expand(value, places) for key, value in case.env}
    code, stdout, stderr, seconds = _run([_expand(a, places) for a in case.argv], env)
    monkeypatch.undo()
    # 5. no code from the file ran (checked first: it matters most)
    ran = sorted(p.name for p in kit.markers.iterdir())
    assert not ran, f"the payload ran: {ran}"
    # 1. the documented exit code
    codes = case.code if isinstance(case.code, tuple) else (case.code,)
    assert code in codes, f"exit {code}, expected {case.code}\n{stderr}"
    assert "Traceback" not in stderr + stdout
    assert ESC not in stderr + stdout, "a raw ESC byte reached the terminal"
    if case.max_s is not None:
        assert seconds < case.max_s, f"took {seconds:.1f} s"
    if code in (OK, CHECKS_FAILED):
        _check_success(case, stdout, stderr, places)
        writes = case.argv[0] == "dump" and code == OK
        after = _tree(tmp)
        # a run that works writes into --out only; listing and checking write nothing
        assert (_outside(after) if writes else after) == (
            _outside(before[tmp]) if writes else before[tmp]
        )
    else:
        # 2. one error line naming the file and the problem; 6. --trust only where needed
        _check_failure(case, stdout, stderr, places)
        # 3 and 4. nothing new, nothing changed, in the output folder or anywhere else
        assert _tree(tmp) == before[tmp]
    assert _tree(kit.root) == before[kit.root]
    assert _tree(kit.zoo) == before[kit.zoo]


def test_written_reports_carry_no_raw_escape(kit: Kit, chdir: Path) -> None:
    """Layer names with ANSI escapes reach report.md / report.html / file names only escaped."""
    out = chdir / "out"
    code, _, stderr, _ = _run(["dump", str(kit.root / "ansi-layers.pt"), "--out", str(out)])
    assert code == 0, stderr
    for path in out.iterdir():
        assert ESC not in path.name
        if path.suffix in (".md", ".html", ".json"):
            assert ESC.encode() not in path.read_bytes(), path.name
