"""Text and saved tokenizer batches into real transformers models, offline.

The tokenizer is a tiny word-level model trained here on a few sentences (nothing is
downloaded) and saved beside each model with ``save_pretrained``. Ground truth: the model
called with that tokenizer's own output, under an independent forward hook.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers as T
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from tests.conftest import RunCli
from tests.real_models.tiny import bert, gpt2

SENTENCES = ["the cat sat on the mat", "hello world", "a dog ran in the park"]


def tokenizer(pad: bool = True) -> Any:
    model = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["[UNK]", "[PAD]"] if pad else ["[UNK]", "[EOS]"]
    model.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=special))
    extra = {"pad_token": "[PAD]"} if pad else {"eos_token": "[EOS]"}
    return T.PreTrainedTokenizerFast(tokenizer_object=model, unk_token="[UNK]", **extra)


def _folder(tmp: Path, model: Any, tok: Any | None) -> Path:
    folder = tmp / "model"
    model.save_pretrained(folder)
    if tok is not None:
        tok.save_pretrained(folder)
    return folder


def _hooked(model: Any, layer: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()  # as fvis runs it (dropout off)
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(
        lambda _m, _i, out: seen.append((out[0] if isinstance(out, tuple) else out).detach())
    )
    try:
        model(**batch)
    finally:
        handle.remove()
    return seen[0]


def _dump(cli: RunCli, folder: Path, layer: str, out: Path, *options: str | Path) -> dict:
    code, _, err = cli(
        "dump", folder, "--layer", layer, "--save-tensors", "--out", out, "--quiet", *options
    )
    assert code == 0, err
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("texts", [["hello world"], ["the cat sat on the mat", "hello world"]])
def test_text_is_tokenized_by_the_tokenizer_beside_the_model(
    tmp_path: Path, cli: RunCli, texts: list[str]
) -> None:
    torch.manual_seed(0)
    model, tok = gpt2(), tokenizer()
    folder = _folder(tmp_path, model, tok)
    args = [a for text in texts for a in ("--text", text)]
    report = _dump(cli, folder, "transformer.h.1", tmp_path / "out", *args)
    batch = dict(tok(texts, return_tensors="pt", padding=True))
    saved = load_file(str(tmp_path / "out" / "activations.safetensors"))["transformer.h.1"]
    assert torch.equal(saved, _hooked(model, "transformer.h.1", batch))
    expected = [tok.convert_ids_to_tokens(row.tolist()) for row in batch["input_ids"]]
    assert report["input"]["tokens"] == expected
    assert report["input"]["shapes"] == [list(batch["input_ids"].shape)] * 2


def test_a_text_file_is_one_sample_per_line(tmp_path: Path, cli: RunCli) -> None:
    model, tok = bert(), tokenizer()
    folder = _folder(tmp_path, model, tok)
    (tmp_path / "texts.txt").write_text("hello world\n\nthe cat sat\n")
    report = _dump(
        cli, folder, "encoder.layer.0", tmp_path / "out", "--text-file", tmp_path / "texts.txt"
    )
    batch = dict(tok(["hello world", "the cat sat"], return_tensors="pt", padding=True))
    saved = load_file(str(tmp_path / "out" / "activations.safetensors"))["encoder.layer.0"]
    assert torch.equal(saved, _hooked(model, "encoder.layer.0", batch))
    assert len(report["input"]["tokens"]) == 2


def test_texts_without_a_pad_token_are_padded_with_eos_and_say_so(
    tmp_path: Path, cli: RunCli
) -> None:
    folder = _folder(tmp_path, gpt2(), tokenizer(pad=False))
    report = _dump(
        cli, folder, "transformer.h.0", tmp_path / "out", "--text", "hello", "--text", "a dog ran"
    )
    assert "padded with the end-of-sequence token '[EOS]'" in report["input"]["description"]


def test_no_tokenizer_is_one_clear_line(tmp_path: Path, cli: RunCli) -> None:
    folder = _folder(tmp_path, gpt2(), None)
    code, _, err = cli("dump", folder, "--text", "hello", "--out", tmp_path / "out")
    assert code == 2
    assert err.splitlines()[0] == (
        f"fvis: error: --text needs a tokenizer saved beside the model; {folder} holds none "
        "(tokenizer.json, tokenizer_config.json)"
    )
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    # --tokenizer points at one elsewhere
    tokenizer().save_pretrained(tmp_path / "tok")
    code, _, err = cli(
        "dump", folder, "--text", "hello", "--tokenizer", tmp_path / "tok", "--out",
        tmp_path / "out", "--quiet",
    )  # fmt: skip
    assert code == 0, err


def test_a_saved_batch_encoding_is_keyword_inputs_with_its_tokens(
    tmp_path: Path, cli: RunCli
) -> None:
    torch.manual_seed(0)
    model, tok = bert(), tokenizer()
    folder = _folder(tmp_path, model, None)
    encoding = tok(
        ["the cat sat", "hello world"],
        return_tensors="pt",
        padding=True,
        return_token_type_ids=True,
    )
    assert isinstance(encoding, T.BatchEncoding) and "token_type_ids" in encoding
    torch.save(encoding, tmp_path / "batch.pt")
    report = _dump(
        cli, folder, "encoder.layer.1", tmp_path / "out", "--input", tmp_path / "batch.pt"
    )
    saved = load_file(str(tmp_path / "out" / "activations.safetensors"))["encoder.layer.1"]
    assert torch.equal(saved, _hooked(model, "encoder.layer.1", dict(encoding)))
    assert report["input"]["tokens"] == [e.tokens for e in encoding.encodings]
    assert "BatchEncoding" in report["input"]["description"]


def test_text_into_t5_gets_decoder_start_ids(tmp_path: Path, cli: RunCli) -> None:
    config = T.T5Config(
        num_layers=1, num_decoder_layers=1, d_model=16, d_ff=32, num_heads=2, d_kv=8,
        vocab_size=100, decoder_start_token_id=0,
    )  # fmt: skip
    folder = _folder(tmp_path, T.T5ForConditionalGeneration(config), tokenizer())
    report = _dump(cli, folder, "encoder.block.0", tmp_path / "out", "--text", "hello world")
    assert "decoder_input_ids synthesized" in report["input"]["description"]


def _images(report: dict) -> dict[str, dict]:
    return {c["label"]: c["images"][0] for c in report["captures"] if c["images"]}


def test_gpt2_pictures_are_token_labelled_and_sdpa_says_how_to_get_attention(
    tmp_path: Path, cli: RunCli
) -> None:
    folder = _folder(tmp_path, gpt2(), tokenizer())
    text = ("--text", "hello world the cat")
    report = _dump(cli, folder, "transformer.h.1", tmp_path / "a", *text)
    assert _images(report)["transformer.h.1"]["layout"] == "tokens"
    # the rows are the tokens: the picture differs from one of the same values by position
    from PIL import Image

    from fvis.render import RenderOptions
    from fvis.sequences import render_tokens

    saved = load_file(str(tmp_path / "a" / "activations.safetensors"))["transformer.h.1"]
    drawn = Image.open(tmp_path / "a" / "transformer.h.1.png")
    tokens = report["input"]["tokens"][0]
    title = "transformer.h.1"
    same, _ = render_tokens(saved[0].numpy(), title, tokens, RenderOptions())
    positions, _ = render_tokens(saved[0].numpy(), title, None, RenderOptions())
    assert np.array_equal(np.asarray(drawn), np.asarray(same))
    assert not np.array_equal(np.asarray(drawn), np.asarray(positions))
    # under SDPA the attention module returns None for its probabilities: said, with the way
    report = _dump(cli, folder, "transformer.h.0.attn", tmp_path / "b", *text)
    notes = [n["note"] for n in report["output_notes"] if n["layer"] == "transformer.h.0.attn"]
    assert notes == [
        "output[1] is None: sdpa attention does not compute the probabilities; load the model "
        "with --attn-implementation eager to capture them"
    ]
    report = _dump(
        cli, folder, "transformer.h.0.attn", tmp_path / "c", *text,
        "--attn-implementation", "eager",
    )  # fmt: skip
    assert not [n for n in report["output_notes"] if n["layer"] == "transformer.h.0.attn"]
    probs = _images(report)["transformer.h.0.attn[1]"]
    assert probs["layout"] == "grid" and probs["shown_channels"] == 2  # one tile per head
    assert "rows: queries, columns: keys" in probs["note"]
    # ground truth: eager attention's probabilities, by an independent hook
    eager = T.GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()
    seen: list[Any] = []
    eager.transformer.h[0].attn.register_forward_hook(lambda _m, _i, out: seen.append(out[1]))
    eager(**tokenizer()(["hello world the cat"], return_tensors="pt"))
    captured = load_file(str(tmp_path / "c" / "activations.safetensors"))
    assert torch.equal(captured["transformer.h.0.attn[1]"], seen[0].detach())


def test_an_unknown_attention_kernel_is_a_usage_error(tmp_path: Path, cli: RunCli) -> None:
    folder = _folder(tmp_path, gpt2(), tokenizer())
    code, _, err = cli(
        "dump", folder, "--text", "hello", "--attn-implementation", "bogus", "--out",
        tmp_path / "out",
    )  # fmt: skip
    assert code == 2 and err.startswith("fvis: error: --attn-implementation 'bogus': ")
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("kernel", [None, "eager"])
def test_default_check_passes_on_stock_gpt2_with_text(
    tmp_path: Path, cli: RunCli, kernel: str | None
) -> None:
    folder = _folder(tmp_path, gpt2(), tokenizer())
    extra = ("--attn-implementation", kernel) if kernel else ()
    code, out, err = cli("check", folder, "--text", "hello world", "--text", "the cat sat", *extra)
    assert code == 0, out + err
    assert "fvis check passed" in out
