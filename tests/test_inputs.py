"""fvis.inputs / fvis.images: every kind of input file becomes the right tensor, and every bad
one is refused with the right error (and exit code through the CLI)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fvis.errors import BadFileError, ExitStatus, ModelInputError, UsageError
from fvis.inputs import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    InputOptions,
    Prepared,
    parse_shape,
    parse_size,
    prepare,
)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CLI runs use the bundled default model: run in an empty folder (no pyproject.toml)."""
    monkeypatch.chdir(tmp_path)


CONV3 = nn.Sequential(nn.Conv2d(3, 2, 1))
CONV1 = nn.Sequential(nn.Conv2d(1, 2, 1))
LINEAR = nn.Sequential(nn.Linear(3, 2))


def _prep(model: nn.Module, *sources: Path | str, **options: Any) -> Prepared:
    return prepare(model, InputOptions(sources=tuple(str(s) for s in sources), **options))


def _tensor(prepared: Prepared) -> Tensor:
    (tensor,) = prepared.args
    assert isinstance(tensor, Tensor)
    return tensor


def _rgb(height: int = 5, width: int = 7) -> np.ndarray:
    array = np.zeros((height, width, 3), np.uint8)
    array[0, 0] = (255, 128, 0)
    array[-1, -1] = (10, 20, 30)
    return array


# --------------------------------------------------------------------------- image modes


def test_png_rgb(tmp_path: Path) -> None:
    path = tmp_path / "rgb.png"
    Image.fromarray(_rgb()).save(path)
    prepared = _prep(CONV3, path, norm="none")
    t = _tensor(prepared)
    assert t.shape == (1, 3, 5, 7) and t.dtype == torch.float32
    np.testing.assert_allclose(t[0, :, 0, 0], [1.0, 128 / 255, 0.0], rtol=1e-6)
    np.testing.assert_allclose(t[0, :, -1, -1], [10 / 255, 20 / 255, 30 / 255], rtol=1e-6)
    assert float(t.min()) == 0.0 and float(t.max()) == 1.0
    assert prepared.labels == ("rgb.png",)
    assert prepared.display is not None and prepared.display.shape == (5, 7, 3)
    assert "7x5 RGB" in prepared.description


def test_png_rgba_composited_on_black(tmp_path: Path) -> None:
    path = tmp_path / "rgba.png"
    alpha = np.full((5, 7, 1), 128, np.uint8)
    alpha[0, 1] = 0
    Image.fromarray(np.concatenate([_rgb(), alpha], axis=2)).save(path)
    prepared = _prep(CONV3, path, norm="none")
    t = _tensor(prepared)
    assert t.shape == (1, 3, 5, 7)
    np.testing.assert_allclose(t[0, :, 0, 0], np.array([1.0, 128 / 255, 0]) * 128 / 255, rtol=1e-5)
    assert float(t[0, :, 0, 1].abs().sum()) == 0.0
    assert "alpha composited on black" in prepared.description


def test_png_grey_repeated_to_three_channels_for_rgb_model(tmp_path: Path) -> None:
    path = tmp_path / "grey.png"
    grey = np.arange(35, dtype=np.uint8).reshape(5, 7) * 7
    Image.fromarray(grey, mode="L").save(path)
    prepared = _prep(CONV3, path, norm="none")
    t = _tensor(prepared)
    assert t.shape == (1, 3, 5, 7)
    for c in range(3):
        np.testing.assert_allclose(t[0, c], grey / 255.0, rtol=1e-6)
    assert "grey repeated to 3 channels" in prepared.description


def test_png_grey_stays_one_channel_for_grey_model(tmp_path: Path) -> None:
    path = tmp_path / "grey.png"
    Image.fromarray(np.full((4, 4), 51, np.uint8), mode="L").save(path)
    prepared = _prep(CONV1, path)
    t = _tensor(prepared)
    assert t.shape == (1, 1, 4, 4)
    np.testing.assert_allclose(t, 0.2, rtol=1e-6)  # auto norm: no ImageNet stats for 1 channel
    assert "repeated" not in prepared.description


def test_rgb_to_one_channel_model_uses_luminance(tmp_path: Path) -> None:
    path = tmp_path / "rgb.png"
    Image.fromarray(np.full((2, 2, 3), (255, 0, 0), np.uint8)).save(path)
    prepared = _prep(CONV1, path, norm="none")
    np.testing.assert_allclose(_tensor(prepared), 0.299, rtol=1e-5)
    assert "1 channel" in prepared.description


