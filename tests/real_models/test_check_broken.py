"""Issue 14: the default ``fvis check`` still fails, with the right cause, on real backbones
wrapped the way users break them. The wrappers live in this file: user code, not library."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import Tensor, nn

from tests.real_models.check_helpers import default_check, image, token_ids, verdicts


class NoGradBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = torchvision.models.resnet18(weights=None)
        self.backbone.fc = nn.Identity()
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(512, 3)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            features = self.backbone(x)
        return self.head(self.drop(features * 1.0))


class InferenceBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = torchvision.models.resnet18(weights=None)

    def forward(self, x: Tensor) -> Tensor:
        with torch.inference_mode():
            features = self.backbone(x)
        return features.clone()


class DetachGPT2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2Model

        config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32)
        self.gpt = GPT2Model(config)
        self.head = nn.Linear(32, 2)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.gpt(ids).last_hidden_state.detach())


def _by_gate(result: object) -> dict[str, str]:
    return {f.layer: f.cause for f in result.failures}  # type: ignore[attr-defined]


def test_no_grad_backbone_names_the_wrapper(monkeypatch: pytest.MonkeyPatch) -> None:
    result = default_check(monkeypatch, NoGradBackbone(), image())
    fails = _by_gate(result)
    assert "ran under no_grad inside NoGradBackbone.forward" in fails["backbone.conv1"]
    assert fails["backbone.conv1"].endswith(" (your code)")
    assert f"{Path(__file__).name}:" in fails["backbone.conv1"]  # the line of the no_grad
    # the parameter-free layer after the block blames the block, not frozen parameters
    assert "backbone ran under no_grad inside NoGradBackbone.forward" in fails["drop"]
    assert "head" not in fails


def test_detached_gpt2_hidden_states_are_a_cut_in_user_code(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    result = default_check(monkeypatch, DetachGPT2(), token_ids(tmp_path))
    fails = _by_gate(result)
    assert fails and "head" not in fails
    cause = fails["gpt.h.1.mlp.c_proj"]
    assert cause.startswith("used, then detached: DetachGPT2.forward")
    assert cause.endswith(" (your code)") and f"{Path(__file__).name}:" in cause
    assert verdicts(result)["gpt.h.1.mlp.c_proj"]["library"] is False


def test_inference_mode_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    fails = _by_gate(default_check(monkeypatch, InferenceBackbone(), image()))
    assert "torch.inference_mode() inside InferenceBackbone.forward" in fails["backbone.conv1"]


def test_frozen_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    model = torchvision.models.resnet18(weights=None)
    model.requires_grad_(False)
    model.fc = nn.Linear(512, 3)
    fails = _by_gate(default_check(monkeypatch, model, image()))
    assert fails["layer4.1.conv2"].startswith("nothing upstream requires grad: the parameters")
    assert "fc" not in fails
