"""A tokenizer batch saved as one file (a dict of tensors, several tensors in a .safetensors)
is passed as the model's keyword inputs, not refused as a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import RunCli

ARCH = """
import torch
from torch import nn

class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(10, 4)
        self.mix = nn.Linear(4, 4)

    def forward(self, input_ids, attention_mask=None):
        hidden = self.wte(input_ids)
        if attention_mask is not None:
            hidden = hidden * attention_mask[..., None]
        return self.mix(hidden)
"""

BATCH = {
    "input_ids": torch.tensor([[1, 2, 3], [4, 5, 0]]),
    "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
}


@pytest.fixture
def model(tmp_path: Path) -> tuple[Path, str, object]:
    (tmp_path / "masked.py").write_text(ARCH)
    namespace: dict[str, object] = {}
    exec(ARCH, namespace)
    torch.manual_seed(0)
    net = namespace["Masked"]()  # type: ignore[operator]
    torch.save(net.state_dict(), tmp_path / "w.pt")
    return tmp_path / "w.pt", f"{tmp_path / 'masked.py'}:Masked", net


def _dump(cli: RunCli, model: tuple[Path, str, object], batch: Path, out: Path) -> tuple:
    return cli(
        "dump", model[0], "--arch", model[1], "--input", batch, "--layer", "mix",
        "--save-tensors", "--no-images", "--out", out, "--quiet",
    )  # fmt: skip


def _saved(tmp_path: Path, form: str) -> Path:
    if form == "safetensors":
        save_file(BATCH, str(tmp_path / "batch.safetensors"))
        return tmp_path / "batch.safetensors"
    torch.save(dict(BATCH), tmp_path / "batch.pt")
    return tmp_path / "batch.pt"


@pytest.mark.parametrize("form", ["pt", "safetensors"])
def test_a_saved_batch_is_the_models_keyword_inputs(
    tmp_path: Path, cli: RunCli, model: tuple[Path, str, object], form: str
) -> None:
    code, _, err = _dump(cli, model, _saved(tmp_path, form), tmp_path / "out")
    assert code == 0, err
    # ground truth: an independent hook on the same weights, called with the batch as keywords
    net = model[2]
    seen: list[torch.Tensor] = []
    net.mix.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))  # type: ignore[attr-defined]
    net(**BATCH)  # type: ignore[operator]
    assert torch.equal(load_file(str(tmp_path / "out" / "activations.safetensors"))["mix"], seen[0])
    # the mask was passed: without it the padded token's output differs
    unmasked = net.mix(net.wte(BATCH["input_ids"]))  # type: ignore[attr-defined]
    assert not torch.equal(unmasked, seen[0])
    described = json.loads((tmp_path / "out" / "report.json").read_text())["input"]["description"]
    assert "input_ids (2, 3)" in described and "attention_mask (2, 3)" in described


def test_a_batch_with_a_key_forward_does_not_take_is_one_line(
    tmp_path: Path, cli: RunCli, model: tuple[Path, str, object]
) -> None:
    torch.save({**BATCH, "token_type_ids": torch.zeros(2, 3, dtype=torch.long)}, tmp_path / "b.pt")
    code, _, err = _dump(cli, model, tmp_path / "b.pt", tmp_path / "out")
    assert code == 5
    assert err.splitlines()[0] == (
        f"fvis: error: {tmp_path / 'b.pt'} holds token_type_ids, which Masked.forward does not "
        "take (it takes input_ids, attention_mask)"
    )
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_a_state_dict_given_as_input_is_still_called_a_checkpoint(
    tmp_path: Path, cli: RunCli, model: tuple[Path, str, object]
) -> None:
    code, _, err = _dump(cli, model, model[0], tmp_path / "out")
    assert code == 5
    assert "is a model checkpoint" in err.splitlines()[0]


def test_batch_sizes_that_disagree_are_one_line(
    tmp_path: Path, cli: RunCli, model: tuple[Path, str, object]
) -> None:
    torch.save({**BATCH, "attention_mask": torch.ones(3, 3, dtype=torch.long)}, tmp_path / "b.pt")
    code, _, err = _dump(cli, model, tmp_path / "b.pt", tmp_path / "out")
    assert code == 5
    assert "the inputs disagree on the batch size (2, 3)" in err.splitlines()[0]


def test_out_of_vocabulary_ids_in_a_batch_are_named(
    tmp_path: Path, cli: RunCli, model: tuple[Path, str, object]
) -> None:
    torch.save({**BATCH, "input_ids": torch.tensor([[1, 2, 30], [4, 5, 0]])}, tmp_path / "b.pt")
    code, _, err = _dump(cli, model, tmp_path / "b.pt", tmp_path / "out")
    assert code == 5
    assert "input id 30 is outside the vocabulary [0, 10) of wte" in err.splitlines()[0]
