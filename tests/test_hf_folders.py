"""Hugging Face style folders without transformers: listing from headers, shards, errors.

The folders are written by hand here (config.json + safetensors), as ``save_pretrained``
writes them; tests/real_models/test_hf_folders.py builds them with transformers itself.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fvis import hf
from fvis.loading import LoadOptions, inspect_model, load_model
from tests.conftest import RunCli

HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


@pytest.fixture(autouse=True)
def without_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    """These folders' model type is made up: where transformers is installed (``fvis[hf]``)
    it would refuse them, so listing goes the way it goes without it."""
    monkeypatch.setattr(hf, "have_transformers", lambda: False)


class Tied(nn.Module):
    """An embedding and an output head sharing one weight, as language models do."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mid(self.embed(ids))))


def tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = Tied().state_dict()
    del state["head.weight"]  # a tied weight is stored once, under its first name
    return state


def write_folder(folder: Path, shards: int = 1, config: bool = True) -> Path:
    folder.mkdir()
    if config:
        (folder / "config.json").write_text(json.dumps({"model_type": "tied", "architectures": []}))
    state = tensors()
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    names = sorted(state)
    weight_map = {}
    for k in range(shards):
        shard = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[k::shards]}
        save_file(part, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def arch_file(tmp_path: Path) -> str:
    path = tmp_path / "tied_arch.py"
    path.write_text(
        "import torch\nfrom torch import nn\n\n"
        "class Tied(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.embed = nn.Embedding(10, 4)\n"
        "        self.mid = nn.Linear(4, 4)\n"
        "        self.head = nn.Linear(4, 10, bias=False)\n"
        "        self.head.weight = self.embed.weight\n\n"
        "    def forward(self, ids):\n"
        "        return self.head(torch.relu(self.mid(self.embed(ids))))\n"
    )
    return f"{path}:Tied"


@pytest.mark.parametrize("shards", [1, 3])
def test_folder_lists_every_tensor_from_headers(tmp_path: Path, shards: int) -> None:
    folder = write_folder(tmp_path / "tiny", shards)
    tree = inspect_model(folder)
    stored = sum(t.numel() for t in tensors().values())
    assert tree.layers[0].params == stored
    assert set(tree.names()) == {"embed", "mid"}
    assert tree.kind == "hf-folder"
    assert (f"{shards} shards" if shards > 1 else "model.safetensors") in tree.source_note


@pytest.mark.skipif(HAVE_TRANSFORMERS, reason="the message for a machine without transformers")
def test_listing_without_transformers_names_the_extra(tmp_path: Path, cli: RunCli) -> None:
    folder = write_folder(tmp_path / "tiny")
    code, out, _ = cli("layers", folder)
    assert code == 0
    assert "fvis[hf]" in out and "parameter-free modules" in out


@pytest.mark.skipif(HAVE_TRANSFORMERS, reason="the message for a machine without transformers")
def test_loading_without_transformers_is_one_line_naming_the_extra(
    tmp_path: Path, cli: RunCli
) -> None:
    folder = write_folder(tmp_path / "tiny")
    code, _, err = cli("dump", folder, "--out", tmp_path / "out")
    assert code == 2
    assert err.splitlines() == [
        f"fvis: error: {folder} is a Hugging Face folder; loading it needs transformers",
        "hint: install the Hugging Face extra: pip install 'fvis[hf]'",
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "part", ["model-00002-of-00003.safetensors", "model.safetensors.index.json"]
)
def test_one_shard_or_the_index_points_to_the_folder(
    tmp_path: Path, cli: RunCli, part: str
) -> None:
    folder = write_folder(tmp_path / "tiny", shards=3)
    code, _, err = cli("layers", folder / part)
    assert code == 2
    assert f"is one part of the sharded model in {folder}" in err
    assert f"hint: pass the folder: {folder}" in err


def test_index_naming_a_missing_shard_is_a_bad_file(tmp_path: Path, cli: RunCli) -> None:
    folder = write_folder(tmp_path / "tiny", shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    code, _, err = cli("layers", folder)
    assert code == 3
    assert "names shard 'model-00002-of-00002.safetensors', which is not in" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "index",
    [
        "[]",
        '{"weight_map": "model.safetensors"}',
        '{"weight_map": {"a": "../outside.safetensors"}}',
        "{not json",
    ],
)
def test_malformed_index_is_a_bad_file(tmp_path: Path, cli: RunCli, index: str) -> None:
    folder = write_folder(tmp_path / "tiny", shards=2)
    (folder / "model.safetensors.index.json").write_text(index)
    code, _, err = cli("layers", folder)
    assert code == 3, err
    assert err.startswith("fvis: error: ") and "Traceback" not in err


def test_folder_with_config_but_no_weights(tmp_path: Path, cli: RunCli) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    code, _, err = cli("layers", folder)
    assert code == 3
    assert "Hugging Face folder without weights" in err


def test_plain_folder_is_still_refused_as_a_folder(tmp_path: Path, cli: RunCli) -> None:
    code, _, err = cli("layers", tmp_path)
    assert code == 2
    assert "is a folder, not a checkpoint file" in err


@pytest.mark.parametrize("shards", [1, 2])
def test_folder_with_arch_loads_the_shards_into_the_architecture(
    tmp_path: Path, shards: int
) -> None:
    folder = write_folder(tmp_path / "tiny", shards, config=False)
    loaded = load_model(folder, LoadOptions(arch=arch_file(tmp_path)))
    torch.manual_seed(0)
    reference = Tied().eval()
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(loaded.module(ids), reference(ids))
    assert loaded.module.head.weight is loaded.module.embed.weight  # still tied after loading


def test_tied_weights_are_counted_once(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "tiny", config=False)
    tree = inspect_model(folder, LoadOptions(arch=arch_file(tmp_path)))
    expected = sum(p.numel() for p in Tied().parameters())  # parameters() counts a tie once
    assert tree.layers[0].params == expected
    assert tree.layers[0].params < sum(t.numel() for t in Tied().state_dict().values())


def test_no_strict_loads_what_fits_and_warns(tmp_path: Path, cli: RunCli) -> None:
    state = tensors()
    del state["mid.bias"]
    save_file(state, str(tmp_path / "partial.safetensors"))
    arch = arch_file(tmp_path)
    ids = tmp_path / "ids.pt"
    torch.save(torch.tensor([[1, 2, 3]]), ids)
    model = tmp_path / "partial.safetensors"
    code, _, err = cli("dump", model, "--arch", arch, "--input", ids, "--out", tmp_path / "strict")
    assert code == 5
    assert "1 missing key: mid.bias" in err and "--no-strict" in err
    code, out, err = cli(
        "dump",
        model,
        "--arch",
        arch,
        "--no-strict",
        "--input",
        ids,
        "--out",
        tmp_path / "loose",
        "--json",
    )
    assert code == 0, err
    report = json.loads(out)
    assert "warning: 1 missing key: mid.bias (--no-strict)" in json.dumps(report)
