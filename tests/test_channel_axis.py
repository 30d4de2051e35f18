"""The channel dim of each capture: read from the module that produced it (``fvis.axes``),
used for dead-channel counts and pictures, and said in report.json and the picture title.
Ground truth is computed here from the tensors themselves, never from fvis."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from fvis.api import CheckOptions, DumpOptions, ModelRef, check
from fvis.axes import channel_axis
from fvis.capture import capture
from fvis.gallery import Gallery
from fvis.gates import parse_gates
from fvis.inputs import InputOptions
from fvis.loading import LoadedModel, LoadOptions, ModelSource


class Permute(nn.Module):
    """torchvision.ops.misc.Permute, by name and attribute."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(*self.dims)


def _convnext_like() -> nn.Sequential:
    # ConvNeXt's block: depthwise conv, to channels-last, LayerNorm, MLP, back to channels-first
    return nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        Permute([0, 2, 3, 1]),
        nn.LayerNorm(8),
        nn.Linear(8, 16),
        nn.GELU(),
        nn.Linear(16, 8),
        Permute([0, 3, 1, 2]),
    )


def test_each_layer_of_a_channels_last_block_gets_its_axis() -> None:
    torch.manual_seed(0)
    model, x = _convnext_like(), torch.randn(1, 8, 5, 6)
    result = capture(model, [x], [str(i) for i in range(7)])
    axes = {c.label: c.stats.channel_axis for c in result.captures}
    assert axes == {"0": 1, "1": 3, "2": 3, "3": 3, "4": 3, "5": 3, "6": 1}
    channels = {c.label: c.stats.channels for c in result.captures}
    assert channels == {"0": 8, "1": 8, "2": 8, "3": 16, "4": 16, "5": 8, "6": 8}


def test_a_container_answers_like_its_last_deciding_child() -> None:
    block = _convnext_like()
    assert channel_axis(block, (1, 8, 5, 6)).dim == 1  # ends with Permute to channels first
    assert channel_axis(block[:3], (1, 5, 6, 8)).dim == 3  # ends with LayerNorm(8)


def test_conv1d_sequences_keep_channels_on_dim_1() -> None:
    model = nn.Sequential(nn.Conv1d(4, 6, 1), nn.ReLU())
    result = capture(model, [torch.randn(2, 4, 10)], ["0", "1"])
    assert [c.stats.channel_axis for c in result.captures] == [1, 1]
    assert [c.stats.channels for c in result.captures] == [6, 6]


class _Mlp(nn.Module):
    """A BERT-sized intermediate layer whose even units never fire (bias far below zero)."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(32, 128)
        self.act = nn.ReLU()
        self.out = nn.Linear(128, 32)
        with torch.no_grad():
            self.dense.bias[::2] = -1e4

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.act(self.dense(x)))


def test_dead_units_of_tokens_are_counted_on_the_last_dim() -> None:
    torch.manual_seed(0)
    model, x = _Mlp(), torch.randn(2, 16, 32)
    result = capture(model, [x], ["act"])
    (act,) = result.captures
    with torch.no_grad():  # ground truth straight from the layers, without hooks
        truth = model.act(model.dense(x))
    assert int((truth == 0).all(dim=0).all(dim=0).sum()) == 64  # units: the last dim
    assert int((truth == 0).all(dim=0).all(dim=1).sum()) == 0  # no token (dim 1) is all zero
    assert (act.stats.channels, act.stats.dead_channels, act.stats.channel_axis) == (128, 64, 2)


def _loaded(module: nn.Module) -> Any:
    return LoadedModel(module, ModelSource(None, "test", "", ()))


def test_the_dead_gate_fails_a_sequence_mlp_with_half_its_units_dead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fvis import api

    torch.manual_seed(0)
    monkeypatch.setattr(api, "open_model", lambda ref: _loaded(_Mlp()))
    gates = CheckOptions(gates=parse_gates("dead:0.3"))
    ref = ModelRef(tmp_path / "m.pt", LoadOptions())
    result = check(ref, InputOptions(shape=(2, 16, 32)), DumpOptions(layers=("act",)), gates)
    assert not result.passed
    (capture_json,) = result.dump.report["captures"]
    assert capture_json["stats"]["channel_axis"] == 2
    assert capture_json["stats"]["dead_channels"] == 64


def test_a_channels_last_map_is_drawn_as_one_tile_per_channel() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), Permute([0, 2, 3, 1]), nn.LayerNorm(4))
    result = capture(model, [torch.randn(1, 3, 7, 9)], ["2"])
    gallery = Gallery.from_options(DumpOptions(), ())
    (norm,) = result.captures
    gallery.add(norm)
    refs = gallery.name_files(result.captures)
    (ref,) = refs["2"]
    assert ref.layout == "grid" and ref.total_channels == 4
    assert "channels: last dim (4)" in ref.note
    # each tile's range is that channel's own range over H x W
    values = norm.values
    for index, low, high in ref.channels:
        plane = values[..., index]
        assert (low, high) == pytest.approx((float(plane.min()), float(plane.max())))
    assert np.asarray(values).shape == (7, 9, 4)  # the kept values are not moved


class _PatchEmbed(nn.Module):
    """timm's PatchEmbed: a conv, then flattened to (N, T, D) in its own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 12, 4, stride=4)
        self.norm = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


def test_a_container_that_moves_its_conv_channels_last_says_so() -> None:
    model = nn.Sequential(_PatchEmbed(), nn.GELU())
    result = capture(model, [torch.randn(1, 3, 8, 8)], ["0", "0.proj", "1"])
    got = {c.label: (c.shape, c.stats.channel_axis) for c in result.captures}
    assert got == {"0.proj": ((1, 12, 2, 2), 1), "0": ((1, 4, 12), 2), "1": ((1, 4, 12), 2)}


def test_sizes_that_do_not_match_decide_nothing() -> None:
    # a conv of 12 channels cannot be the producer of (1, 5, 7): no evidence, dim 1 assumed
    axis = channel_axis(nn.Sequential(nn.Conv2d(3, 12, 1)), (1, 5, 7))
    assert axis.dim == 1 and "assumed" in axis.reason


class _TinyVit(nn.Module):
    """torchvision's ViT in miniature: conv patches, flattened, a class token in front."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(3, 8, 4, stride=4)
        self.class_token = nn.Parameter(torch.randn(1, 1, 8))
        self.norm = nn.LayerNorm(8)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.conv_proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.class_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        return self.norm(tokens)


def test_vit_tokens_are_drawn_on_their_patch_grid() -> None:
    torch.manual_seed(0)
    model = _TinyVit()
    result = capture(model, [torch.randn(1, 3, 16, 12)], ["norm"])
    (norm,) = result.captures
    assert norm.shape == (1, 13, 8) and norm.token_grid == (1, 4, 3)
    gallery = Gallery.from_options(DumpOptions(), ())
    gallery.add(norm)
    (ref,) = gallery.name_files(result.captures)["norm"]
    assert ref.layout == "grid" and ref.total_channels == 8
    assert "tokens on their 4x3 grid" in ref.note and "1 class token not drawn" in ref.note
    # tile c, pixel (i, j) is patch token 1 + 3 i + j, feature c: compare ranges per feature
    patches = norm.values[1:].reshape(4, 3, 8)
    for index, low, high in ref.channels:
        plane = patches[..., index]
        assert (low, high) == pytest.approx((float(plane.min()), float(plane.max())))


def test_tokens_without_a_patch_grid_stay_a_heatmap() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
    result = capture(model, [torch.randn(1, 10, 4)], ["1"])
    assert result.captures[0].token_grid is None
