"""Tiny random-weight models from the real libraries, and the independent ground truth."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers as T
from safetensors.torch import load_file

from tests.conftest import RunCli

IDS = torch.tensor([[5, 17, 42, 3, 99, 0, 64, 8]])


def gpt2(layers: int = 2) -> Any:
    config = T.GPT2Config(
        n_layer=layers,
        n_embd=32,
        n_head=2,
        vocab_size=100,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return T.GPT2LMHeadModel(config)


def bert(layers: int = 2) -> Any:
    config = T.BertConfig(
        num_hidden_layers=layers,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=32,
    )
    return T.BertModel(config)


def hooked_output(model: Any, layer: str, inputs: torch.Tensor) -> torch.Tensor:
    """The layer's output by an independent forward hook (the ground truth), in grad mode as
    ``fvis dump`` runs by default (some kernels differ in the last bit under ``no_grad``)."""
    found: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(
        lambda _m, _i, out: found.append(out.detach().clone())
    )
    try:
        config = getattr(model, "config", None)
        if getattr(config, "is_encoder_decoder", False):
            model(input_ids=inputs, decoder_input_ids=torch.zeros((1, 1), dtype=torch.long))
        else:
            model(inputs)
    finally:
        handle.remove()
    return found[0]


def dumped(
    cli: RunCli, model_path: Path, layer: str, inputs: torch.Tensor, tmp: Path, *options: str
) -> torch.Tensor:
    """``fvis dump --save-tensors`` of one layer: the whole captured tensor it wrote (every
    sample, in its own dtype)."""
    torch.save(inputs, tmp / "input.pt")
    code, _, err = cli(
        "dump",
        model_path,
        "--layer",
        layer,
        "--input",
        tmp / "input.pt",
        "--save-tensors",
        "--no-images",
        "--out",
        tmp / "out",
        "--quiet",
        *options,
    )
    assert code == 0, err
    return load_file(str(tmp / "out" / "activations.safetensors"))[layer]
