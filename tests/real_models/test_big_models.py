"""--device-map auto through accelerate: a model bigger than its --max-memory budget is
offloaded to disk, and every capture equals the in-memory run (accelerate's hooks load the
weights inside fvis's module hooks, so the order is right)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.conftest import RunCli
from tests.real_models.tiny import IDS, gpt2


class Wide(nn.Module):
    """Eight 256x256 layers: about 2 MiB of float32 weights."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Linear(256, 256) for _ in range(8)])
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.blocks(x)))


def _dump(cli: RunCli, model: Path, out: Path, *extra: str | Path) -> tuple[dict, dict]:
    code, _, err = cli(
        "dump", model, "--all", "--save-tensors", "--no-images", "--out", out, "--quiet", *extra
    )
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    return report, load_file(str(out / "activations.safetensors"))


def _same_captures(first: tuple[dict, dict], second: tuple[dict, dict]) -> None:
    assert first[1].keys() == second[1].keys() and first[1]
    for label, tensor in first[1].items():
        assert torch.equal(tensor, second[1][label]), label
    stats = [(c["label"], c["stats"], c["verdict"]["cause"]) for c in first[0]["captures"]]
    assert stats == [(c["label"], c["stats"], c["verdict"]["cause"]) for c in second[0]["captures"]]


def test_a_checkpoint_over_the_budget_is_offloaded_and_captures_equal(
    tmp_path: Path, cli: RunCli
) -> None:
    torch.manual_seed(0)
    torch.save(Wide().state_dict(), tmp_path / "wide.pt")
    torch.save(torch.randn(2, 256), tmp_path / "x.pt")
    common = ("--arch", "tests.real_models.test_big_models:Wide", "--input", tmp_path / "x.pt")
    plain = _dump(cli, tmp_path / "wide.pt", tmp_path / "plain", *common)
    offload = tmp_path / "offload"
    big = _dump(
        cli, tmp_path / "wide.pt", tmp_path / "big", *common, "--device-map", "auto",
        "--max-memory", "cpu=600KB", "--offload-folder", offload,
    )  # fmt: skip
    notes = " ".join(big[0]["model"]["notes"])
    assert "on disk" in notes and str(offload) in notes
    assert any(p.suffix == ".dat" for p in offload.iterdir())  # weights really went to disk
    assert big[0]["input"]["device"] == "device map"
    _same_captures(plain, big)


def test_a_hugging_face_folder_loads_into_the_map(tmp_path: Path, cli: RunCli) -> None:
    torch.manual_seed(0)
    gpt2().save_pretrained(tmp_path / "gpt2")
    torch.save(IDS, tmp_path / "ids.pt")
    plain = _dump(cli, tmp_path / "gpt2", tmp_path / "plain", "--input", tmp_path / "ids.pt")
    big = _dump(
        cli, tmp_path / "gpt2", tmp_path / "big", "--input", tmp_path / "ids.pt",
        "--device-map", "auto", "--max-memory", "cpu=40KB",
    )  # fmt: skip
    assert "on disk" in " ".join(big[0]["model"]["notes"])
    _same_captures(plain, big)


def test_an_offload_folder_holding_files_is_refused(tmp_path: Path, cli: RunCli) -> None:
    torch.save(Wide().state_dict(), tmp_path / "wide.pt")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep me")
    code, _, err = cli(
        "dump", tmp_path / "wide.pt", "--arch", "tests.real_models.test_big_models:Wide",
        "--device-map", "auto", "--offload-folder", tmp_path / "busy", "--out", tmp_path / "o",
    )  # fmt: skip
    assert code == 6
    assert (
        err.splitlines()[0]
        == f"fvis: error: --offload-folder {tmp_path / 'busy'} is not an empty folder"
    )
    assert (tmp_path / "busy" / "mine.txt").read_text() == "keep me"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("budget", ["cpu", "cpu=lots", "gpu=1GiB"])
def test_a_bad_budget_is_one_line(tmp_path: Path, cli: RunCli, budget: str) -> None:
    code, _, err = cli("dump", "--device-map", "auto", "--max-memory", budget, "--out", tmp_path)
    assert code == 2 and "write DEVICE=SIZE, e.g. cpu=4GiB or 0=20GiB" in err
