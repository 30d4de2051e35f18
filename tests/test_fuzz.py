"""Seeded mutations of valid checkpoints and images: every outcome is a documented error.

Each case is a byte flip, a truncation, an insertion or a shuffle of zip entries applied to a
valid sample file (and to a checkpoint carrying a marker-file payload). Listing and loading
must either work or raise an ``FvisError`` (exit codes 2-6), never anything else (which the CLI
would report as exit 70 with a traceback), and the payload must never run.

The normal suite runs a few hundred cases in seconds; a longer run:

    FVIS_FUZZ_CASES=5000 python -m pytest tests/test_fuzz.py
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fvis.errors import FvisError
from fvis.inputs import InputOptions, load_input_file
from fvis.loading import LoadOptions, inspect_model, load_model
from sample_models.build import build_all

CASES = int(os.environ.get("FVIS_FUZZ_CASES", "300"))
SAMPLES = ("inner_outer", "nested_cnn")
ARCH = {"inner_outer": "fvis.sample:OuterModel", "nested_cnn": "sample_models.zoo:Classifier"}


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[tuple[Path, str | None]], Path]:
    root = tmp_path_factory.mktemp("fuzz")
    build_all(root, SAMPLES, echo=lambda _line: None)
    files: list[tuple[Path, str | None]] = []
    for name in SAMPLES:
        for suffix in (
            "state_dict.pt",
            "training.pt",
            "module.pt",
            "torchscript.pt",
            "pt2",
            "safetensors",
        ):
            files.append((root / f"{name}.{suffix}", ARCH[name]))
    marker = root / "MARKER"
    evil = root / "evil.pt"
    torch.save({"weight": torch.zeros(2), "x": _Payload(marker)}, evil)
    files.append((evil, None))
    return files, marker


def _mutate(data: bytes, rng: random.Random) -> bytes:
    kind = rng.choice(("flip", "truncate", "insert", "shuffle", "flip"))
    buf = bytearray(data)
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del buf[rng.randrange(1, len(buf)) :]
    elif kind == "insert":
        i = rng.randrange(len(buf))
        buf[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    else:
        return _shuffle_zip(data, rng)
    return bytes(buf)


def _shuffle_zip(data: bytes, rng: random.Random) -> bytes:
    try:
        source = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        return data[::-1]
    entries = [(info, source.read(info.filename)) for info in source.infolist()]
    rng.shuffle(entries)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for info, content in entries:
            target.writestr(info, content)
    return out.getvalue()


def _exercise(path: Path, arch: str | None) -> None:
    """List, then load: anything but success or an FvisError fails the test."""
    with contextlib.suppress(FvisError):
        inspect_model(path)
    with contextlib.suppress(FvisError):
        load_model(path, LoadOptions(arch=arch))


def test_mutated_checkpoints_give_documented_errors(corpus, tmp_path: Path) -> None:
    files, marker = corpus
    rng = random.Random(1234)
    for case in range(CASES):
        source, arch = files[case % len(files)]
        mutated = tmp_path / f"case{case}{source.suffix}"
        mutated.write_bytes(_mutate(source.read_bytes(), rng))
        try:
            _exercise(mutated, arch)
        except Exception as exc:  # pragma: no cover - the failure message is the point
            pytest.fail(f"case {case} ({source.name}) raised {type(exc).__name__}: {exc}")
        finally:
            mutated.unlink()
        assert not marker.exists(), f"case {case}: the payload ran"


def test_mutated_images_give_documented_errors(tmp_path: Path) -> None:
    from PIL import Image

    rng = random.Random(99)
    sources = []
    for fmt in ("PNG", "JPEG", "BMP", "WEBP", "TIFF"):
        buf = io.BytesIO()
        pixels = np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buf, format=fmt)
        sources.append(buf.getvalue())
    options = InputOptions()
    for case in range(max(CASES // 2, 50)):
        path = tmp_path / f"img{case}"
        path.write_bytes(_mutate(sources[case % len(sources)], rng))
        try:
            tensor, _, _ = load_input_file(path, options, 3)
            assert tensor.shape[1] == 3
        except FvisError:
            pass
        except Exception as exc:  # pragma: no cover
            pytest.fail(f"image case {case} raised {type(exc).__name__}: {exc}")


def test_payload_pickle_is_really_dangerous(corpus, tmp_path: Path) -> None:
    """Control: the corpus payload does run when unpickled naively, so the test above means
    something."""
    _, marker = corpus
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists() and not marker.exists()
