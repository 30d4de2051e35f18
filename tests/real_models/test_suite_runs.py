"""The real-model suite's own sanity: the libraries are the ones it was written for."""

from __future__ import annotations

import torch
import torchvision


def test_torchvision_model_builds_with_random_weights() -> None:
    model = torchvision.models.resnet18(weights=None).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 1000)
