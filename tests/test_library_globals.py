"""Harmless callables that real libraries pickle (partial norm layers, torch functional ops),
private classes, and one hint naming every --allow-module prefix needed."""

from __future__ import annotations

import functools
import os
import shlex
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fvis.trust import allow_prefixes
from tests.conftest import RunCli

LIBRARY = """
import functools
import torch
from torch import nn


class _Block(nn.Module):  # a private class, as torchvision's _DenseBlock
    def __init__(self):
        super().__init__()
        self.norm = functools.partial(nn.LayerNorm, eps=1e-6)(4)
        self.act = torch._C._nn.gelu  # as transformers' BERT stores its activation
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.act(self.fc(self.norm(x)))


class Net(nn.Module):
    def __init__(self, payload=None):
        super().__init__()
        self.block = _Block()
        self.make_norm = functools.partial(nn.LayerNorm, eps=1e-6)
        self.payload = payload

    def forward(self, x):
        return self.block(x)
"""


@pytest.fixture
def library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    package = tmp_path / "fakelib"
    (package / "nets").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "nets" / "__init__.py").write_text("")
    (package / "nets" / "blocks.py").write_text(textwrap.dedent(LIBRARY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("fakelib")]:
        del sys.modules[name]


def test_partial_functional_and_private_classes_load_with_the_library_allowed(
    library: Path, cli: RunCli
) -> None:
    from fakelib.nets.blocks import Net

    torch.manual_seed(0)
    model = Net().eval()
    torch.save(model, library / "model.pt")
    code, _, err = cli("dump", "model.pt", "--shape", "2,4", "--out", "out", "--quiet")
    assert code == 4
    assert "hint: save a state dict and pass --arch; --allow-module fakelib.nets.blocks" in err
    assert "dangerous" not in err
    code, _, err = cli(
        "dump",
        "model.pt",
        "--allow-module",
        "fakelib",
        "--shape",
        "2,4",
        "--save-tensors",
        "--layer",
        "block",
        "--out",
        "out2",
        "--quiet",
    )
    assert code == 0, err


def test_a_partial_wrapping_a_dangerous_function_is_refused(library: Path, cli: RunCli) -> None:
    from fakelib.nets.blocks import Net

    marker = library / "MARKER"
    torch.save(Net(functools.partial(os.system, f"touch {shlex.quote(str(marker))}")), "m.pt")
    for args in (("layers", "m.pt"), ("dump", "m.pt", "--allow-module", "fakelib")):
        code, _, err = cli(*args)
        assert code == 4, err
        assert "system" in err and not marker.exists()


def test_torch_globals_that_are_not_tensor_functions_stay_refused() -> None:
    from fvis.trust import untrusted_globals

    seen = ("torch._C._nn.gelu", "torch.nn.functional.relu", "torch.tanh", "functools.partial")
    assert untrusted_globals(seen) == []
    for bad in ("torch.load", "torch._C._jit_pass_inline", "torch.hub.load", "torch.ops.aten"):
        assert untrusted_globals((bad,)) == [bad]


def test_allow_prefixes_are_the_fewest_tightest_prefixes() -> None:
    modules = [
        "transformers.activations",
        "transformers.generation.configuration_utils",
        "transformers.models.gpt2.modeling_gpt2",
        "mypkg.models",
        "_io",
        "collections",
    ]
    assert allow_prefixes(modules) == ["mypkg.models", "transformers"]
