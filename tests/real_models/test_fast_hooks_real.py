"""The C hooks (fvis/_trace.c) on real models: every module of torchvision's ResNet-18,
EfficientNet-B0 and a tiny ViT, timm's ConvNeXt, and Hugging Face GPT-2 and BERT captured on
each hook path, compared field by field with the Python session (``tests/hook_paths.py``).
The C path must take most calls (these models are what it is for), and the model's output
must be bit-identical to a plain forward."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import timm
import torch
import torchvision
from torch import nn

from fvis.capture import Mode
from tests.hook_paths import assert_same, run_capture
from tests.real_models.tiny import IDS, bert, gpt2


def _vit() -> nn.Module:
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    )


def _image(size: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor]]] = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), _image(64)),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=10), _image(64)),
    "vit": (_vit, _image(32)),
    "convnext": (
        lambda: timm.create_model("convnext_atto", pretrained=False, num_classes=10),
        _image(64),
    ),
    "gpt2": (gpt2, lambda: IDS),
    "bert": (bert, lambda: IDS),
}


def _plain_output(model: nn.Module, x: torch.Tensor) -> Any:
    with torch.enable_grad():
        return model(x)


def _tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    values = output.values() if isinstance(output, dict) else output
    return [v for v in values if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("mode", [Mode.GRAD, Mode.INFERENCE])
def test_c_hooks_on_real_models(name: str, mode: Mode, monkeypatch: pytest.MonkeyPatch) -> None:
    make_model, make_input = MODELS[name]
    torch.manual_seed(0)
    model, x = make_model().eval(), make_input()
    fast, fast_calls, _ = run_capture(model, x, True, monkeypatch, mode=mode)
    global_hooks, _, _ = run_capture(model, x, True, monkeypatch, False, mode=mode)
    slow, slow_calls, _ = run_capture(model, x, False, monkeypatch, mode=mode)
    assert_same(fast, slow)
    assert_same(global_hooks, slow)
    assert slow_calls == 0
    assert fast_calls >= len(fast.trace) // 2, (fast_calls, len(fast.trace))
    expected = _tensors(_plain_output(model, x))
    for got, want in zip(_tensors(fast.output), expected, strict=True):
        assert torch.equal(got, want)
    assert all("forward" not in m.__dict__ for m in model.modules())