def test_png_palette(tmp_path: Path) -> None:
    path = tmp_path / "p.png"
    palette_image = Image.fromarray(_rgb()).convert("P")
    palette_image.save(path)
    expected = np.asarray(Image.open(path).convert("RGB"), np.float32) / 255.0
    prepared = _prep(CONV3, path, norm="none")
    t = _tensor(prepared)
    assert t.shape == (1, 3, 5, 7)
    np.testing.assert_allclose(t[0].permute(1, 2, 0).numpy(), expected, rtol=1e-6)
    assert "P converted to RGB" in prepared.description


def test_png_16_bit_is_scaled_not_clipped(tmp_path: Path) -> None:
    path = tmp_path / "i16.png"
    values = np.zeros((3, 4), np.uint16)
    values[0, 0], values[0, 1], values[1, 2] = 65535, 1000, 300
    Image.fromarray(values).save(path)
    with Image.open(path) as check:
        assert check.mode == "I;16"
    prepared = _prep(CONV1, path, norm="none")
    t = _tensor(prepared)
    assert t.shape == (1, 1, 3, 4)
    assert float(t.max()) == 1.0
    assert float(t[0, 0, 0, 1]) == pytest.approx(1000 / 65535)
    assert float(t[0, 0, 1, 2]) == pytest.approx(300 / 65535)  # above 255: not clipped to 1
    assert "16-bit values scaled to [0, 1]" in prepared.description


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # 16 wide x 8 high: left half red, right half blue. Orientation 6 = rotate 90° clockwise
    # to display, so the displayed image is 8 wide x 16 high with red on top.
    array = np.zeros((8, 16, 3), np.uint8)
    array[:, :8] = (255, 0, 0)
    array[:, 8:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(array).save(path, exif=exif, quality=95)
    t = _tensor(_prep(CONV3, path, norm="none"))
    assert t.shape == (1, 3, 16, 8)
    top, bottom = t[0, :, :6], t[0, :, -6:]
    assert float(top[0].mean()) > 0.8 and float(top[2].mean()) < 0.2
    assert float(bottom[2].mean()) > 0.8 and float(bottom[0].mean()) < 0.2


def test_size_resizes(tmp_path: Path) -> None:
    path = tmp_path / "rgb.png"
    Image.fromarray(np.full((5, 7, 3), 200, np.uint8)).save(path)
    prepared = _prep(CONV3, path, size=(12, 10), norm="none")
    t = _tensor(prepared)
    assert t.shape == (1, 3, 12, 10)
    np.testing.assert_allclose(t, 200 / 255, rtol=1e-5)  # a flat image stays flat
    assert "resized to 12x10" in prepared.description


def test_parse_shape_and_size() -> None:
    assert parse_shape("1,3,224,224") == (1, 3, 224, 224)
    assert parse_shape("2x10") == (2, 10)
    assert parse_size("224") == (224, 224)
    assert parse_size("32x48") == (32, 48)
    for bad in ("", "0,3", "a,b", "1,2,3,4,5,6,7", "-1"):
        with pytest.raises(UsageError):
            parse_shape(bad)
    for bad in ("0", "1x2x3", "9000", "ax3"):
        with pytest.raises(UsageError):
            parse_size(bad)


# --------------------------------------------------------------------------- normalisation


@pytest.fixture
def flat_png(tmp_path: Path) -> Path:
    path = tmp_path / "flat.png"
    Image.fromarray(np.full((2, 2, 3), (51, 102, 204), np.uint8)).save(path)
    return path


RAW = np.array([0.2, 0.4, 0.8])


def test_norm_none(flat_png: Path) -> None:
    t = _tensor(_prep(CONV3, flat_png, norm="none"))
    np.testing.assert_allclose(t[0, :, 0, 0], RAW, rtol=1e-6)


@pytest.mark.parametrize("norm", ["imagenet", "auto"])
def test_norm_imagenet(flat_png: Path, norm: str) -> None:
    prepared = _prep(CONV3, flat_png, norm=norm)
    want = (RAW - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(_tensor(prepared)[0, :, 1, 1], want, rtol=1e-5)
    assert "ImageNet mean/std" in prepared.description


def test_norm_mean_std(flat_png: Path) -> None:
    t = _tensor(_prep(CONV3, flat_png, norm="0.5,0.25"))
    np.testing.assert_allclose(t[0, :, 0, 0], (RAW - 0.5) / 0.25, rtol=1e-5)


def test_norm_per_channel(flat_png: Path) -> None:
    t = _tensor(_prep(CONV3, flat_png, norm="0.1,0.2,0.3/0.5,0.5,2"))
    want = (RAW - np.array([0.1, 0.2, 0.3])) / np.array([0.5, 0.5, 2.0])
    np.testing.assert_allclose(t[0, :, 0, 0], want, rtol=1e-5)


@pytest.mark.parametrize("norm", ["0.5", "a,b", "0.5,0", "0.1,0.2/0.5,0.5", "0.5,-1"])
def test_bad_norm_is_usage_error(flat_png: Path, norm: str) -> None:
    with pytest.raises(UsageError, match="--norm"):
        _prep(CONV3, flat_png, norm=norm)


def test_imagenet_norm_on_grey_model_is_usage_error(flat_png: Path) -> None:
    with pytest.raises(UsageError, match="3 channels"):
        _prep(CONV1, flat_png, norm="imagenet")


# --------------------------------------------------------------------------- tensor files


def test_npy(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.arange(6, dtype=np.float64).reshape(2, 3))
    prepared = _prep(LINEAR, path)
    t = _tensor(prepared)
    # NumPy saves float64; the model's parameters are float32, so the input follows them.
    assert t.dtype == torch.float32 and t.shape == (2, 3)
    assert t.flatten().tolist() == [0, 1, 2, 3, 4, 5]
    assert prepared.description == "x.npy (npy); float64 cast to float32 to match the model"


def test_object_npy_refused(tmp_path: Path, cli: Any) -> None:
    path = tmp_path / "obj.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(BadFileError, match=r"obj\.npy"):
        _prep(LINEAR, path)
    code, stdout, stderr = cli("dump", "--input", path, "--out", tmp_path / "out")
    assert code == ExitStatus.BAD_FILE == 3
    assert stderr.count("fvis: error:") == 1 and "obj.npy" in stderr
    assert "Traceback" not in stderr and stdout == ""
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_pt_tensor(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    torch.save(torch.arange(6.0).reshape(2, 3), path)
    t = _tensor(_prep(LINEAR, path))
    assert torch.equal(t, torch.arange(6.0).reshape(2, 3))


def test_safetensors_tensor(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"x": torch.full((2, 3), 2.5)}, str(path))
    prepared = _prep(LINEAR, path)
    assert torch.equal(_tensor(prepared), torch.full((2, 3), 2.5))
    assert "(safetensors)" in prepared.description


def test_state_dict_as_input_refused_with_swap_hint(tmp_path: Path, cli: Any) -> None:
    path = tmp_path / "weights.pt"
    torch.save(nn.Linear(3, 3).state_dict(), path)
    with pytest.raises(ModelInputError) as info:
        _prep(LINEAR, path)
    assert "state dict" in info.value.message
    assert info.value.hint is not None and "fvis dump MODEL --input INPUT" in info.value.hint
    code, _, stderr = cli("dump", "--input", path, "--out", tmp_path / "out")
    assert code == ExitStatus.MODEL_INPUT
    assert "hint: the model comes first" in stderr


def test_empty_file_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(BadFileError, match="empty"):
        _prep(CONV3, path)


def test_truncated_png_refused(tmp_path: Path, cli: Any) -> None:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
    data = buffer.getvalue()
    path = tmp_path / "cut.png"
    path.write_bytes(data[: int(len(data) * 0.7)])
    with pytest.raises(BadFileError, match=r"cut\.png"):
        _prep(CONV3, path)
    code, _, stderr = cli("dump", "--input", path, "--out", tmp_path / "out")
    assert code == ExitStatus.BAD_FILE and "Traceback" not in stderr


def test_text_file_is_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(BadFileError, match="not an image"):
        _prep(CONV3, path)


def test_missing_input_is_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such file"):
        _prep(CONV3, tmp_path / "absent.png")


# --------------------------------------------------------------------------- batches


def _folder(tmp_path: Path, sizes: list[tuple[int, int]]) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for index, (height, width) in enumerate(sizes):
        name = ["b.png", "a.png", "c.png", "d.png"][index]
        Image.fromarray(np.full((height, width, 3), index * 60, np.uint8)).save(folder / name)
    (folder / ".hidden.png").write_bytes(b"not read")
    return folder


def test_folder_of_three_images_is_one_batch_with_labels(tmp_path: Path) -> None:
    folder = _folder(tmp_path, [(4, 6)] * 3)
    prepared = _prep(CONV3, folder, norm="none")
    t = _tensor(prepared)
    assert t.shape == (3, 3, 4, 6) and prepared.batch_size == 3
    assert prepared.labels == ("a.png", "b.png", "c.png")  # sorted by name
    # a.png was written second (value 60), b.png first (0), c.png third (120)
    assert [round(float(t[i].mean()) * 255) for i in range(3)] == [60, 0, 120]
    assert "3 files batched (3, 3, 4, 6)" in prepared.description


def test_images_of_different_sizes_need_size(tmp_path: Path) -> None:
    folder = _folder(tmp_path, [(4, 6), (4, 6), (5, 6)])
    with pytest.raises(ModelInputError, match="differ in shape") as info:
        _prep(CONV3, folder)
    assert info.value.hint is not None and "--size" in info.value.hint
    t = _tensor(_prep(CONV3, folder, size=(8, 8)))
    assert t.shape == (3, 3, 8, 8)


def test_keyword_inputs(tmp_path: Path, cli: Any) -> None:
    a_file, b_file = tmp_path / "a.npy", tmp_path / "b.npy"
    np.save(a_file, np.ones((1, 3), np.float32))
    np.save(b_file, np.full((1, 2), 5.0, np.float32))
    arch = tmp_path / "two_inputs.py"
    arch.write_text(
        "import torch\n"
        "from torch import nn\n\n\n"
        "class TwoInputs(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.proj = nn.Linear(3, 2)\n\n"
        "    def forward(self, a, b):\n"
        "        return self.proj(a) * b\n\n\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return TwoInputs()\n"
    )
    torch.manual_seed(0)
    model = nn.Module()
    model.proj = nn.Linear(3, 2)
    prepared = _prep(model, f"a={a_file}", f"b={b_file}")
    assert prepared.args == ()
    assert set(prepared.kwargs) == {"a", "b"}
    assert prepared.kwargs["b"].shape == (1, 2)
    weights = tmp_path / "two.pt"
    torch.save({"proj.weight": model.proj.weight, "proj.bias": model.proj.bias}, weights)
    out = tmp_path / "out"
    code, _, stderr = cli(
        "dump",
        weights,
        "--arch",
        f"{arch}:build",
        "-i",
        f"a={a_file}",
        "-i",
        f"b={b_file}",
        "--layer",
        "proj",
        "--save-tensors",
        "--out",
        out,
    )
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    assert report["input"]["shapes"] == [[1, 3], [1, 2]]
    assert "a=a.npy" in report["input"]["description"]
    with torch.no_grad():
        want = model.proj(torch.ones(1, 3))
    np.testing.assert_allclose(load_file(str(out / "activations.safetensors"))["proj"], want)


# --------------------------------------------------------------------------- synthesized


@pytest.mark.parametrize(
    ("model", "shape", "dtype"),
    [
        (nn.Sequential(nn.Conv2d(5, 2, 3)), (1, 5, 224, 224), torch.float32),
        (nn.Sequential(nn.Conv1d(2, 2, 3)), (1, 2, 256), torch.float32),
        (nn.Sequential(nn.Linear(7, 2)), (1, 7), torch.float32),
        (nn.Sequential(nn.Embedding(50, 4)), (1, 16), torch.int64),
    ],
)
def test_synthesized_input_from_first_layer(
    model: nn.Module, shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    prepared = prepare(model, InputOptions())
    t = _tensor(prepared)
    assert t.shape == shape and t.dtype == dtype
    assert prepared.description.startswith("synthesized from the first layer")
    if dtype == torch.int64:
        assert int(t.min()) >= 0 and int(t.max()) < 50
        assert "token ids" in prepared.description
    model(t)  # the synthesized input fits the model


def test_no_layer_to_guess_from_is_usage_error() -> None:
    with pytest.raises(UsageError, match="cannot guess") as info:
        prepare(nn.Sequential(nn.ReLU()), InputOptions())
    assert info.value.hint is not None and "--shape" in info.value.hint


def test_shape_and_seed_reproducible() -> None:
    def make(seed: int) -> Tensor:
        return _tensor(prepare(LINEAR, InputOptions(shape=(2, 3), seed=seed)))

    assert torch.equal(make(4), make(4))
    assert not torch.equal(make(4), make(5))
    assert make(4).shape == (2, 3)
    assert prepare(LINEAR, InputOptions(shape=(2, 3), seed=4)).description == (
        "random normal (2, 3), seed 4"
    )


def test_shape_and_input_together_is_usage_error(flat_png: Path) -> None:
    with pytest.raises(UsageError, match="either --input or --shape"):
        prepare(CONV3, InputOptions(sources=(str(flat_png),), shape=(1, 3, 2, 2)))
