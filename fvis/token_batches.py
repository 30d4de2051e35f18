"""A tokenizer batch saved as one file, passed as the model's keyword inputs.

Three forms are accepted by ``--input FILE``:

- ``torch.save(tokenizer(texts, return_tensors="pt"))``: a pickled ``BatchEncoding``. It is
  read with ``weights_only=True`` and two inert stand-ins for ``BatchEncoding`` and
  ``tokenizers.Encoding`` (nothing from transformers is imported or run); the encodings'
  token strings become the pictures' labels;
- ``torch.save(dict(batch))``: a dict of tensors;
- a ``.safetensors`` file of several tensors.

A dict of tensors is an input batch, not a state dict, when its keys are parameters of the
model's ``forward`` (or ``forward`` takes ``**kwargs`` and no key is a dotted weight name).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fvis.errors import BadFileError, ModelInputError

BATCH_ENCODING = "transformers.tokenization_utils_base.BatchEncoding"
ENCODING = "tokenizers.Encoding"
_MAX_KEYS = 32  # more named tensors than any tokenizer writes: a checkpoint


@dataclass(frozen=True)
class KeywordBatch:
    """Keyword inputs read from one file, with the tokens of each sample when it had them."""

    tensors: dict[str, torch.Tensor]
    tokens: tuple[tuple[str, ...], ...]
    what: str  # "BatchEncoding", "dict of tensors", "safetensors"

    def describe(self, path: Path) -> str:
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in self.tensors.items())
        return f"{path.name} ({self.what}): {shapes}"


class _BatchEncodingStandIn:
    """Takes the place of ``BatchEncoding`` in the weights-only unpickler: keeps its state."""

    state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _EncodingStandIn:
    """Takes the place of ``tokenizers.Encoding``: its state is the encoding as JSON."""

    state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def tokens(self) -> tuple[str, ...]:
        try:
            text = self.state.decode() if isinstance(self.state, bytes) else str(self.state)
            found = json.loads(text).get("tokens", [])
        except (ValueError, AttributeError, UnicodeDecodeError):
            return ()
        return tuple(str(t) for t in found) if isinstance(found, list) else ()


def is_batch_encoding(obj: Any) -> bool:
    """Whether an inert read's top object is a pickled ``BatchEncoding``."""
    return getattr(obj, "qualname", None) == BATCH_ENCODING


def stand_in_globals(seen: tuple[str, ...]) -> tuple[str, ...]:
    """The globals of ``seen`` that the stand-ins answer for (never trusted otherwise)."""
    return tuple(g for g in seen if g in (BATCH_ENCODING, ENCODING))


def read_keyword_batch(path: Path, model: nn.Module) -> KeywordBatch | None:
    """The file as keyword inputs when it is a tokenizer batch or a dict of inputs for
    ``model``; None for anything else (a single tensor, an image, a checkpoint), which the
    ordinary input readers then take or refuse."""
    from fvis import inert
    from fvis.formats import FileKind, _looks_like_safetensors, sniff
    from fvis.loading import read_inert, screen, untrusted_globals

    try:
        with path.open("rb") as fh:
            head = fh.read(16)
        size = path.stat().st_size
    except OSError:
        return None  # the ordinary readers say what is wrong with the file
    if _looks_like_safetensors(head, size):
        return _safetensors_batch(path, model)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        return None
    sniffed = sniff(path)
    if sniffed.kind not in (FileKind.TORCH_ZIP, FileKind.LEGACY_PICKLE):
        return None
    peek = read_inert(sniffed)
    screen(path, peek.globals_seen, trusted=False, kind=sniffed.kind.value)  # inputs: never
    obj = peek.obj
    if is_batch_encoding(obj):
        known = set(stand_in_globals(peek.globals_seen))
        blocked = [g for g in untrusted_globals(peek.globals_seen) if g not in known]
        if blocked:
            from fvis.errors import RefusedError

            raise RefusedError(
                f"{path} names globals a tokenizer batch never needs: {', '.join(blocked[:5])}",
                hint="save the batch's tensors: torch.save(dict(batch))",
            )
        return load_pickled_batch(path, model)
    tensors = inert.fake_tensors(obj)
    if tensors and len(tensors) == len(obj) > 1 and looks_like_inputs(list(obj), model):
        if untrusted_globals(peek.globals_seen):
            return None  # the tensor reader refuses it, naming the globals
        return load_pickled_batch(path, model)
    return None


