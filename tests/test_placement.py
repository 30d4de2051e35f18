"""--device and --dtype: the model cast after loading, inputs following, statistics exact
against a float64 reference of the very values captured, devices that are not there refused
in one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.conftest import RunCli


class Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.act(self.bn(self.conv(x)))).flatten(1))


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(50, 16)
        self.norm = nn.LayerNorm(16)
        self.mlp = nn.Linear(16, 16)
        self.head = nn.Linear(16, 50)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mlp(self.norm(self.wte(ids)))))


def _saved(tmp_path: Path, model: nn.Module, name: str, inputs: torch.Tensor) -> tuple[Path, Path]:
    torch.manual_seed(0)
    for p in model.parameters():  # values away from zero, so a cast really rounds
        nn.init.normal_(p, 0.3, 0.7)
    weights, data = tmp_path / f"{name}.pt", tmp_path / f"{name}_in.pt"
    torch.save(model.state_dict(), weights)
    torch.save(inputs, data)
    return weights, data


def _dump(cli: RunCli, weights: Path, arch: str, data: Path, out: Path, *extra: str) -> dict:
    code, _, err = cli(
        "dump", weights, "--arch", arch, "--input", data, "--all", "--save-tensors",
        "--no-images", "--out", out, "--quiet", *extra,
    )  # fmt: skip
    assert code == 0, err
    return json.loads((out / "report.json").read_text())


def _hooked(model: nn.Module, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if name and not list(module.children()):
            module.register_forward_hook(
                lambda _m, _i, out, name=name: seen.setdefault(name, out.detach().clone())
            )
    with torch.enable_grad():
        model(inputs)
    return seen


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("which", ["convs", "tokens"])
def test_dtype_statistics_are_exact_against_a_float64_reference(
    tmp_path: Path, cli: RunCli, dtype: str, which: str
) -> None:
    model: nn.Module = Convs() if which == "convs" else Tokens()
    inputs = torch.randn(2, 3, 8, 8) if which == "convs" else torch.randint(0, 50, (2, 6))
    weights, data = _saved(tmp_path, model, which, inputs)
    arch = f"tests.test_placement:{type(model).__name__}"
    report = _dump(cli, weights, arch, data, tmp_path / "out", "--device", "cpu", "--dtype", dtype)
    assert (report["input"]["device"], report["input"]["dtype"]) == ("cpu", dtype)
    expected_in = "int64" if which == "tokens" else dtype  # ids keep their dtype
    assert report["input"]["dtypes"] == [expected_in]
    # ground truth: the same weights cast by torch, run with independent hooks
    cast = type(model)()
    cast.load_state_dict(torch.load(weights))
    cast = cast.to(getattr(torch, dtype)).eval()
    hooked = _hooked(cast, inputs.to(getattr(torch, dtype)) if which == "convs" else inputs)
    saved = load_file(str(tmp_path / "out" / "activations.safetensors"))
    for capture in report["captures"]:
        label = capture["label"]
        assert saved[label].dtype == getattr(torch, dtype) == hooked[label].dtype
        assert torch.equal(saved[label], hooked[label]), label
        ref = hooked[label].double()
        stats = capture["stats"]
        assert stats["min"] == float(ref.min()) and stats["max"] == float(ref.max())
        assert stats["mean"] == pytest.approx(float(ref.mean()), rel=1e-6, abs=1e-9)
        assert stats["std"] == pytest.approx(float(ref.std(correction=1)), rel=1e-5, abs=1e-9)
        assert stats["zero_fraction"] == float((ref == 0).double().mean())
    # and the cast is real: float32 values differ
    plain = _dump(cli, weights, arch, data, tmp_path / "f32")
    assert plain["input"]["dtype"] == "float32"
    assert [c["stats"]["mean"] for c in plain["captures"]] != [
        c["stats"]["mean"] for c in report["captures"]
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--device", "gpu"), "--device 'gpu': choose cpu, cuda, cuda:N, mps or auto"),
        (("--dtype", "int8"), "--dtype 'int8': choose one of float32, bfloat16, float16"),
        (("--max-memory", "cpu=1GiB"), "--max-memory and --offload-folder need --device-map auto"),
        (("--device-map", "balanced"), "--device-map 'balanced': only 'auto' is supported"),
    ],
)
def test_bad_placement_is_one_line(
    cli: RunCli, tmp_path: Path, chdir: Path, args: tuple[str, ...], message: str
) -> None:
    code, _, err = cli("dump", *args, "--out", tmp_path / "out")
    assert code == 2
    assert f"fvis: error: {message}" in err.splitlines()
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_refused(cli: RunCli, tmp_path: Path, chdir: Path) -> None:
    code, _, err = cli("dump", "--device", "cuda", "--out", tmp_path / "out")
    assert code == 2
    assert "fvis: error: --device cuda: no CUDA device is available here" in err.splitlines()


def test_header_and_config_name_the_placement(cli: RunCli, tmp_path: Path, chdir: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[tool.fvis]\ndevice = "cpu"\ndtype = "bf16"\n')
    code, out, err = cli("dump", "--out", tmp_path / "out")
    assert code == 0, err
    assert "device: cpu, dtype: bfloat16" in out.splitlines()[0]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["input"]["dtypes"] == ["bfloat16"]
    code, _, err = cli("check", "--dtype", "float16")  # the flag wins over the file
    assert code == 0, err


def test_a_live_module_is_not_changed_by_a_cast() -> None:
    from fvis.api import DumpOptions, check_module

    model = Convs().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = check_module(model, [torch.randn(1, 3, 8, 8)], DumpOptions(dtype="bfloat16"))
    assert result.dump.report["input"]["dtype"] == "bfloat16"
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_an_already_placed_module_keeps_its_device() -> None:
    from fvis.api import DumpOptions, check_module
    from fvis.placement import Placement, resolve

    model: Any = nn.Linear(3, 3)
    result = check_module(model, [torch.randn(1, 3)], DumpOptions(images=False))
    assert result.dump.report["input"]["device"] == "cpu"
    assert resolve(Placement(), model.to("meta"), loaded=False) == torch.device("meta")
