"""Hugging Face ``save_pretrained`` folders: plain, sharded and tied, listed and loaded safely.

A folder is recognised by its files (``config.json`` and ``model.safetensors``, a
``model.safetensors.index.json`` with its shards, or the ``pytorch_model.bin`` equivalents).

- ``inspect_folder`` lists it without reading tensor data: with ``transformers`` installed the
  model is built on the meta device from ``config.json``; without it the tree comes from the
  safetensors headers (parameter-free modules are then invisible, and the note says so).
- ``load_folder`` builds and loads it through ``transformers``' own ``from_pretrained``, so
  tied weights, sharding and renamed on-disk keys are handled as the library does. Remote code
  (``auto_map`` in ``config.json``) runs only with ``--trust``; pickled ``.bin`` weights are read
  with ``weights_only=True`` unless trusted.

``transformers`` is an optional dependency: ``pip install fvis[hf]``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import pickle
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fvis.errors import BadFileError, ModelInputError, RefusedError, UsageError, first_line
from fvis.formats import safetensors_metas
from fvis.layers import TensorMeta

if TYPE_CHECKING:
    from torch import nn

CONFIG = "config.json"
# (single file, index) per weight format, in the order from_pretrained prefers them
_WEIGHT_NAMES = (
    ("safetensors", "model.safetensors", "model.safetensors.index.json"),
    ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json"),
)
_SHARD_RE = re.compile(r"-\d{5}-of-\d{5}\.(safetensors|bin)$")
_EXTRA_HINT = "install the Hugging Face extra: pip install 'fvis[hf]'"


@dataclass(frozen=True)
class HFFolder:
    """A ``save_pretrained`` folder: its config (or ``None``) and its weight files."""

    path: Path
    config: Mapping[str, Any] | None
    weight_format: str  # "safetensors" or "bin"
    weights: tuple[Path, ...]  # every shard, in index order
    index: Path | None = None

    @property
    def architecture(self) -> str | None:
        names = (self.config or {}).get("architectures") or []
        return str(names[0]) if names and isinstance(names, list) else None

    @property
    def remote_code(self) -> bool:
        """``config.json`` asks for classes from code in the folder (``trust_remote_code``)."""
        return bool((self.config or {}).get("auto_map"))

    def describe(self) -> str:
        shards = f"{len(self.weights)} shards" if self.index else self.weights[0].name
        arch = self.architecture or (self.config or {}).get("model_type") or "no config.json"
        return f"Hugging Face folder ({arch}, {self.weight_format}: {shards})"


def is_folder(path: Path) -> bool:
    """True for a folder holding a config or any weight file ``from_pretrained`` reads."""
    if not path.is_dir():
        return False
    names = [CONFIG, *(name for _, single, index in _WEIGHT_NAMES for name in (single, index))]
    return any((path / name).is_file() for name in names)


def shard_folder(path: Path) -> Path | None:
    """The folder a shard file (``model-00001-of-00003.safetensors``) or index belongs to."""
    if path.name.endswith(".index.json") or _SHARD_RE.search(path.name):
        return path.parent if is_folder(path.parent) else None
    return None


def read_folder(path: Path) -> HFFolder:
    """The folder's config and weight files, checked for presence; reads no tensor data.

    >>> read_folder(Path("gpt2-tiny")).weights          # doctest: +SKIP
    (PosixPath('gpt2-tiny/model.safetensors'),)
    """
    config = _read_json(path / CONFIG) if (path / CONFIG).is_file() else None
    for weight_format, single, index in _WEIGHT_NAMES:
        if (path / index).is_file():
            shards = _shards_of(path / index)
            return HFFolder(path, config, weight_format, shards, path / index)
        if (path / single).is_file():
            return HFFolder(path, config, weight_format, (path / single,))
    raise BadFileError(
        f"{path} is a Hugging Face folder without weights (no model.safetensors, "
        "model.safetensors.index.json or pytorch_model.bin)",
        hint="save the model with save_pretrained(), or pass the weight file itself",
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadFileError(f"{path} is not valid JSON: {first_line(exc)}") from None
    if not isinstance(data, dict):
        raise BadFileError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def _shards_of(index: Path) -> tuple[Path, ...]:
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise BadFileError(f"{index} has no valid 'weight_map' of tensor name -> shard file")
    shards = []
    for name in dict.fromkeys(weight_map.values()):
        shard = index.parent / name
        if Path(name).name != name or not shard.is_file():
            raise BadFileError(f"{index} names shard {name!r}, which is not in {index.parent}")
        shards.append(shard)
    return tuple(shards)


# --------------------------------------------------------------------------- transformers


def have_transformers() -> bool:
    return importlib.util.find_spec("transformers") is not None


def _require_transformers(folder: HFFolder) -> Any:
    if not have_transformers():
        raise UsageError(
            f"{folder.path} is a Hugging Face folder; loading it needs transformers",
            hint=_EXTRA_HINT,
        )
    import transformers

    return transformers


def _model_class(folder: HFFolder, transformers: Any) -> Any:
    if folder.config is None:
        raise BadFileError(
            f"{folder.path} has weights but no config.json, so the architecture is unknown",
            hint="pass --arch with a builder for the model, or add its config.json",
        )
    name = folder.architecture
    if name is None:
        return transformers.AutoModel
    cls = getattr(transformers, name, None) if name.isidentifier() else None
    if cls is None and not folder.remote_code:
        raise BadFileError(
            f"{folder.path}/config.json names architecture {name!r}, which transformers "
            f"{transformers.__version__} does not define",
            hint="upgrade transformers, or pass --arch with a builder for the model",
        )
    return cls or transformers.AutoModel


def _refuse_remote_code(folder: HFFolder, trusted: bool) -> None:
    if folder.remote_code and not trusted:
        raise RefusedError(
            f"{folder.path}/config.json asks for custom model code from the folder (auto_map)",
            hint="pass --trust only if you trust the folder's Python files",
        )


@contextlib.contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """No progress bars or warnings from transformers: fvis reports what matters itself."""
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def build_on_meta(folder: HFFolder, trusted: bool = False) -> nn.Module:
    """The folder's architecture from ``config.json`` on the meta device (no tensor data)."""
    import torch

    transformers = _require_transformers(folder)
    _refuse_remote_code(folder, trusted)
    cls = _model_class(folder, transformers)
    with _quiet(transformers):
        try:
            config = transformers.AutoConfig.from_pretrained(
                folder.path, local_files_only=True, trust_remote_code=trusted
            )
            with torch.device("meta"):
                if cls is transformers.AutoModel:
                    return cls.from_config(config, trust_remote_code=trusted)
                return cls(config)
        except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
            raise BadFileError(
                f"{folder.path}: cannot build the model: {first_line(exc)}"
            ) from None


