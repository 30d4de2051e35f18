"""Models the benchmark builds itself (no downloads): ``--arch benchmarks/models.py:NAME``.

- ``resnet18ish``: torchvision's ResNet-18 layout written by hand (BasicBlocks, stages
  64-128-256-512, names ``layer1.0.conv1``, one in-place ``relu`` per block called twice).
- ``deep_narrow``: 200 x (Linear(64, 64), ReLU) = 400 small leaf modules.
- ``wide_conv``: a 3x3 conv to 2048 channels at 14x14, BN, ReLU, a 1x1 conv 2048 -> 2048.
- ``wide_mlp``: a few 8448-wide Linear layers, about 1.14 GB of float32 weights.

Only torch is imported, so the bare-process baseline pays for nothing fvis does not.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

RESNET_INPUT = (1, 3, 224, 224)
DEEP_INPUT = (16, 64)
WIDE_INPUT = (1, 256, 14, 14)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: one ``relu`` (in place) called twice, ``out += identity``."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet18ish(nn.Module):
    """ResNet-18 as torchvision lays it out (11.7 M parameters at 1000 classes)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._stage(64, 64, 1)
        self.layer2 = self._stage(64, 128, 2)
        self.layer3 = self._stage(128, 256, 2)
        self.layer4 = self._stage(256, 512, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    @staticmethod
    def _stage(inplanes: int, planes: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes))

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18ish(num_classes: int = 1000) -> nn.Module:
    """The ResNet-18-shaped CNN, in eval mode (input 1x3x224x224)."""
    return ResNet18ish(num_classes).eval()


def deep_narrow(depth: int = 200, width: int = 64) -> nn.Module:
    """``depth`` x (Linear, ReLU): 2 * depth small leaf modules (input 16x64)."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers).eval()


def wide_conv() -> nn.Module:
    """2048 channels at 14x14 (input 1x256x14x14)."""
    return nn.Sequential(
        nn.Conv2d(256, 2048, 3, padding=1, bias=False),
        nn.BatchNorm2d(2048),
        nn.ReLU(inplace=True),
        nn.Conv2d(2048, 2048, 1),
    ).eval()


def wide_mlp(width: int = 8448, depth: int = 4) -> nn.Module:
    """About ``depth * width**2 * 4`` bytes of weights: 1.14 GB at the defaults."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(width, width))
        if i < depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def write_big_checkpoint(path: Path) -> int:
    """A ~1.14 GB wide-MLP state dict (zeros: content does not matter, size does)."""
    with torch.device("meta"):
        model = wide_mlp()
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    torch.save(model.state_dict(), path)
    return path.stat().st_size
