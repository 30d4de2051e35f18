"""Modules a torch.export program erased (Identity; Dropout in eval) are "removed by export"."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from fvis.loading import load_model
from tests.conftest import RunCli


class WithNoOps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.1)
        self.id = nn.Identity()
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.id(self.drop(torch.relu(self.fc(x)))))


def exported(tmp_path: Path) -> Path:
    program = torch.export.export(WithNoOps().eval(), (torch.randn(2, 4),))
    torch.export.save(program, tmp_path / "m.pt2")
    return tmp_path / "m.pt2"


def test_removed_modules_are_named_so_and_do_not_fail_check(tmp_path: Path, cli: RunCli) -> None:
    path = exported(tmp_path)
    loaded = load_model(path).module  # ground truth: the erased module's hook never fires
    fired: list[str] = []
    loaded.get_submodule("id").register_forward_hook(lambda *_: fired.append("id"))
    loaded(torch.randn(2, 4))
    assert fired == []
    code, out, err = cli("check", path)
    assert code == 0, out + err
    code, out, err = cli("check", path, "--layer", "id", "--layer", "fc", "--json")
    assert code == 0, out + err
    entry = next(e for e in json.loads(out)["report"]["not_run"] if e["layer"] == "id")
    assert entry["cause"] == "removed-by-export"
    assert entry["summary"].startswith("removed by export")
