"""fvis.layers: the walk (shared modules, nested models, counts) and name resolution."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from fvis.errors import ExitStatus, UsageError
from fvis.layers import LayerInfo, ModelTree, node_from_module, resolve, suggest, walk
from fvis.sample import build_sample

# --------------------------------------------------------------------------- edge-case models


class SharedModuleInNestedList(nn.Module):
    """One ``nn.Linear`` object in two ModuleLists (torchinfo's case of the same name)."""

    def __init__(self) -> None:
        super().__init__()
        shared = nn.Linear(4, 4)
        self.first = nn.ModuleList([shared, nn.ReLU()])
        self.second = nn.ModuleList([nn.Linear(4, 3), shared])

    def forward(self, x: Tensor) -> Tensor:
        for module in [*self.first, self.second[1], self.second[0]]:
            x = module(x)
        return x


class SharedBlockTwice(nn.Module):
    """A shared block *with children*: they are listed under its first name only."""

    def __init__(self) -> None:
        super().__init__()
        block = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
        self.encoder = block
        self.decoder = block
        self.head = nn.Linear(3, 1)


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.act = nn.ReLU()


class Middle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Inner()
        self.plain = nn.Sequential(nn.Linear(2, 2))


class Outer(nn.Module):
    """User classes nested two deep, next to torch containers."""

    def __init__(self) -> None:
        super().__init__()
        self.middle = Middle()
        self.leaf = nn.Linear(2, 1)


class SequentialInner(nn.Module):
    """``inner`` is a Sequential: the ReLU's dotted name is ``inner.1``, not ``inner.relu``."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(10, 5), nn.ReLU())
        self.linear_out = nn.Linear(5, 2)


def layers_of(model: nn.Module) -> list[LayerInfo]:
    return list(walk(node_from_module(model)))


def by_name(model: nn.Module) -> dict[str, LayerInfo]:
    return {info.name: info for info in layers_of(model)}


def total_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- walk


def test_shared_module_listed_under_both_names() -> None:
    model = SharedModuleInNestedList()
    names = [info.name for info in layers_of(model)]
    assert names == ["", "first", "first.0", "first.1", "second", "second.0", "second.1"]
    assert "second.1" not in dict(model.named_modules())  # what torch alone would drop
    layers = by_name(model)
    assert layers["first.0"].aliases == ("second.1",)
    assert layers["second.1"].aliases == ("first.0",)
    assert layers["second.1"].first_name == layers["first.0"].first_name == "first.0"
    assert layers["first.0"].is_shared and layers["second.1"].is_shared
    assert not layers["second.0"].is_shared and layers["second.0"].aliases == ()


def test_root_total_counts_shared_parameters_once() -> None:
    model = SharedModuleInNestedList()
    layers = by_name(model)
    assert layers[""].params == total_params(model) == 4 * 4 + 4 + 4 * 3 + 3
    assert layers["second"].params == 4 * 3 + 3 + 4 * 4 + 4  # the shared one counts here too
    assert layers["first"].params == 4 * 4 + 4


def test_shared_block_children_listed_under_first_name_only() -> None:
    model = SharedBlockTwice()
    layers = by_name(model)
    assert list(layers) == ["", "encoder", "encoder.0", "encoder.1", "decoder", "head"]
    assert layers["decoder"].aliases == ("encoder",)
    assert layers["decoder"].params == layers["encoder"].params == 3 * 3 + 3
    assert layers[""].params == total_params(model)


def test_shared_modules_from_the_model_tree_helper() -> None:
    tree = ModelTree.of(node_from_module(SharedModuleInNestedList()), "note")
    assert tree.names()[0] == "first" and "" not in tree.names()
    assert tree.source_note == "note"


def test_nested_model_flag_marks_user_classes_with_children() -> None:
    layers = by_name(Outer())
    assert layers["middle"].is_nested_model
    assert layers["middle.inner"].is_nested_model
    assert not layers[""].is_nested_model  # the root is the model itself
    assert not layers["middle.plain"].is_nested_model  # torch container
    assert not layers["middle.inner.linear"].is_nested_model  # torch leaf
    assert [layers[n].depth for n in ("", "middle", "middle.inner", "middle.inner.act")] == [
        0,
        1,
        2,
        3,
    ]
    assert layers["middle.inner.act"].is_leaf and not layers["middle.inner"].is_leaf


def test_frozen_and_trainable_counts() -> None:
    model = Outer()
    model.middle.inner.requires_grad_(False)
    model.leaf.bias.requires_grad_(False)
    layers = by_name(model)
    assert (layers["middle.inner"].trainable, layers["middle.inner"].frozen) == (0, 6)
    assert (layers["middle"].trainable, layers["middle"].frozen) == (6, 6)
    assert (layers["leaf"].trainable, layers["leaf"].frozen) == (2, 1)
    root = layers[""]
    assert root.params == total_params(model) == 15
    assert root.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) == 8
    assert root.frozen == 7


def test_buffers_counted_apart_from_parameters() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    layers = by_name(model)
    assert layers["1"].params == 4 and layers["1"].buffers == 2 + 2 + 1
    assert layers[""].params == total_params(model)


# --------------------------------------------------------------------------- resolve


@pytest.fixture
def sample_layers() -> list[LayerInfo]:
    return layers_of(build_sample())


def test_resolve_exact(sample_layers: list[LayerInfo]) -> None:
    [info] = resolve(sample_layers, ["inner.relu"])
    assert (info.name, info.short_class) == ("inner.relu", "ReLU")


def test_resolve_glob_in_tree_order_without_duplicates(sample_layers: list[LayerInfo]) -> None:
    found = resolve(sample_layers, ["linear_out", "inner.*", "inner.relu", "*.linear"])
    assert [info.name for info in found] == ["inner.linear", "inner.relu", "linear_out"]


def test_resolve_shared_module_by_either_name() -> None:
    layers = layers_of(SharedModuleInNestedList())
    assert [i.name for i in resolve(layers, ["second.1"])] == ["second.1"]
    assert [i.name for i in resolve(layers, ["*.0"])] == ["first.0", "second.0"]


def test_resolve_unknown_suggests_by_name(sample_layers: list[LayerInfo]) -> None:
    with pytest.raises(UsageError) as info:
        resolve(sample_layers, ["inner.lienar"], model_label="model.pt")
    assert info.value.exit_status == ExitStatus.USAGE
    assert "no layer 'inner.lienar'" in info.value.message
    assert "inner.linear (Linear)" in info.value.message
    assert "fvis layers model.pt" in (info.value.hint or "")


def test_resolve_unknown_suggests_by_class() -> None:
    layers = layers_of(SequentialInner())
    with pytest.raises(UsageError) as info:
        resolve(layers, ["inner.relu"], model_label="seq.pt")
    message = info.value.message
    assert "inner.1 (ReLU)" in message
    assert message.index("inner.1 (ReLU)") < message.index("?")  # first suggestion
    assert "fvis layers seq.pt" in (info.value.hint or "")
    assert suggest(layers, "inner.relu")[0] == "inner.1 (ReLU)"


def test_resolve_glob_matching_nothing_is_an_error(sample_layers: list[LayerInfo]) -> None:
    with pytest.raises(UsageError) as info:
        resolve(sample_layers, ["backbone.*"])
    assert "no layer 'backbone.*'" in info.value.message
    assert "fvis layers" in (info.value.hint or "")


def test_resolve_far_off_name_has_no_suggestion(sample_layers: list[LayerInfo]) -> None:
    with pytest.raises(UsageError) as info:
        resolve(sample_layers, ["zzzzzz"])
    assert "did you mean" not in info.value.message


def test_walk_leaves_the_model_untouched() -> None:
    model = SharedModuleInNestedList()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers_of(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
