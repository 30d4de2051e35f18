"""``save_pretrained`` folders of real transformers models open with no ``--arch``.

Each tiny model is saved plain and sharded; fvis must list it with the parameter count
``model.parameters()`` gives (tied weights once), and dump a deep layer whose values equal an
independent forward hook on the original model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

from tests.conftest import RunCli
from tests.real_models.tiny import IDS, bert, dumped, gpt2, hooked_output

# Llama and Qwen2 share a shape: grouped-query attention, embeddings tied to the head.
_DECODER = dict(
    num_hidden_layers=2,
    hidden_size=32,
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=64,
    vocab_size=100,
    max_position_embeddings=32,
    tie_word_embeddings=True,
)


def _llama() -> Any:
    return T.LlamaForCausalLM(T.LlamaConfig(**_DECODER))


def _qwen2() -> Any:
    return T.Qwen2ForCausalLM(T.Qwen2Config(**_DECODER))


def _t5() -> Any:
    config = T.T5Config(
        num_layers=2,
        num_decoder_layers=2,
        d_model=32,
        d_ff=64,
        num_heads=2,
        d_kv=16,
        vocab_size=100,
        decoder_start_token_id=0,
    )
    return T.T5ForConditionalGeneration(config)


def _vit() -> Any:
    config = T.ViTConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    return T.ViTModel(config)


PIXELS = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
# name -> (builder, deep layer to dump, input)
MODELS: dict[str, tuple[Callable[[], Any], str, torch.Tensor]] = {
    "gpt2": (gpt2, "transformer.h.1.attn.c_attn", IDS),
    "bert": (bert, "encoder.layer.1.attention.self.query", IDS),
    "llama": (_llama, "model.layers.0.self_attn.q_proj", IDS),
    "qwen2": (_qwen2, "model.layers.1.self_attn.q_proj", IDS),
    "t5": (_t5, "encoder.block.1.layer.0.SelfAttention.q", IDS),
    "vit": (_vit, "layers.1.attention.q_proj", PIXELS),  # saved as encoder.layer.1.*
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], tuple[Any, Path]]:
    """Every model saved plain and sharded (small shards: several files each)."""
    out = {}
    for name, (build, _, _) in MODELS.items():
        torch.manual_seed(0)
        model = build().eval()
        root = tmp_path_factory.mktemp(name)
        model.save_pretrained(root / "plain")
        model.save_pretrained(root / "sharded", max_shard_size="40KB")
        out[(name, "plain")] = (model, root / "plain")
        out[(name, "sharded")] = (model, root / "sharded")
    return out


CASES = [pytest.param(n, v, id=f"{n}-{v}") for n in MODELS for v in ("plain", "sharded")]


@pytest.mark.parametrize(("name", "variant"), CASES)
def test_layers_lists_the_folder_with_true_parameter_counts(
    saved: dict[tuple[str, str], tuple[Any, Path]], cli: RunCli, name: str, variant: str
) -> None:
    model, folder = saved[(name, variant)]
    if variant == "sharded":
        assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    code, out, err = cli("layers", folder, "--json")
    assert code == 0, err
    listing = json.loads(out)
    assert listing["totals"]["params"] == sum(p.numel() for p in model.parameters())
    names = {row["name"] for row in listing["layers"]}
    assert {n for n, _ in model.named_modules()} <= names


@pytest.mark.parametrize(("name", "variant"), CASES)
def test_dump_captures_a_deep_layer_exactly(
    saved: dict[tuple[str, str], tuple[Any, Path]],
    cli: RunCli,
    tmp_path: Path,
    name: str,
    variant: str,
) -> None:
    model, folder = saved[(name, variant)]
    _, layer, inputs = MODELS[name]
    captured = dumped(cli, folder, layer, inputs, tmp_path)
    assert torch.equal(captured, hooked_output(model, layer, inputs))


def test_legacy_key_names_load_through_the_library_conversion(
    saved: dict[tuple[str, str], tuple[Any, Path]], cli: RunCli, tmp_path: Path
) -> None:
    """Old BERT checkpoints name LayerNorm parameters gamma/beta; from_pretrained renames them,
    a raw load_state_dict would not."""
    model, folder = saved[("bert", "plain")]
    old = tmp_path / "bert-old"
    old.mkdir()
    (old / "config.json").write_bytes((folder / "config.json").read_bytes())
    state = load_file(str(folder / "model.safetensors"))
    renamed = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta"
        ): v
        for k, v in state.items()
    }
    assert renamed.keys() != state.keys()
    save_file(renamed, str(old / "model.safetensors"), metadata={"format": "pt"})
    layer = "encoder.layer.0.output.LayerNorm"
    captured = dumped(cli, old, layer, IDS, tmp_path)
    assert torch.equal(captured, hooked_output(model, layer, IDS))


def test_missing_weights_fail_strict_and_load_with_no_strict(
    saved: dict[tuple[str, str], tuple[Any, Path]], cli: RunCli, tmp_path: Path
) -> None:
    _, folder = saved[("gpt2", "plain")]
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_bytes((folder / "config.json").read_bytes())
    state = load_file(str(folder / "model.safetensors"))
    del state["transformer.h.0.mlp.c_fc.bias"]
    save_file(state, str(partial / "model.safetensors"), metadata={"format": "pt"})
    torch.save(IDS, tmp_path / "ids.pt")
    args = ("dump", partial, "--input", tmp_path / "ids.pt", "--layer", "transformer.h.0")
    code, _, err = cli(*args, "--out", tmp_path / "a")
    assert code == 5
    assert "transformer.h.0.mlp.c_fc.bias" in err and "--no-strict" in err
    code, out, err = cli(*args, "--no-strict", "--out", tmp_path / "b", "--json")
    assert code == 0, err
    assert "missing keys (randomly initialised): transformer.h.0.mlp.c_fc.bias" in out


def test_remote_code_is_refused_without_trust(
    saved: dict[tuple[str, str], tuple[Any, Path]], cli: RunCli, tmp_path: Path
) -> None:
    _, folder = saved[("gpt2", "plain")]
    evil = tmp_path / "evil"
    evil.mkdir()
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
    (evil / "config.json").write_text(json.dumps(config))
    (evil / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    marker = tmp_path / "MARKER"
    (evil / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    for command in (("layers", evil), ("dump", evil, "--out", tmp_path / "out")):
        code, _, err = cli(*command)
        assert code == 4, err
        assert "asks for custom model code from the folder (auto_map)" in err
        assert not marker.exists()


def _bin_folder(source: Path, folder: Path, weights: Any) -> Path:
    """A folder with pickled ``pytorch_model.bin`` weights (transformers 5 no longer writes
    them, but checkpoints on disk still have them)."""
    folder.mkdir()
    (folder / "config.json").write_bytes((source / "config.json").read_bytes())
    torch.save(weights, folder / "pytorch_model.bin")
    return folder


def test_pickled_bin_weights_load_weights_only(
    saved: dict[tuple[str, str], tuple[Any, Path]], cli: RunCli, tmp_path: Path
) -> None:
    model, plain = saved[("gpt2", "plain")]
    folder = _bin_folder(plain, tmp_path / "bin", load_file(str(plain / "model.safetensors")))
    layer = "transformer.h.1.mlp.c_fc"
    captured = dumped(cli, folder, layer, IDS, tmp_path)
    assert torch.equal(captured, hooked_output(model, layer, IDS))


def test_a_payload_in_bin_weights_is_refused(
    saved: dict[tuple[str, str], tuple[Any, Path]], cli: RunCli, tmp_path: Path
) -> None:
    from tests.payloads import SystemPayload

    _, plain = saved[("gpt2", "plain")]
    marker = tmp_path / "MARKER"
    state = {**load_file(str(plain / "model.safetensors")), "x": SystemPayload(marker)}
    folder = _bin_folder(plain, tmp_path / "evil", state)
    code, _, err = cli("dump", folder, "--out", tmp_path / "out")
    assert code == 4, err
    assert not marker.exists()
    assert "weights_only=False" not in err


@pytest.mark.parametrize("name", list(MODELS))
def test_default_check_passes_on_the_folder(
    saved: dict[tuple[str, str], tuple[Any, Path]], cli: RunCli, tmp_path: Path, name: str
) -> None:
    _, folder = saved[(name, "sharded")]
    code, out, err = cli("check", folder)
    assert code == 0, out + err
    assert out.strip().splitlines()[-1].startswith("fvis check passed")


def test_listing_a_folder_reads_no_tensor_data(
    saved: dict[tuple[str, str], tuple[Any, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors
    import safetensors.torch

    from fvis.loading import inspect_model

    def no_data(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("listing must not read tensor data")

    monkeypatch.setattr(safetensors.torch, "load_file", no_data)
    monkeypatch.setattr(safetensors.torch, "load", no_data)
    monkeypatch.setattr(torch, "load", no_data)
    monkeypatch.setattr(safetensors, "safe_open", no_data)  # with transformers: the config
    model, folder = saved[("llama", "sharded")]
    tree = inspect_model(folder)
    assert tree.layers[0].params == sum(p.numel() for p in model.parameters())


def test_a_builder_that_fails_on_meta_lists_for_real(tmp_path: Path, cli: RunCli) -> None:
    """torchvision's RegNet copies values in while it builds: 'Cannot copy out of meta'."""
    import torchvision

    model = torchvision.models.regnet_y_400mf(weights=None)
    torch.save(model.state_dict(), tmp_path / "regnet.pt")
    code, out, err = cli(
        "layers",
        tmp_path / "regnet.pt",
        "--arch",
        "torchvision.models:regnet_y_400mf",
        "--depth",
        "0",
    )
    assert code == 0, err
    assert "built on the CPU: the builder fails on the meta device" in out
    assert f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M" in out
