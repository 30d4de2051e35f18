"""fvis.formats.sniff: formats told apart by content, wrong files named plainly."""

from __future__ import annotations

import random
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from fvis.errors import BadFileError, ExitStatus, UsageError
from fvis.formats import FileKind, sniff
from fvis.loading import inspect_model

ZOO_KINDS = {
    "state_dict.pt": FileKind.TORCH_ZIP,
    "training.pt": FileKind.TORCH_ZIP,
    "module.pt": FileKind.TORCH_ZIP,
    "input.pt": FileKind.TORCH_ZIP,
    "torchscript.pt": FileKind.TORCHSCRIPT,
    "pt2": FileKind.EXPORT_PROGRAM,
    "safetensors": FileKind.SAFETENSORS,
}
SAMPLES = ("inner_outer", "nested_cnn", "tiny_transformer")


@pytest.mark.parametrize("suffix", ZOO_KINDS)
@pytest.mark.parametrize("name", SAMPLES)
def test_zoo_formats_classify_by_content(zoo: Path, name: str, suffix: str) -> None:
    found = sniff(zoo / f"{name}.{suffix}")
    assert found.kind is ZOO_KINDS[suffix]
    if found.kind is not FileKind.SAFETENSORS:
        assert found.prefix.endswith("/")  # every zip entry lives under one folder


def test_legacy_pickle_classifies(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)
    assert sniff(path).kind is FileKind.LEGACY_PICKLE


def test_safetensors_named_pt_is_safetensors(zoo: Path, tmp_path: Path) -> None:
    renamed = tmp_path / "weights.pt"
    shutil.copy(zoo / "nested_cnn.safetensors", renamed)
    assert sniff(renamed).kind is FileKind.SAFETENSORS
    assert "backbone.layer1.0.conv1" in inspect_model(renamed).names()


def test_torch_file_named_safetensors_is_torch(zoo: Path, tmp_path: Path) -> None:
    renamed = tmp_path / "weights.safetensors"
    shutil.copy(zoo / "nested_cnn.state_dict.pt", renamed)
    assert sniff(renamed).kind is FileKind.TORCH_ZIP
    assert "backbone.layer1.0.conv1" in inspect_model(renamed).names()


def _png(path: Path) -> Path:
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path, format="PNG")
    return path


def _jpeg(path: Path) -> Path:
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path, format="JPEG")
    return path


def _text(path: Path) -> Path:
    path.write_text("model: resnet50\nepochs: 3\nthis is a config, not weights\n")
    return path


def _random_bytes(path: Path) -> Path:
    data = random.Random(1234).randbytes(4096)
    path.write_bytes(b"\x01" + data)  # not 0x80 (pickle) nor "PK" (zip) nor a safetensors head
    return path


def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _plain_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes/readme.txt", "hello")
        archive.writestr("notes/data.csv", "a,b\n1,2\n")
    return path


WRONG_FILES = {
    "png": (_png, "is a PNG image"),
    "jpeg": (_jpeg, "is a JPEG image"),
    "text": (_text, "is a text file"),
    "random": (_random_bytes, "not a PyTorch checkpoint"),
    "empty": (_empty, "is empty (0 bytes)"),
    "plain-zip": (_plain_zip, "zip archive but not a PyTorch checkpoint"),
}


@pytest.mark.parametrize("case", WRONG_FILES)
def test_wrong_files_are_bad_file_errors(tmp_path: Path, case: str) -> None:
    make, phrase = WRONG_FILES[case]
    path = make(tmp_path / "model.pt")
    with pytest.raises(BadFileError) as info:
        sniff(path)
    assert info.value.exit_status == ExitStatus.BAD_FILE == 3
    assert str(path) in info.value.message
    assert phrase in info.value.message
    assert "\n" not in info.value.message
    for text in (info.value.message, info.value.hint or ""):
        assert "weights_only" not in text and "--trust" not in text


@pytest.mark.parametrize("make", [_png, _jpeg])
def test_image_hint_says_arguments_are_swapped(
    tmp_path: Path, make: Callable[[Path], Path]
) -> None:
    path = make(tmp_path / "cat.img")
    with pytest.raises(BadFileError) as info:
        sniff(path)
    assert info.value.hint is not None
    assert "--input" in info.value.hint and "model comes first" in info.value.hint


def test_text_and_empty_files_get_no_swapped_hint(tmp_path: Path) -> None:
    for path in (_text(tmp_path / "a.pt"), _empty(tmp_path / "b.pt")):
        with pytest.raises(BadFileError) as info:
            sniff(path)
        assert info.value.hint is None


@pytest.mark.parametrize("cut", ["middle", "last-bytes"])
def test_truncated_zip_checkpoint(zoo: Path, tmp_path: Path, cut: str) -> None:
    data = (zoo / "nested_cnn.state_dict.pt").read_bytes()
    keep = len(data) // 2 if cut == "middle" else len(data) - 7
    path = tmp_path / "cut.pt"
    path.write_bytes(data[:keep])
    with pytest.raises(BadFileError) as info:
        sniff(path)
    assert "truncated" in info.value.message
    assert info.value.exit_status == 3
    with pytest.raises(BadFileError):  # the public entry point says the same
        inspect_model(path)


def test_directory_is_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as info:
        sniff(tmp_path)
    assert info.value.exit_status == ExitStatus.USAGE == 2
    assert "folder" in info.value.message


def test_missing_path_is_usage_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(UsageError) as info:
        sniff(missing)
    assert info.value.exit_status == 2
    assert str(missing) in info.value.message and "no such file" in info.value.message
