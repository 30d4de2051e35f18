"""Outputs that are not plain tensors: tensors inside objects are followed and named by path,
labels never collide with module names, and an output without tensors gets a note."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from typer.testing import CliRunner

from fvis.api import DumpOptions, ModelRef, dump
from fvis.capture import capture, flatten_tensors
from fvis.cli import app
from fvis.errors import UsageError
from fvis.grads import diagnose
from fvis.inputs import InputOptions
from fvis.loading import LoadOptions


class _Images:
    """Like torchvision's ImageList: a plain object holding a tensor and sizes."""

    def __init__(self, tensors: Tensor, sizes: list[tuple[int, int]]) -> None:
        self.tensors = tensors
        self.image_sizes = sizes


class _Slotted:
    __slots__ = ("unset", "value")

    def __init__(self, value: Tensor) -> None:
        self.value = value


class _NormalHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.loc = nn.Linear(3, 2)
        self.log_scale = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> torch.distributions.Normal:
        return torch.distributions.Normal(self.loc(x), self.log_scale(x).exp())


class _DistModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 3)
        self.head = _NormalHead()

    def forward(self, x: Tensor) -> torch.distributions.Normal:
        return self.head(torch.relu(self.body(x)))


def test_a_distribution_output_is_followed_and_upstream_layers_are_connected() -> None:
    torch.manual_seed(0)
    model, x = _DistModel(), torch.randn(2, 3)
    result = capture(model, [x], ["body", "head", "head.loc"])
    labels = [c.label for c in result.captures]
    # `head.loc` is a child module's name: the output's attribute is written head->loc.
    assert labels == ["body", "head.loc", "head->loc", "head->scale"]
    verdicts = diagnose(result)
    # Ground truth from autograd: the output distribution's loc depends on body's output.
    loss = result.output.loc.sum() + result.output.scale.sum()
    body = next(c for c in result.captures if c.label == "body")
    assert body.grad.requires_grad
    assert all(v.connected for v in verdicts.values()), {k: v.summary for k, v in verdicts.items()}
    (grad,) = torch.autograd.grad(loss, model.body.weight)
    assert grad.abs().sum() > 0


class _ListModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: Tensor) -> _Images:
        return _Images(self.conv(x), [(4, 4)] * x.shape[0])


def test_tensors_in_object_attributes_get_paths_and_are_connected() -> None:
    model, x = _ListModel(), torch.randn(1, 3, 4, 4)
    result = capture(model, [x], ["", "conv"])
    assert [c.label for c in result.captures] == ["conv", ".tensors"]
    assert all(v.connected for v in diagnose(result).values())


def test_slots_cycles_and_depth_are_bounded() -> None:
    t = torch.zeros(1)
    cyclic: dict[str, Any] = {"t": t}
    cyclic["self"] = cyclic
    notes: list[str] = []
    deep: Any = t
    for _ in range(12):
        deep = [deep]
    paths = [p for p, _ in flatten_tensors({"s": _Slotted(t), "c": cyclic, "d": deep}, notes=notes)]
    assert paths == ["['s'].value", "['c']['t']"]
    assert any("nested deeper than" in n for n in notes)


class _ReturnDict(nn.Module):
    """torchinfo's ReturnDict: a dict key equal to a child's name."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 3)
        self.fc2 = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"fc1": self.fc1(x), "fc2": self.fc2(x) * 2}


class _Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.return_dict = _ReturnDict()

    def forward(self, x: Tensor) -> Tensor:
        out = self.return_dict(x)
        return out["fc1"] + out["fc2"]


def test_dict_keys_never_collide_with_child_names() -> None:
    torch.manual_seed(0)
    model = _Outer()
    result = capture(model, [torch.randn(1, 3)], ["return_dict", "return_dict.fc1"])
    labels = [c.label for c in result.captures]
    assert labels == ["return_dict.fc1", "return_dict['fc1']", "return_dict['fc2']"]
    assert len(set(labels)) == len(labels) == len(diagnose(result))


def test_saved_tensors_keep_every_capture_of_a_dict_output(
    tmp_path: Path, monkeypatch: Any
) -> None:
    from fvis import api

    monkeypatch.setattr(api, "open_model", lambda ref: _loaded(_Outer()))
    options = DumpOptions(layers=("return_dict", "return_dict.fc1"), save_tensors=True)
    out = tmp_path / "out"
    dump(ModelRef(tmp_path / "m.pt", LoadOptions()), InputOptions(shape=(1, 3)), options, out)
    saved = load_file(str(out / "activations.safetensors"))
    assert set(saved) == {"return_dict.fc1", "return_dict['fc1']", "return_dict['fc2']"}
    # fc1 the child and fc1 the key are the same values; fc2 is doubled inside the forward
    assert torch.equal(saved["return_dict.fc1"], saved["return_dict['fc1']"])


def _loaded(module: nn.Module) -> Any:
    from fvis.loading import LoadedModel, ModelSource

    return LoadedModel(module, ModelSource(None, "test", "", ()))


class _Transform(nn.Module):
    def forward(self, x: Tensor) -> Any:
        return None if x.sum() > 1e9 else "prepared"


class _Uses(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.transform = _Transform()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        self.transform(x)
        return self.fc(x)


def test_a_layer_without_tensor_output_gets_a_note() -> None:
    result = capture(_Uses(), [torch.ones(1, 3)], ["transform", "fc"])
    assert [c.label for c in result.captures] == ["fc"]
    assert result.output_notes == {
        "transform": ("returned a str 'prepared': no tensor to capture",)
    }


def test_check_names_the_layer_that_returned_no_tensor(tmp_path: Path, monkeypatch: Any) -> None:
    from fvis import api

    monkeypatch.setattr(api, "open_model", lambda ref: _loaded(_Uses()))
    args = ["check", str(tmp_path / "m.pt"), "--layer", "transform", "--shape", "1,3"]
    args += ["--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "note: transform: returned a str 'prepared': no tensor to capture" in result.output
    assert "(0 captures; no tensor from transform)" in result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["output_notes"] == [
        {"layer": "transform", "note": "returned a str 'prepared': no tensor to capture"}
    ]
    assert "transform" in (tmp_path / "out" / "report.md").read_text()
    assert "returned a str &#39;prepared&#39;" in (tmp_path / "out" / "report.html").read_text()


# --------------------------------------------------------------------------- TorchScript


def test_capture_refuses_a_scripted_model_like_the_cli() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated
        scripted = torch.jit.script(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
        outer = nn.Sequential(nn.Linear(2, 2), torch.jit.script(nn.ReLU()))
    x = torch.ones(1, 2)
    with pytest.raises(UsageError, match="hooks do not work on ScriptModules") as caught:
        capture(scripted, [x], ["0"])
    assert "torch.export" in (caught.value.hint or "")
    with pytest.raises(UsageError, match="layer '1' is TorchScript"):
        capture(outer, [x], ["1"])
    assert [c.label for c in capture(outer, [x], ["0"]).captures] == ["0"]
