"""Pickled modules written by real libraries load with ``--allow-module <library>``.

``torch.save(model)`` of torchvision and transformers models names harmless callables
(``functools.partial`` norm layers, ``torch._C._nn.gelu``) and private classes in submodules
(``torchvision.models.densenet._DenseBlock``). They must load safely with the library allowed,
while a ``partial`` wrapping something dangerous is still refused.
"""

from __future__ import annotations

import functools
import os
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from tests.conftest import RunCli
from tests.real_models.tiny import bert, dumped, gpt2, hooked_output


def _vit() -> nn.Module:
    return VisionTransformer(
        image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64
    )


def _densenet() -> nn.Module:
    return torchvision.models.DenseNet(
        growth_rate=4, block_config=(1, 1), num_init_features=8, bn_size=2, num_classes=3
    )


def _convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=3)


IDS = torch.tensor([[1, 5, 9, 3]])
IMAGE = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
# name -> (builder, library to allow, a layer, input)
PICKLES: dict[str, tuple[Callable[[], nn.Module], str, str, torch.Tensor]] = {
    "vit": (_vit, "torchvision", "encoder.layers.encoder_layer_0.ln_1", IMAGE),
    "densenet": (_densenet, "torchvision", "features.denseblock1.denselayer1.conv1", IMAGE),
    "convnext": (_convnext, "torchvision", "features.1.0.block.0", IMAGE),
    "gpt2": (lambda: gpt2(1), "transformers", "transformer.h.0.mlp.c_fc", IDS),
    "bert": (lambda: bert(1), "transformers", "encoder.layer.0.intermediate", IDS),
}


@pytest.mark.parametrize("name", list(PICKLES))
def test_library_pickle_loads_with_the_library_allowed(
    tmp_path: Path, cli: RunCli, name: str
) -> None:
    build, library, layer, inputs = PICKLES[name]
    torch.manual_seed(0)
    model = build().eval()
    torch.save(model, tmp_path / "model.pt")
    captured = dumped(
        cli, tmp_path / "model.pt", layer, inputs, tmp_path, "--allow-module", library
    )
    assert torch.equal(captured, hooked_output(model, layer, inputs))


@pytest.mark.parametrize("name", list(PICKLES))
def test_refusal_names_every_needed_prefix_in_one_hint(
    tmp_path: Path, cli: RunCli, name: str
) -> None:
    build, library, _, _ = PICKLES[name]
    torch.save(build(), tmp_path / "model.pt")
    code, _, err = cli("dump", tmp_path / "model.pt", "--out", tmp_path / "out")
    assert code == 4
    assert f"--allow-module {library}" in err
    assert "dangerous" not in err and "--allow-module functools" not in err


class _Holder(nn.Module):
    def __init__(self, payload: Any) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.payload = payload


def test_a_partial_of_a_dangerous_function_is_still_refused(tmp_path: Path, cli: RunCli) -> None:
    marker = tmp_path / "MARKER"
    payload = functools.partial(os.system, f"touch {shlex.quote(str(marker))}")
    torch.save(_Holder(payload), tmp_path / "model.pt")
    code, _, err = cli(
        "dump", tmp_path / "model.pt", "--allow-module", "tests", "--out", tmp_path / "out"
    )
    assert code == 4
    assert not marker.exists()
    assert "system" in err