def _safetensors_batch(path: Path, model: nn.Module) -> KeywordBatch | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            if len(keys) < 2 or not looks_like_inputs(keys, model):
                return None
            tensors = {k: handle.get_tensor(k) for k in keys}
    except Exception:
        return None  # the ordinary reader says the file is damaged
    return _checked(path, model, tensors, (), "safetensors")


def load_pickled_batch(path: Path, model: nn.Module) -> KeywordBatch:
    """A ``torch.save``'d BatchEncoding or dict of tensors, weights-only, as keyword inputs."""
    stand_ins = [(_BatchEncodingStandIn, BATCH_ENCODING), (_EncodingStandIn, ENCODING)]
    try:
        with torch.serialization.safe_globals(stand_ins), path.open("rb") as fh:
            obj = torch.load(fh, weights_only=True, map_location="cpu")
    except Exception as exc:  # torch's text would suggest weights_only=False: do not relay it
        raise BadFileError(
            f"{path} could not be read as a tokenizer batch ({type(exc).__name__})"
        ) from None
    if isinstance(obj, _BatchEncodingStandIn):
        state = obj.state if isinstance(obj.state, dict) else {}
        data, encodings = state.get("data", {}), state.get("encodings") or ()
        tokens = tuple(e.tokens() for e in encodings if isinstance(e, _EncodingStandIn))
        return _checked(path, model, data, tokens, "BatchEncoding")
    return _checked(path, model, obj, (), "dict of tensors")


def looks_like_inputs(keys: list[str], model: nn.Module) -> bool:
    """Whether a dict with these keys is a batch for ``model`` rather than a state dict."""
    if not keys or len(keys) > _MAX_KEYS or any("." in k for k in keys):
        return False
    names, takes_kwargs = forward_parameters(model)
    return takes_kwargs or any(k in names for k in keys)


def forward_parameters(model: nn.Module) -> tuple[tuple[str, ...], bool]:
    """The names ``model.forward`` takes by keyword, and whether it takes ``**kwargs``."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return (), True  # unknown: let the forward say
    named = tuple(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return named, any(p.kind is p.VAR_KEYWORD for p in params)


def _checked(
    path: Path, model: nn.Module, data: Any, tokens: tuple[tuple[str, ...], ...], what: str
) -> KeywordBatch:
    if not isinstance(data, dict) or not data:
        raise BadFileError(f"{path} holds no tensors to pass as inputs")
    tensors = {str(k): v for k, v in data.items() if isinstance(v, torch.Tensor)}
    others = [str(k) for k in data if str(k) not in tensors]
    if others:
        raise BadFileError(
            f"{path}: every entry of an input batch must be a tensor; {others[0]!r} is not",
            hint="save the tokenizer's output with return_tensors='pt'",
        )
    names, takes_kwargs = forward_parameters(model)
    unknown = [k for k in tensors if k not in names]
    if unknown and not takes_kwargs:
        raise ModelInputError(
            f"{path} holds {', '.join(unknown)}, which {type(model).__name__}.forward does not "
            f"take (it takes {', '.join(names) or 'no named inputs'})",
            hint="save only the inputs the model takes, or pass each with --input NAME=FILE",
        )
    sizes = {int(t.shape[0]) for t in tensors.values() if t.dim()}
    if len(sizes) > 1:
        raise ModelInputError(
            f"{path}: the inputs disagree on the batch size ({', '.join(map(str, sorted(sizes)))})"
        )
    return KeywordBatch(tensors, tokens, what)
