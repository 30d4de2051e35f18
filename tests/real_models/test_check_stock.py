"""Issue 14: the default ``fvis check`` passes on stock models with random weights, and every
verdict behind the pass is true (checked against the model's own structure and
``torch.autograd.grad``, never against fvis)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from tests.real_models.check_helpers import (
    default_check,
    failures_text,
    image,
    not_run,
    token_ids,
    verdicts,
)

tv = torchvision.models


def _grad_reaches(model: nn.Module, out: torch.Tensor, params: list[nn.Parameter]) -> bool:
    grads = torch.autograd.grad(out, params, allow_unused=True)
    return all(g is not None for g in grads)


def test_efficientnet_b0(monkeypatch: pytest.MonkeyPatch) -> None:
    result = default_check(monkeypatch, tv.efficientnet_b0(weights=None), image())
    assert result.passed, failures_text(result)
    # blocks without a residual never call stochastic_depth: parameter-free, not a failure
    entry = not_run(result)["features.1.0.stochastic_depth"]
    assert entry["cause"] == "not-called" and not entry["requested"]


def test_vit_out_proj_parameters_are_used(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tv.VisionTransformer(
        image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    ).eval()
    out_proj = model.encoder.layers[0].self_attention.out_proj
    assert _grad_reaches(model, model(torch.randn(1, 3, 32, 32)).sum(), [out_proj.weight])
    result = default_check(monkeypatch, model, image(32))
    assert result.passed, failures_text(result)
    entry = not_run(result)["encoder.layers.encoder_layer_0.self_attention.out_proj"]
    assert entry["cause"] == "params-used"


def test_swin_t_qkv_and_proj_are_used(monkeypatch: pytest.MonkeyPatch) -> None:
    result = default_check(monkeypatch, tv.swin_t(weights=None), image())
    assert result.passed, failures_text(result)
    entries = not_run(result)
    assert entries["features.1.0.attn.qkv"]["cause"] == "params-used"
    assert entries["features.1.0.attn.proj"]["cause"] == "params-used"


def test_faster_rcnn(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tv.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, min_size=64, max_size=64
    )
    result = default_check(monkeypatch, model, image())
    assert result.passed, failures_text(result)
    found = verdicts(result)
    assert found["rpn.anchor_generator[0]"]["cause"] == "constant"
    rpn = [v for k, v in found.items() if k.startswith("rpn.head.cls_logits")]
    assert rpn and all(v["library"] and v["where"] == "rpn" for v in rpn)
    assert all("torchvision/models/detection/rpn.py:" in v["origin"] for v in rpn)


def test_ssdlite(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tv.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
    result = default_check(monkeypatch, model, image())
    assert result.passed, failures_text(result)
    assert verdicts(result)["anchor_generator[0]"]["cause"] == "constant"


@pytest.fixture(scope="module")
def ids_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ids")


def test_gpt2(monkeypatch: pytest.MonkeyPatch, ids_folder: Path) -> None:
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32)
    result = default_check(monkeypatch, GPT2Model(config), token_ids(ids_folder))
    assert result.passed, failures_text(result)
    assert not_run(result)["h.0.attn.attn_dropout"]["cause"] == "not-called"


def test_bert(monkeypatch: pytest.MonkeyPatch, ids_folder: Path) -> None:
    from tests.real_models.tiny import bert

    result = default_check(monkeypatch, bert(), token_ids(ids_folder))
    assert result.passed, failures_text(result)


def test_llama_rotary_is_constant(monkeypatch: pytest.MonkeyPatch, ids_folder: Path) -> None:
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=32,
    )
    result = default_check(monkeypatch, LlamaModel(config), token_ids(ids_folder))
    assert result.passed, failures_text(result)
    rotary = [v for k, v in verdicts(result).items() if k.startswith("rotary_emb")]
    assert rotary and all(v["cause"] == "constant" for v in rotary)
