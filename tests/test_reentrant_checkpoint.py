"""Captures inside a reentrant activation checkpoint are no_grad by design, not a cut."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fvis.api import DumpOptions, check_module


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.block, self.head, self.reentrant = Block(), nn.Linear(4, 2), reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            x = checkpoint(self.block, x, use_reentrant=self.reentrant)
        else:
            x = self.block(x)
        return self.head(x)


class RealNoGrad(Checkpointed):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = self.block(x)
        return self.head(x)


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointed_blocks_pass_and_get_gradients(reentrant: bool) -> None:
    model = Checkpointed(reentrant).train()
    x = torch.randn(2, 4, requires_grad=True)
    model(x).sum().backward()  # ground truth: backward reaches the checkpointed parameters
    assert model.block.fc.weight.grad is not None and model.block.fc.weight.grad.abs().sum() > 0
    options = DumpOptions(layers=("block.fc", "head"), train=True, images=False)
    result = check_module(Checkpointed(reentrant), [torch.randn(2, 4)], options)
    assert result.passed, [f.line() for f in result.failures]
    verdict = {c["label"]: c["verdict"] for c in result.dump.report["captures"]}["block.fc"]
    assert verdict["cause"] == ("checkpointed" if reentrant else "connected")


def test_a_real_no_grad_block_still_fails() -> None:
    options = DumpOptions(layers=("block.fc",), train=True, images=False)
    result = check_module(RealNoGrad(True), [torch.randn(2, 4)], options)
    assert not result.passed
    assert "ran under no_grad inside RealNoGrad.forward" in result.failures[0].line()
