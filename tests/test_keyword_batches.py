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


def _spoofed_batch_encoding(monkeypatch: pytest.MonkeyPatch, extra: object = None) -> type:
    """Classes pickled under transformers' and tokenizers' names (neither is installed here),
    pickling as the real ones do: BatchEncoding's state holds data and encodings, an
    Encoding's state is its JSON."""
    import sys
    import types

    outer = types.ModuleType("transformers.tokenization_utils_base")
    tokenizers = types.ModuleType("tokenizers")

    class Encoding:
        def __init__(self, tokens: list[str]) -> None:
            self.tokens = tokens

        def __getstate__(self) -> bytes:
            return json.dumps({"ids": [], "tokens": self.tokens}).encode()

    class BatchEncoding:
        def __init__(self, data: dict, encodings: list) -> None:
            self.data, self.encodings = data, encodings

        def __getstate__(self) -> dict:
            state = {"data": self.data, "encodings": self.encodings}
            return {**state, "extra": extra} if extra is not None else state

    Encoding.__module__, Encoding.__qualname__ = "tokenizers", "Encoding"
    BatchEncoding.__module__ = "transformers.tokenization_utils_base"
    BatchEncoding.__qualname__ = "BatchEncoding"
    outer.BatchEncoding, tokenizers.Encoding = BatchEncoding, Encoding  # type: ignore[attr-defined]
    package = types.ModuleType("transformers")
    package.tokenization_utils_base = outer  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "transformers", package)
    monkeypatch.setitem(sys.modules, "transformers.tokenization_utils_base", outer)
    monkeypatch.setitem(sys.modules, "tokenizers", tokenizers)
    return lambda: BatchEncoding(
        dict(BATCH), [Encoding(["a", "b", "c"]), Encoding(["d", "e", "[PAD]"])]
    )  # type: ignore[return-value]


def test_a_pickled_batch_encoding_is_read_through_inert_stand_ins(
    tmp_path: Path, cli: RunCli, model: tuple[Path, str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.save(_spoofed_batch_encoding(monkeypatch)(), tmp_path / "enc.pt")
    monkeypatch.undo()  # fvis must read it without either library
    code, _, err = _dump(cli, model, tmp_path / "enc.pt", tmp_path / "out")
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["input"]["tokens"] == [["a", "b", "c"], ["d", "e", "[PAD]"]]
    assert "enc.pt (BatchEncoding)" in report["input"]["description"]


def test_a_batch_encoding_naming_a_dangerous_global_is_refused(
    tmp_path: Path, cli: RunCli, model: tuple[Path, str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    torch.save(_spoofed_batch_encoding(monkeypatch, extra=os.system)(), tmp_path / "enc.pt")
    monkeypatch.undo()
    code, _, err = _dump(cli, model, tmp_path / "enc.pt", tmp_path / "out")
    assert code == 4
    assert "names dangerous globals" in err.splitlines()[0] and "system" in err.splitlines()[0]
    assert not (tmp_path / "out").exists()
