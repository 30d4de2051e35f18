"""The bundled default model: a tiny nested model that fvis runs when no model is given.

``inner.relu`` is the layer the README examples ask for::

    >>> model = build_sample()
    >>> model(torch.zeros(SAMPLE_INPUT_SHAPE)).shape
    torch.Size([1, 2])
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["SAMPLE_INPUT_SHAPE", "InnerModel", "OuterModel", "build_sample"]

SAMPLE_INPUT_SHAPE = (1, 10)


class InnerModel(nn.Module):
    """The nested model: ``linear`` (10 -> 5) then ``relu``."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(10, 5)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.linear(x))


class OuterModel(nn.Module):
    """The outer model: ``inner`` (an ``InnerModel``) then ``linear_out`` (5 -> 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = InnerModel()
        self.linear_out = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_out(self.inner(x))


def build_sample(seed: int = 0) -> OuterModel:
    """Build an ``OuterModel`` whose weights depend only on ``seed``, in eval mode.

    The global RNG state is left untouched.

    >>> a, b = build_sample(), build_sample()
    >>> torch.equal(a.linear_out.weight, b.linear_out.weight)
    True
    """
    # devices=[]: fork the CPU generator only, never initialise CUDA just to build a sample.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = OuterModel()
    return model.eval()
