"""Text inputs (``--text``, ``--text-file``): tokenized offline with the tokenizer saved beside
the model, passed as ``input_ids`` and ``attention_mask``, the tokens kept for labels.

The tokenizer is read from the model's Hugging Face folder (or the folder holding a model
file, or ``--tokenizer DIR``) with ``transformers.AutoTokenizer`` and ``local_files_only``
(never the network; remote code stays refused). Without transformers, a ``tokenizer.json``
is read with the ``tokenizers`` library alone.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fvis.errors import BadFileError, UsageError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt")
MAX_TEXTS = 64
MAX_TEXT_FILE_BYTES = 1 << 20


@dataclass(frozen=True)
class Tokenized:
    """Texts as a padded batch: the tensors, each sample's tokens, and what was done."""

    tensors: dict[str, torch.Tensor]
    tokens: tuple[tuple[str, ...], ...]
    description: str


def prepare_text(model: Any, model_path: Path | None, options: Any) -> Any:
    """``Prepared`` keyword inputs for ``options.texts`` (an ``InputOptions``)."""
    from fvis.inputs import Prepared, check_token_ids, with_decoder_start

    if options.sources or options.shape:
        raise UsageError("give either --text or --input/--shape, not both")
    tokenized = tokenize(tokenizer_folder(model_path, options.tokenizer), options.texts)
    prepared = Prepared((), tokenized.tensors, tokenized.description, tokens=tokenized.tokens)
    check_token_ids(model, prepared)
    return with_decoder_start(model, prepared)


def read_text_file(path: Path) -> tuple[str, ...]:
    """One text per non-empty line of a UTF-8 file."""
    try:
        if path.stat().st_size > MAX_TEXT_FILE_BYTES:
            raise UsageError(f"--text-file {path} is larger than 1 MiB")
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UsageError(f"--text-file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadFileError(f"--text-file {path} cannot be read as UTF-8 text ({exc})") from None
    texts = tuple(line for line in lines if line.strip())
    if not texts:
        raise UsageError(f"--text-file {path} holds no text")
    return texts


def tokenizer_folder(model_path: Path | None, explicit: Path | None) -> Path:
    """The folder the tokenizer is read from: ``--tokenizer``, else the model's folder."""
    folder = explicit or (
        model_path if model_path and model_path.is_dir() else model_path and model_path.parent
    )
    if folder is None or not folder.is_dir():
        where = f"{explicit} is not a folder" if explicit else "the bundled sample has none"
        raise UsageError(f"--text needs a tokenizer: {where}", hint=_HOW)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UsageError(
            f"--text needs a tokenizer saved beside the model; {folder} holds none "
            f"({', '.join(TOKENIZER_FILES[:2])})",
            hint=_HOW,
        )
    return folder


_HOW = "save one with tokenizer.save_pretrained(FOLDER), or give --tokenizer DIR"


def tokenize(folder: Path, texts: Sequence[str]) -> Tokenized:
    """Tokenize ``texts`` with the tokenizer in ``folder``; several texts are padded."""
    if len(texts) > MAX_TEXTS:
        raise UsageError(f"at most {MAX_TEXTS} texts in one run, got {len(texts)}")
    try:
        import transformers  # noqa: F401
    except ImportError:
        return _with_tokenizers_library(folder, texts)
    return _with_transformers(folder, texts)


def _with_transformers(folder: Path, texts: Sequence[str]) -> Tokenized:
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # remote code, a damaged file, a missing vocabulary
        raise BadFileError(
            f"the tokenizer in {folder} could not be loaded: {_first_line(exc)}"
        ) from None
    notes = []
    if len(texts) > 1 and tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UsageError(
                f"the tokenizer in {folder} has no pad token, so texts of different lengths "
                "cannot share a batch",
                hint="give one --text at a time",
            )
        tokenizer.pad_token = tokenizer.eos_token
        notes.append(f"padded with the end-of-sequence token {tokenizer.eos_token!r}")
    encoded = tokenizer(list(texts), return_tensors="pt", padding=len(texts) > 1)
    tensors = {k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)}
    tokens = tuple(
        tuple(tokenizer.convert_ids_to_tokens(row.tolist())) for row in tensors["input_ids"]
    )
    return Tokenized(tensors, tokens, _describe(folder, texts, tensors, notes))


def _with_tokenizers_library(folder: Path, texts: Sequence[str]) -> Tokenized:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise UsageError(
            "--text needs transformers or tokenizers", hint="pip install 'fvis[hf]'"
        ) from None
    if not (folder / "tokenizer.json").is_file():
        raise UsageError(
            f"{folder} has no tokenizer.json, and reading other tokenizer files needs transformers",
            hint="pip install 'fvis[hf]'",
        )
    try:
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as exc:
        raise BadFileError(f"{folder / 'tokenizer.json'} could not be read: {exc}") from None
    encodings = tokenizer.encode_batch(list(texts))
    width = max(len(e.ids) for e in encodings)
    if len({len(e.ids) for e in encodings}) > 1:
        raise UsageError(
            "texts of different lengths need transformers to pad them",
            hint="give one --text at a time, or pip install 'fvis[hf]'",
        )
    ids = torch.tensor([e.ids for e in encodings], dtype=torch.long).reshape(len(texts), width)
    tensors = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    tokens = tuple(tuple(e.tokens) for e in encodings)
    return Tokenized(tensors, tokens, _describe(folder, texts, tensors, []))


def _describe(folder: Path, texts: Sequence[str], tensors: dict[str, Any], notes: list[str]) -> str:
    shape = tuple(tensors["input_ids"].shape)
    what = f"{len(texts)} texts" if len(texts) > 1 else repr(_preview(texts[0]))
    return "; ".join(
        [f"{what} tokenized by the tokenizer in {folder.name or folder}: {shape}", *notes]
    )


def _preview(text: str) -> str:
    return text if len(text) <= 40 else text[:37] + "..."


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
