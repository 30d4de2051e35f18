"""--save-tensors writes what was captured: every sample, in its own dtype, with metadata."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from fvis.api import DumpOptions, ModelRef, dump
from fvis.inputs import InputOptions
from fvis.loading import LoadOptions


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x)).mean(dim=(2, 3))


def _dump_bf16(tmp_path: Path) -> tuple[Path, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = _Net().to(torch.bfloat16).eval()
    x = torch.randn(3, 3, 6, 6).to(torch.bfloat16)
    source = tmp_path / "x.pt"
    torch.save(x, source)
    ref = ModelRef(None, LoadOptions(), module=model)
    out = tmp_path / "out"
    options = DumpOptions(layers=("conv", "act"), save_tensors=True, images=False)
    dump(ref, InputOptions(sources=(str(source),)), options, out)
    return out / "activations.safetensors", model, x


def test_whole_batch_in_its_own_dtype(tmp_path: Path) -> None:
    path, model, x = _dump_bf16(tmp_path)
    seen: dict[str, torch.Tensor] = {}
    handles = [
        getattr(model, name).register_forward_hook(
            lambda _m, _a, out, name=name: seen.__setitem__(name, out.detach().clone())
        )
        for name in ("conv", "act")
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    with safe_open(str(path), "pt") as file:
        for name in ("conv", "act"):
            saved = file.get_tensor(name)
            assert saved.dtype == torch.bfloat16
            assert saved.shape == (3, 4, 6, 6)
            assert torch.equal(saved, seen[name])  # bit-exact, every sample


def test_metadata_names_layer_shape_and_dtype(tmp_path: Path) -> None:
    path, _, _ = _dump_bf16(tmp_path)
    with safe_open(str(path), "pt") as file:
        metadata = file.metadata()
    assert metadata["fvis.schema"] == "fvis.activations/1"
    entry = json.loads(metadata["act"])
    assert entry == {
        "layer": "act",
        "call": 1,
        "path": "",
        "batch": None,
        "shape": [3, 4, 6, 6],
        "dtype": "bfloat16",
        "whole_batch": True,
    }
