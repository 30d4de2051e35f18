"""Unwrapping a state dict only as far as it makes the keys fit the architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fvis.loading import LoadOptions, inspect_model, load_model, unwrap_state_dict
from tests.conftest import RunCli

ARCH_SOURCE = """
import torch
from torch import nn

class Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(x)

class HasModelChild(nn.Module):
    '''Like a Llama/Qwen2 causal LM: a child named `model`, and a head tied to it.'''
    def __init__(self):
        super().__init__()
        self.model = Body()
        self.head = nn.Linear(3, 3, bias=False)
        self.head.weight = self.model.fc.weight

    def forward(self, x):
        return self.head(self.model(x))

class Empty(nn.Module):
    def forward(self, x):
        return torch.relu(x)
"""


@pytest.fixture
def arch(tmp_path: Path) -> Path:
    path = tmp_path / "fit_arch.py"
    path.write_text(ARCH_SOURCE)
    return path


def saved(tmp_path: Path, state: dict[str, torch.Tensor], name: str = "w.pt") -> Path:
    torch.save(state, tmp_path / name)
    return tmp_path / name


def test_a_child_named_model_keeps_its_prefix(tmp_path: Path, arch: Path) -> None:
    """Every key starts with 'model.' (the head is tied, so not stored): the old unwrap took
    'model' for a nesting key, stripped it, and nothing fitted."""
    torch.manual_seed(0)
    body = nn.Linear(3, 3)
    path = saved(tmp_path, {"model.fc.weight": body.weight.data, "model.fc.bias": body.bias.data})
    loaded = load_model(path, LoadOptions(arch=f"{arch}:HasModelChild"))
    assert torch.equal(loaded.module.model.fc.weight, body.weight.data)
    assert not any("stripped" in note for note in loaded.source.notes)
    assert "head.weight is tied to model.fc.weight (stored once)" in loaded.source.notes
    listed = inspect_model(path, LoadOptions(arch=f"{arch}:HasModelChild"))
    assert "model.fc" in listed.names()


def test_a_flat_wrapper_prefix_is_stripped_when_that_fits(tmp_path: Path, arch: Path) -> None:
    body = nn.Linear(3, 3)
    path = saved(tmp_path, {"model.fc.weight": body.weight.data, "model.fc.bias": body.bias.data})
    loaded = load_model(path, LoadOptions(arch=f"{arch}:Body"))
    assert torch.equal(loaded.module.fc.bias, body.bias.data)
    assert "stripped prefix 'model.' from 2 keys" in loaded.source.notes


def test_listing_without_arch_keeps_the_names_in_the_file(tmp_path: Path) -> None:
    body = nn.Linear(3, 3)
    path = saved(tmp_path, {"model.fc.weight": body.weight.data, "model.fc.bias": body.bias.data})
    assert inspect_model(path).names() == ["model", "model.fc"]


def test_wrapper_prefixes_before_a_nesting_prefix_are_all_stripped() -> None:
    state = {"module._orig_mod.model.fc.weight": 1}
    out, notes = unwrap_state_dict(state, {"fc.weight"})
    assert out == {"fc.weight": 1}
    assert len(notes) == 3


def test_nothing_fits_strips_as_before_for_the_error_message() -> None:
    out, _ = unwrap_state_dict({"module.a.weight": 1}, {"b.weight"})
    assert out == {"a.weight": 1}


def test_an_empty_state_dict_is_valid_for_a_parameter_free_model(
    tmp_path: Path, arch: Path
) -> None:
    path = saved(tmp_path, {})
    loaded = load_model(path, LoadOptions(arch=f"{arch}:Empty"))
    assert torch.equal(loaded.module(torch.tensor([-1.0, 2.0])), torch.tensor([0.0, 2.0]))
    assert inspect_model(path, LoadOptions(arch=f"{arch}:Empty")).names() == []


BUILDERS = """
import torch
from torch import nn

def copies_weights_in():
    '''Like a builder calling from_pretrained: it copies real values into the parameters.'''
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2, device="cpu"))
    model.bias.data.fill_(float(model.weight.sum().item()))
    return model

def raises_two_lines():
    raise ValueError("first line\\nsecond line")
"""


def test_a_builder_that_fails_on_meta_is_built_for_real_to_list(
    tmp_path: Path, cli: RunCli
) -> None:
    (tmp_path / "builders.py").write_text(BUILDERS)
    path = saved(tmp_path, dict(nn.Linear(2, 2).state_dict()))
    tree = inspect_model(path, LoadOptions(arch=f"{tmp_path / 'builders.py'}:copies_weights_in"))
    assert tree.layers[0].params == 6
    assert "built on the CPU: the builder fails on the meta device" in tree.source_note
    code, out, _ = cli("layers", path, "--arch", f"{tmp_path / 'builders.py'}:copies_weights_in")
    assert code == 0 and "built on the CPU" in out


def test_a_multi_line_builder_error_is_one_line(tmp_path: Path, cli: RunCli) -> None:
    (tmp_path / "builders.py").write_text(BUILDERS)
    path = saved(tmp_path, dict(nn.Linear(2, 2).state_dict()))
    code, _, err = cli("layers", path, "--arch", f"{tmp_path / 'builders.py'}:raises_two_lines")
    assert code == 5
    assert err.splitlines()[0].endswith("failed to build the model: first line")
    assert "\\x0a" not in err and "second line" not in err
