"""A cut inside installed library code passes the default gate; --strict-library fails it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import RunCli

LIBRARY = '''
import torch
from torch import nn


class Proposals(nn.Module):
    """Like torchvision's RPN: detaches what it proposes, by design."""

    def __init__(self):
        super().__init__()
        self.score = nn.Linear(4, 4)

    def forward(self, x):
        return self.score(x).detach()


class Detector(nn.Module):
    def __init__(self):
        super().__init__()
        self.rpn = Proposals()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.rpn(x))
'''


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = tmp_path / "site-packages"  # where an installed library's code lives
    site.mkdir()
    (site / "fakedet.py").write_text(LIBRARY)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    sys.modules.pop("fakedet", None)


def test_library_cut_passes_by_default_and_fails_with_strict_library(
    installed: Path, cli: RunCli
) -> None:
    import fakedet

    torch.save(fakedet.Detector().state_dict(), "w.pt")
    args = ("check", "w.pt", "--arch", "fakedet:Detector", "--shape", "2,4", "--layer", "rpn.score")
    code, out, err = cli(*args)
    assert code == 0, out + err
    code, out, _ = cli(*args, "--strict-library")
    assert code == 1
    assert "FAIL rpn.score: disconnected: " in out and "(library code)" in out
    assert "site-packages/fakedet.py:" in out
