"""Positional and keyword inputs together: ``--input x.pt --input y=y.pt`` and
``capture(model, [x], layers, kwargs={"y": y})`` both reach ``forward(x, y=...)``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from typer.testing import CliRunner

from fvis.capture import capture
from fvis.cli import app
from fvis.loading import LoadedModel, ModelSource


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Identity()
        self.b = nn.Identity()

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        out = self.a(x)
        if y is not None:
            out = out + self.b(y)
        return out


def test_capture_takes_positional_and_keyword_inputs() -> None:
    x, y = torch.ones(1, 3), torch.full((1, 3), 2.0)
    result = capture(_TwoInputs(), [x], ["a", "b"], kwargs={"y": y})
    assert [c.label for c in result.captures] == ["a", "b"]
    assert result.never_ran == ()
    assert torch.equal(result.output, x + y)


def test_a_mapping_alone_still_works() -> None:
    x, y = torch.ones(1, 3), torch.ones(1, 3)
    result = capture(_TwoInputs(), {"x": x, "y": y}, ["b"])
    assert [c.label for c in result.captures] == ["b"]


@pytest.mark.parametrize("batch_size", [None, 1])
def test_cli_passes_both_kinds_of_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch_size: int | None
) -> None:
    from fvis import api

    loaded = LoadedModel(_TwoInputs(), ModelSource(None, "test", "", ()))
    monkeypatch.setattr(api, "open_model", lambda ref: loaded)
    torch.save(torch.ones(2, 3), tmp_path / "x.pt")
    torch.save(torch.full((2, 3), 5.0), tmp_path / "y.pt")
    out = tmp_path / "out"
    args: list[Any] = ["dump", str(tmp_path / "m.pt"), "--layer", "b", "--out", str(out)]
    args += ["--input", str(tmp_path / "x.pt"), "--input", f"y={tmp_path / 'y.pt'}"]
    if batch_size:
        args += ["--batch-size", str(batch_size)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["never_ran"] == []
    assert {c["stats"]["max"] for c in report["captures"]} == {5.0}
