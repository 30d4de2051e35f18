"""Facts about real models' captures (issue 14, part B): the channel axis of channels-last and
token activations, tensors inside output objects, and a builder that tries to download.

Ground truth comes from independent forward hooks and ``torch.autograd.grad``, never from
fvis. Models are tiny and built once per module; nothing is downloaded.
"""

from __future__ import annotations

import urllib.error
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import Tensor, nn

from fvis.api import CheckOptions, DumpOptions, ModelRef, check
from fvis.capture import CaptureResult, capture
from fvis.errors import ModelInputError
from fvis.gallery import Gallery
from fvis.gates import parse_gates
from fvis.grads import diagnose
from fvis.inputs import InputOptions
from fvis.loading import LoadedModel, LoadOptions, ModelSource, build_arch

IMAGE = (1, 3, 64, 64)


@contextmanager
def stashed(model: nn.Module, names: list[str]) -> Iterator[dict[str, Any]]:
    """Outputs of the named modules, kept by plain forward hooks (the independent witness)."""
    outputs: dict[str, Any] = {}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda _m, _a, out, name=name: outputs.setdefault(name, out)
        )
        for name in names
    ]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def by_label(result: CaptureResult) -> dict[str, Any]:
    return {c.label: c for c in result.captures}


# --------------------------------------------------------------------------- channels last


@pytest.fixture(scope="module")
def swin() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.swin_t(weights=None).eval()
    norm = model.features[0][2]  # LayerNorm(96) on (N, H, W, C)
    with torch.no_grad():
        norm.weight[::3] = 0.0  # 32 of 96 channels exactly zero
        norm.bias[::3] = 0.0
    return model


SWIN_AXES = {
    "features.0.0": 1,  # Conv2d patch embedding
    "features.0.1": 3,  # Permute to channels last
    "features.0.2": 3,  # LayerNorm(96)
    "features.1.0": 3,  # SwinTransformerBlock
    "features.2": 3,  # PatchMerging
    "norm": 3,
    "permute": 1,  # back to channels first
    "avgpool": 1,
}


def test_swin_channels_are_on_the_last_dim_where_they_are(swin: nn.Module) -> None:
    x = torch.randn(IMAGE)
    result = capture(swin, [x], list(SWIN_AXES), mode="no-grad")
    got = by_label(result)
    assert {name: got[name].stats.channel_axis for name in SWIN_AXES} == SWIN_AXES
    for name, axis in SWIN_AXES.items():
        assert got[name].stats.channels == got[name].shape[axis], name


def test_swin_dead_channels_are_counted_over_channels_not_rows(swin: nn.Module) -> None:
    x = torch.randn(IMAGE)
    with stashed(swin, ["features.0.2"]) as seen, torch.no_grad():
        swin(x)
    out = seen["features.0.2"]  # (1, 16, 16, 96)
    truth = int((out == 0).flatten(0, 2).all(dim=0).sum())
    assert truth == 32 and out.shape[1] != out.shape[3]
    (norm,) = capture(swin, [x], ["features.0.2"], mode="no-grad").captures
    assert (norm.stats.dead_channels, norm.stats.channels) == (32, 96)


def test_swin_pictures_show_one_tile_per_channel(swin: nn.Module) -> None:
    result = capture(swin, [torch.randn(IMAGE)], ["features.0.2"], mode="no-grad")
    gallery = Gallery.from_options(DumpOptions(), ())
    gallery.add(result.captures[0])
    (ref,) = gallery.name_files(result.captures)["features.0.2"]
    # 96 channels of 16x16, the top 64 by energy: the zeroed channels have none
    assert ref.layout == "grid" and ref.total_channels == 96 and ref.shown_channels == 64
    assert "channels: last dim (96)" in ref.note
    assert not {index for index, *_ in ref.channels} & set(range(0, 96, 3))


def test_convnext_block_internals_are_channels_last() -> None:
    torch.manual_seed(0)
    model = torchvision.models.convnext_tiny(weights=None).eval()
    block = "features.1.0.block"
    want = {f"{block}.{i}": 3 for i in range(1, 6)}
    want |= {f"{block}.0": 1, f"{block}.6": 1, "features.1.0": 1, "features.2.0": 1}
    result = capture(model, [torch.randn(IMAGE)], list(want), mode="no-grad")
    assert {c.label: c.stats.channel_axis for c in result.captures} == want


# --------------------------------------------------------------------------- tokens


@pytest.fixture(scope="module")
def bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=128,
        vocab_size=100,
        max_position_embeddings=32,
    )
    model = BertModel(config).eval()
    with torch.no_grad():
        model.encoder.layer[0].intermediate.dense.bias[::2] = -1e4  # 64 of 128 units dead
    return model


ACT = "encoder.layer.0.intermediate.intermediate_act_fn"


def test_bert_dead_units_are_counted_on_the_last_dim(bert: nn.Module) -> None:
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with stashed(bert, [ACT]) as seen, torch.no_grad():
        bert(ids)
    out = seen[ACT]  # (2, 12, 128)
    assert int((out == 0).flatten(0, 1).all(dim=0).sum()) == 64
    assert int((out == 0).transpose(0, 1).flatten(1).all(dim=1).sum()) == 0  # dim 1: tokens
    (act,) = capture(bert, [ids], [ACT]).captures
    assert (act.stats.channel_axis, act.stats.channels, act.stats.dead_channels) == (2, 128, 64)


