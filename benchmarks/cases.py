"""The capture cases, shared by the benchmark scripts (run with ``benchmarks/`` on the path)."""

from __future__ import annotations

from collections.abc import Callable

import models
import torch


def leaves(model: torch.nn.Module) -> list[str]:
    """The layers ``fvis dump --all`` hooks (fvis's own choice of leaves)."""
    from fvis.api import DumpOptions, choose_layers
    from fvis.layers import ModelTree, node_from_module

    tree = ModelTree.of(node_from_module(model))
    return list(choose_layers(tree, DumpOptions(all_leaves=True))[0])


def _zoo(name: str) -> Callable[[], tuple[torch.nn.Module, torch.Tensor]]:
    def build() -> tuple[torch.nn.Module, torch.Tensor]:
        from sample_models.zoo import build, example_input

        return build(name), example_input(name)

    return build


def _own(
    factory: Callable[[], torch.nn.Module], shape: tuple[int, ...]
) -> Callable[[], tuple[torch.nn.Module, torch.Tensor]]:
    def build() -> tuple[torch.nn.Module, torch.Tensor]:
        torch.manual_seed(0)
        return factory(), torch.randn(shape)

    return build


def capture_cases() -> dict[str, Callable[[], tuple[torch.nn.Module, torch.Tensor]]]:
    """Label -> builder of (model in eval mode, input)."""
    from sample_models.zoo import SAMPLES

    cases = {
        "resnet18ish 1x3x224x224": _own(models.resnet18ish, models.RESNET_INPUT),
        "deep_narrow 400 leaves, 16x64": _own(models.deep_narrow, models.DEEP_INPUT),
        "wide_conv 2048ch 14x14": _own(models.wide_conv, models.WIDE_INPUT),
    }
    cases.update({f"zoo {name}": _zoo(name) for name in SAMPLES})
    return cases