def load_folder(
    folder: HFFolder, trusted: bool = False, strict: bool = True, big: Any = None
) -> tuple[nn.Module, list[str]]:
    """The folder's model with its weights, through ``from_pretrained`` (offline, safely)."""
    transformers = _require_transformers(folder)
    _refuse_remote_code(folder, trusted)
    cls = _model_class(folder, transformers)
    extra: dict[str, Any] = {}
    if big is not None:  # accelerate's big-model loading: never all in memory
        from fvis.big import pretrained_kwargs

        extra = pretrained_kwargs(big)
    with _quiet(transformers):
        try:
            model, info = cls.from_pretrained(
                folder.path,
                local_files_only=True,
                trust_remote_code=trusted,
                use_safetensors=folder.weight_format == "safetensors",
                weights_only=not trusted,
                output_loading_info=True,
                **extra,
            )
        except (OSError, ValueError, TypeError, KeyError, RuntimeError, pickle.PickleError) as exc:
            raise _load_error(folder, exc) from None
    notes = [folder.describe(), *_fit_notes(folder, info, strict)]
    device_map = getattr(model, "hf_device_map", None)
    if big is not None and isinstance(device_map, dict):
        from fvis.big import describe

        notes.append(describe(device_map, Path(extra["offload_folder"])))
    return model, notes


def _load_error(folder: HFFolder, exc: Exception) -> Exception:
    text = first_line(exc)
    if "weights_only" in text or "Unsupported global" in text:
        return RefusedError(
            f"{folder.path}: the pickled weights need globals the safe loader refuses",
            hint="convert them to safetensors, or pass --trust if you trust the files",
        )
    return BadFileError(f"{folder.path}: transformers could not load it: {text}")


def _fit_notes(folder: HFFolder, info: Mapping[str, Any], strict: bool) -> list[str]:
    """Missing, unexpected and mismatched keys as from_pretrained reports them (tied weights
    and the model's own ignore lists are already accounted for there)."""
    problems = [
        f"{len(keys)} {label}: {', '.join(sorted(map(str, keys))[:3])}"
        for label, keys in (
            ("missing keys (randomly initialised)", info.get("missing_keys") or ()),
            ("unexpected keys (ignored)", info.get("unexpected_keys") or ()),
            ("shape mismatches (randomly initialised)", info.get("mismatched_keys") or ()),
        )
        if keys
    ]
    if problems and strict:
        raise ModelInputError(
            f"{folder.path} does not fit its config: " + "; ".join(problems),
            hint="pass --no-strict to load what fits and see the rest as warnings",
        )
    return [f"warning: {p}" for p in problems]


def header_metas(folder: HFFolder) -> dict[str, TensorMeta]:
    """Every tensor's name, shape and dtype from the shards' safetensors headers (no data)."""
    metas: dict[str, TensorMeta] = {}
    for shard in _safetensors_shards(folder, "listing them needs transformers"):
        metas.update(safetensors_metas(shard))
    return metas


def read_shards(folder: HFFolder) -> dict[str, Any]:
    """Every tensor of a safetensors folder, merged across shards (for ``--arch``)."""
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for shard in _safetensors_shards(folder, "with --arch pass the .bin file itself"):
        try:
            state.update(load_file(str(shard)))
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise BadFileError(
                f"{shard} is a damaged safetensors file: {first_line(exc)}"
            ) from None
    return state


def _safetensors_shards(folder: HFFolder, otherwise: str) -> tuple[Path, ...]:
    if folder.weight_format != "safetensors":
        raise UsageError(
            f"{folder.path} holds pickled pytorch_model.bin weights; {otherwise}",
            hint=_EXTRA_HINT,
        )
    return folder.weights