def test_bert_dead_gate_fails(
    bert: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fvis import api

    monkeypatch.setattr(
        api, "open_model", lambda ref: LoadedModel(bert, ModelSource(None, "test", "", ()))
    )
    ids = tmp_path / "ids.pt"
    torch.save(torch.randint(0, 100, (1, 12)), ids)
    result = check(
        ModelRef(tmp_path / "bert.pt", LoadOptions()),
        InputOptions(sources=(str(ids),)),
        DumpOptions(layers=(ACT,)),
        CheckOptions(gates=parse_gates("dead:0.3")),
    )
    assert not result.passed
    assert [f.gate for f in result.failures] == ["dead:0.3"]


def test_gpt2_and_llama_features_are_last() -> None:
    from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaModel

    torch.manual_seed(0)
    ids = torch.randint(0, 100, (1, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gpt2 = GPT2Model(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=32))
    llama = LlamaModel(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=100,
            max_position_embeddings=32,
        )
    )
    got = capture(gpt2.eval(), [ids], ["h.0.mlp.c_fc", "h.0.mlp.act", "h.0.ln_1"]).captures
    assert [(c.stats.channel_axis, c.stats.channels) for c in got] == [(2, 32), (2, 128), (2, 128)]
    got = capture(llama.eval(), [ids], ["layers.0.input_layernorm", "layers.0.mlp.act_fn"]).captures
    assert [(c.stats.channel_axis, c.stats.channels) for c in got] == [(2, 32), (2, 64)]


def test_timm_vit_tokens_are_features_last() -> None:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64).eval()
    layers = ["patch_embed.proj", "patch_embed", "blocks.0.mlp.act", "blocks.0", "norm"]
    got = capture(model, [torch.randn(IMAGE)], layers, mode="no-grad").captures
    axes = {c.label: (c.stats.channel_axis, c.stats.channels) for c in got}
    assert {c.label: c.token_grid for c in got}["blocks.0"] == (1, 4, 4)  # cls + 4x4 patches
    assert axes == {
        "patch_embed.proj": (1, 192),  # (1, 192, 4, 4)
        "patch_embed": (2, 192),  # flattened to (1, 16, 192) by PatchEmbed.forward
        "blocks.0.mlp.act": (2, 768),
        "blocks.0": (2, 192),
        "norm": (2, 192),
    }


def test_torchvision_vit_tokens_sit_on_their_patch_grid() -> None:
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None, image_size=64).eval()
    layer = "encoder.layers.encoder_layer_0"
    x = torch.randn(IMAGE)
    with stashed(model, [layer, "conv_proj"]) as seen, torch.no_grad():
        model(x)
    (block,) = capture(model, [x], [layer], mode="no-grad").captures
    assert seen["conv_proj"].shape == (1, 768, 4, 4) and seen[layer].shape == (1, 17, 768)
    assert block.token_grid == (1, 4, 4)
    assert (block.stats.channel_axis, block.stats.channels) == (2, 768)


# --------------------------------------------------------------------------- output objects


@pytest.fixture(scope="module")
def faster_rcnn() -> nn.Module:
    torch.manual_seed(0)
    builder = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn
    return builder(weights=None, weights_backbone=None).eval()


def test_faster_rcnn_transform_image_list_is_followed(faster_rcnn: nn.Module) -> None:
    images = [torch.rand(3, 64, 64)]
    with stashed(faster_rcnn, ["transform"]) as seen, torch.no_grad():
        faster_rcnn(images)
    image_list, _targets = seen["transform"]
    result = capture(faster_rcnn, [images], ["transform"], mode="no-grad")
    (tensors,) = result.captures
    assert tensors.label == "transform[0].tensors"
    assert tensors.shape == tuple(image_list.tensors.shape)
    assert torch.equal(torch.from_numpy(tensors.values), image_list.tensors[0])
    assert result.output_notes == {}  # image_sizes are ints; targets None: nothing missing


class _NormalHead(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.mean = nn.Linear(features, 4)
        self.log_std = nn.Linear(features, 4)

    def forward(self, x: Tensor) -> torch.distributions.Normal:
        return torch.distributions.Normal(self.mean(x), self.log_std(x).exp())


def test_a_normal_head_keeps_upstream_layers_connected() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    model.fc = _NormalHead(512)
    model.eval()
    layers = ["layer3", "layer4", "avgpool", "fc.mean", "fc"]
    x = torch.randn(IMAGE)
    with stashed(model, layers[:-1]) as seen:
        dist = model(x)
    loss = dist.loc.sum() + dist.scale.sum()
    grads = torch.autograd.grad(loss, [seen[n] for n in layers[:-1]], allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)  # truth: all connected
    result = capture(model, [x], layers)
    verdicts = diagnose(result)
    assert sorted(verdicts) == sorted([*layers[:-1], "fc.loc", "fc.scale"])
    assert {label: v.connected for label, v in verdicts.items()} == dict.fromkeys(verdicts, True)


# --------------------------------------------------------------------------- downloads


def test_a_detection_builder_without_weights_backbone_is_told_to_pass_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached weights
    spec = "torchvision.models.detection:fasterrcnn_mobilenet_v3_large_320_fpn"
    with pytest.raises(ModelInputError, match="tried to download pretrained weights") as caught:
        build_arch(spec, {"weights": None})
    assert '"weights_backbone": null' in (caught.value.hint or "")
