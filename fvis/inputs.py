"""Model inputs: image files, tensor files, a seeded random shape, or one synthesized from the
model's first layer. Every input says in words what was done to it (``Prepared.description``).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fvis.errors import BadFileError, ModelInputError, UsageError

IMAGENET_MEAN: tuple[float, ...] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, ...] = (0.229, 0.224, 0.225)
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
# A cap on decoded pixels, checked from the header before decoding (Pillow's own bomb limit
# stays on as well): a 186 KB 8000x8000 PNG would otherwise take ~3 GB as float RGB and its
# conversions. --max-input-pixels raises it.
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_SHAPE_ELEMENTS = 1 << 30  # 4 GiB of float32: a typo such as 1,3,2240,2240,3 is caught


@dataclass(frozen=True)
class InputOptions:
    """Mirrors the CLI's input options."""

    sources: tuple[str, ...] = ()  # files, folders, or name=FILE for keyword inputs
    shape: tuple[int, ...] | None = None
    seed: int = 0
    size: tuple[int, int] | None = None
    norm: str = "auto"  # auto | imagenet | none | "m1,m2,m3/s1,s2,s3" or "MEAN,STD"
    channels: int | None = None
    max_pixels: int = MAX_IMAGE_PIXELS  # per image file (--max-input-pixels)
    texts: tuple[str, ...] = ()  # --text / --text-file, tokenized by fvis.prompts
    tokenizer: Path | None = None  # --tokenizer: where the tokenizer is (default: the model's)


@dataclass(frozen=True)
class Prepared:
    """Ready-to-call inputs: positional ``args`` and keyword ``kwargs``."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    labels: tuple[str, ...] = ()  # one per sample of the batch (file names)
    # Each sample's image as the model saw it (HxWxC uint8), None for non-image inputs.
    displays: tuple[np.ndarray | None, ...] = field(default=(), repr=False)
    # Each sample's tokens (from --text or a saved BatchEncoding), for the pictures' labels.
    tokens: tuple[tuple[str, ...], ...] = ()

    @property
    def display(self) -> np.ndarray | None:
        """The first image, shown in the report as "the input"."""
        return next((d for d in self.displays if d is not None), None)

    @property
    def batch_size(self) -> int:
        first = next(iter([*self.args, *self.kwargs.values()]), None)
        return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` or ``"1x3x224x224"`` -> ``(1, 3, 224, 224)``."""
    parts = [p for p in re.split(r"[,x\s]+", text.strip()) if p]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts) or len(parts) > 6:
        raise UsageError(f"--shape {text!r} must be positive integers such as 1,3,224,224")
    shape = tuple(int(p) for p in parts)
    if math.prod(shape) > MAX_SHAPE_ELEMENTS:
        raise UsageError(
            f"--shape {text!r} has {math.prod(shape):,} elements, more than fvis "
            f"synthesizes ({MAX_SHAPE_ELEMENTS:,})"
        )
    return shape


def parse_size(text: str) -> tuple[int, int]:
    """``"224x224"`` or ``"224"`` -> ``(224, 224)``."""
    parts = [p for p in re.split(r"[x,]", text.strip()) if p]
    if len(parts) not in (1, 2) or not all(p.isdigit() and 0 < int(p) <= 8192 for p in parts):
        raise UsageError(f"--size {text!r} must look like 224x224 (1 to 8192)")
    return (int(parts[0]), int(parts[-1]))


def prepare(
    model: nn.Module, options: InputOptions, examples: Sequence[tuple[tuple[int, ...], str]] = ()
) -> Prepared:
    """Build the inputs for one forward pass of ``model``.

    >>> prepare(model, InputOptions(shape=(1, 10))).description        # doctest: +SKIP
    'random normal (1, 10), seed 0'
    """
    if options.sources and options.shape:
        raise UsageError("give either --input or --shape, not both")
    if options.shape:
        if isinstance(first_layer(model), nn.Embedding):  # an embedding takes integer ids
            return _random_ids(model, options.shape, options.seed)
        return _random(options.shape, options.seed, "random normal")
    if not options.sources and examples:
        return _from_examples(examples, options.seed)
    if not options.sources:
        shape, dtype_note = synth_shape(model)
        check_synthesized(shape, "the model's first layer")
        prepared = _random(shape, options.seed, f"synthesized from the first layer{dtype_note}:")
        if dtype_note:  # embeddings take integer ids
            ids = torch.randint(0, _vocab(model), shape, generator=_gen(options.seed))
            prepared = Prepared((ids,), description=prepared.description, labels=prepared.labels)
        return with_decoder_start(model, prepared)
    keyword = [s for s in options.sources if _is_keyword(s)]
    positional = [s for s in options.sources if not _is_keyword(s)]
    channels = options.channels or expected_channels(model)
    args: tuple[Any, ...] = ()
    notes: list[str] = []
    labels: tuple[str, ...] = ()
    displays: tuple[np.ndarray | None, ...] = ()
    kwargs: dict[str, Any] = {}
    batch = _keyword_batch(positional, model)
    tokens: tuple[tuple[str, ...], ...] = ()
    if batch is not None:
        kwargs, tokens = dict(batch.tensors), batch.tokens
        notes = [batch.describe(Path(positional[0]))]
    elif positional:
        tensor, note, labels, displays = _load_batch(positional, options, channels)
        args, notes = (tensor,), [note]
    for item in keyword:
        name, _, file_name = item.partition("=")
        tensor, note, _, _ = _load_batch([file_name], options, channels)
        kwargs[name] = tensor
        notes.append(f"{name}={note}")
    args, kwargs, cast = _match_dtype(model, args, kwargs)
    prepared = Prepared(args, kwargs, "; ".join([*notes, *cast]), labels, displays, tokens)
    check_token_ids(model, prepared)
    return with_decoder_start(model, prepared)


def _keyword_batch(positional: Sequence[str], model: nn.Module) -> Any:
    """One file holding a tokenizer batch or a dict of the model's inputs, else None."""
    if len(positional) != 1 or not Path(positional[0]).is_file():
        return None
    from fvis.token_batches import read_keyword_batch

    return read_keyword_batch(Path(positional[0]), model)


def first_embedding(model: nn.Module) -> tuple[str, nn.Embedding] | None:
    """The first ``nn.Embedding`` in registration order and its name (the token embedding of
    a language model)."""
    return next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)), None)


def check_token_ids(model: nn.Module, prepared: Prepared) -> None:
    """Token ids outside the first embedding's vocabulary are named before the forward (the
    model would fail deep inside with an index error).

    >>> check_token_ids(gpt2, Prepared((torch.tensor([[50256]]),)))     # doctest: +SKIP
    ModelInputError: input id 50256 >= vocab 1000 of transformer.wte
    """
    found = first_embedding(model)
    ids = prepared.kwargs.get("input_ids")
    if ids is None and len(prepared.args) == 1 and not prepared.kwargs:
        ids = prepared.args[0]
    if found is None or not isinstance(ids, torch.Tensor) or ids.is_floating_point():
        return
    if ids.dtype == torch.bool or not ids.numel():
        return
    name, embedding = found
    low, high = int(ids.min()), int(ids.max())
    if high >= embedding.num_embeddings or low < 0:
        bad = high if high >= embedding.num_embeddings else low
        raise ModelInputError(
            f"input id {bad} is outside the vocabulary [0, {embedding.num_embeddings}) of "
            f"{name or 'the model'} ({type(embedding).__name__})",
            hint="the ids come from another tokenizer or model; use this model's tokenizer",
        )


_DECODER_KEYS = ("decoder_input_ids", "decoder_inputs_embeds", "labels")


def with_decoder_start(model: nn.Module, prepared: Prepared) -> Prepared:
    """An encoder-decoder model (T5, BART) given only encoder ids gets ``decoder_input_ids``:
    its config's decoder start token, one per sample; the description says so."""
    config = getattr(model, "config", None)
    start = getattr(config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(config, "pad_token_id", None)
    if (
        not getattr(config, "is_encoder_decoder", False)
        or not isinstance(start, int)
        or any(key in prepared.kwargs for key in _DECODER_KEYS)
    ):
        return prepared
    ids = torch.full((prepared.batch_size, 1), start, dtype=torch.long)
    note = f"decoder_input_ids synthesized: the decoder start token {start}, one per sample"
    # Keyword form throughout: the positional inputs take the names of forward's parameters.
    names = list(inspect.signature(model.forward).parameters)
    named = dict(zip(names, prepared.args, strict=False))
    return dataclasses.replace(
        prepared,
        args=(),
        kwargs={**named, **prepared.kwargs, "decoder_input_ids": ids},
        description="; ".join(filter(None, [prepared.description, note])),
    )


def _match_dtype(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any], list[str]]:
    """Floating inputs take the dtype of the model's parameters (NumPy saves float64)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    notes: list[str] = []

    def cast(value: Any) -> Any:
        if (
            isinstance(value, torch.Tensor)
            and value.is_floating_point()
            and dtype is not None
            and value.dtype != dtype
        ):
            notes.append(
                f"{str(value.dtype).removeprefix('torch.')} cast to "
                f"{str(dtype).removeprefix('torch.')} to match the model"
            )
            return value.to(dtype)
        return value

    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}, notes


def _is_keyword(source: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z_]\w*=.+", source)) and not Path(source).exists()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random(shape: tuple[int, ...], seed: int, what: str) -> Prepared:
    tensor = torch.randn(shape, generator=_gen(seed))
    return Prepared((tensor,), description=f"{what} {shape}, seed {seed}")


def _random_ids(model: nn.Module, shape: tuple[int, ...], seed: int) -> Prepared:
    vocab = _vocab(model)
    ids = torch.randint(0, vocab, shape, generator=_gen(seed))
    what = (
        f"random token ids in [0, {vocab}) {shape}, seed {seed} (the first layer is an embedding)"
    )
    return with_decoder_start(model, Prepared((ids,), description=what))


def _from_examples(examples: Sequence[tuple[tuple[int, ...], str]], seed: int) -> Prepared:
    """Random inputs shaped like a torch.export program's example inputs (it is traced for
    exactly those shapes); integer inputs become zeros."""
    for shape, _dtype in examples:
        check_synthesized(shape, "the program's example inputs")
    generator = _gen(seed)
    tensors = tuple(
        torch.randn(shape, generator=generator)
        if dtype.startswith(("float", "bfloat"))
        else torch.zeros(shape, dtype=getattr(torch, dtype, torch.int64))
        for shape, dtype in examples
    )
    shapes = ", ".join(str(shape) for shape, _ in examples)
    return Prepared(
        tensors, description=f"synthesized from the program's example inputs: {shapes}, seed {seed}"
    )


def check_synthesized(shape: tuple[int, ...], source: str) -> None:
    """The ``--shape`` element cap, for a shape fvis made up itself (exit 5 with a hint)."""
    elements = math.prod(shape)
    if elements > MAX_SHAPE_ELEMENTS:
        raise ModelInputError(
            f"the input synthesized from {source} would be {shape} = {elements:,} elements, "
            f"more than fvis synthesizes ({MAX_SHAPE_ELEMENTS:,})",
            hint="give a smaller input with --shape or a file with --input",
        )


def first_layer(model: nn.Module) -> nn.Module | None:
    """The first convolution, linear, embedding or norm layer in registration order."""
    kinds = (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding, nn.LayerNorm)
    return next((m for m in model.modules() if isinstance(m, kinds)), None)


def expected_channels(model: nn.Module) -> int | None:
    layer = first_layer(model)
    if isinstance(layer, nn.modules.conv._ConvNd):
        return int(layer.in_channels)
    return None


def synth_shape(model: nn.Module) -> tuple[tuple[int, ...], str]:
    """An input shape the first layer accepts: (1, C, 224, 224) for Conv2d, (1, F) for Linear."""
    layer = first_layer(model)
    if isinstance(layer, nn.modules.conv._ConvNd):
        spatial = {1: (256,), 2: (224, 224), 3: (16, 112, 112)}[len(layer.kernel_size)]
        size = _configured_image_size(model)
        if size is not None and len(spatial) == 2:
            return (1, int(layer.in_channels), *size), " (image size from the model's config)"
        return (1, int(layer.in_channels), *spatial), ""
    if isinstance(layer, nn.Linear):
        return (1, int(layer.in_features)), ""
    if isinstance(layer, nn.Embedding):
        return (1, 16), " (token ids)"
    if isinstance(layer, nn.LayerNorm):
        return (1, 16, *layer.normalized_shape), ""
    raise UsageError(
        "cannot guess an input for this model (no conv, linear or embedding layer)",
        hint="give --input FILE or --shape 1,3,224,224",
    )


def _configured_image_size(model: nn.Module) -> tuple[int, int] | None:
    """``config.image_size`` of a Hugging Face vision model (ViT needs exactly that size)."""
    size = getattr(getattr(model, "config", None), "image_size", None)
    if isinstance(size, int) and not isinstance(size, bool) and 0 < size <= 4096:
        return size, size
    if (
        isinstance(size, (list, tuple))
        and len(size) == 2
        and all(isinstance(d, int) and 0 < d <= 4096 for d in size)
    ):
        return int(size[0]), int(size[1])
    return None


def _vocab(model: nn.Module) -> int:
    layer = first_layer(model)
    return int(layer.num_embeddings) if isinstance(layer, nn.Embedding) else 2


def _expand(sources: Sequence[str]) -> list[Path]:
    paths: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            if not found:
                raise UsageError(f"--input {path}: the folder is empty")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        elif path.exists():
            raise BadFileError(f"--input {path} is not a regular file")
        else:
            raise UsageError(f"--input {path}: no such file")
    return paths


def _load_batch(
    sources: Sequence[str], options: InputOptions, channels: int | None
) -> tuple[torch.Tensor, str, tuple[str, ...], tuple[np.ndarray | None, ...]]:
    paths = _expand(sources)
    tensors, notes, displays = [], [], []
    for path in paths:
        tensor, note, image = load_input_file(path, options, channels)
        tensors.append(tensor)
        notes.append(note)
        displays.append(image)
    if len(tensors) == 1:
        return tensors[0], notes[0], (paths[0].name,), tuple(displays)
    shapes = {tuple(t.shape[1:]) for t in tensors}
    if len(shapes) > 1:
        raise ModelInputError(
            f"inputs differ in shape ({_fmt_shapes(shapes)}); they cannot share one batch",
            hint="give --size HxW for images",
        )
    batch = torch.cat(tensors)
    return (
        batch,
        f"{len(paths)} files batched {tuple(batch.shape)}: {notes[0]}",
        tuple(p.name for p in paths),
        tuple(displays),
    )


def _fmt_shapes(shapes: set[tuple[int, ...]]) -> str:
    return ", ".join(str(s) for s in sorted(shapes)[:3])


def load_input_file(
    path: Path, options: InputOptions, channels: int | None
) -> tuple[torch.Tensor, str, np.ndarray | None]:
    """One file -> a batched tensor (leading dim 1 for images), a note, and the display image."""
    from fvis.formats import _looks_like_safetensors

    try:
        with path.open("rb") as fh:
            head = fh.read(16)
        size = path.stat().st_size
    except OSError as exc:
        raise BadFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not head:
        raise BadFileError(f"{path} is empty (0 bytes)")
    if head.startswith(b"\x93NUMPY"):
        return _load_npy(path), f"{path.name} (npy)", None
    # safetensors first: its header length's low byte can be 0x80, like a pickle's first byte
    if _looks_like_safetensors(head, size):
        return _load_safetensors_tensor(path), f"{path.name} (safetensors)", None
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return _load_torch_tensor(path), f"{path.name} (torch tensor)", None
    return _load_image(path, options, channels)


def _model_as_input(path: Path, what: str) -> ModelInputError:
    return ModelInputError(
        f"{path} is a model checkpoint ({what}), not an input",
        hint="the model comes first: fvis dump MODEL --input INPUT",
    )


def _load_npy(path: Path) -> torch.Tensor:
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise BadFileError(
            f"{path}: {exc}", hint="object arrays need pickles; save a numeric array"
        ) from None
    except Exception as exc:
        raise BadFileError(f"{path} is a damaged .npy file ({exc})") from None
    if array.dtype.kind not in "fiub":
        raise BadFileError(f"{path} holds {array.dtype} values, not numbers")
    return torch.from_numpy(np.ascontiguousarray(array))


def _load_torch_tensor(path: Path) -> torch.Tensor:
    """A file written by ``torch.save(tensor)`` (or a one-entry dict of one). It is read with
    stand-ins first: a checkpoint gets the swapped-arguments hint, and a file naming any
    global a tensor does not need is refused before torch sees it."""
    from fvis import inert
    from fvis.errors import RefusedError
    from fvis.formats import FileKind, sniff
    from fvis.loading import read_inert, screen, untrusted_globals

    sniffed = sniff(path)
    if sniffed.kind in (FileKind.TORCHSCRIPT, FileKind.EXPORT_PROGRAM):
        raise _model_as_input(path, sniffed.kind.value)
    peek = read_inert(sniffed)
    screen(path, peek.globals_seen, trusted=False, kind=sniffed.kind.value)  # inputs: never
    obj = peek.obj
    if inert.is_module_stub(obj):
        raise _model_as_input(path, "a pickled module")
    blocked = untrusted_globals(peek.globals_seen)
    if blocked:
        raise RefusedError(
            f"{path} names globals a tensor file never needs: {', '.join(blocked[:5])}",
            hint="an input file must hold plain tensors (torch.save(tensor))",
        )
    tensors = inert.fake_tensors(obj) if isinstance(obj, dict) else None
    if not isinstance(obj, inert.FakeTensor) and not (tensors and len(tensors) == len(obj) == 1):
        what = f"{len(tensors)} tensors" if tensors else f"a {type(obj).__name__}"
        kind = "a state dict of " if tensors and len(tensors) >= len(obj) / 2 else "a dict of "
        raise _model_as_input(path, kind + what if isinstance(obj, dict) else what)
    try:
        with path.open("rb") as fh:  # a file object: torch picks readers by extension otherwise
            value = torch.load(fh, weights_only=True, map_location="cpu")
    except Exception as exc:  # torch's text would suggest weights_only=False: do not relay it
        raise BadFileError(
            f"{path} could not be read as a tensor file ({type(exc).__name__})"
        ) from None
    return value if isinstance(value, torch.Tensor) else next(iter(value.values()))


def _load_safetensors_tensor(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise BadFileError(f"{path} is a damaged safetensors file: {exc}") from None
    if len(tensors) != 1:
        raise _model_as_input(path, f"safetensors with {len(tensors)} tensors")
    return next(iter(tensors.values()))


def _load_image(
    path: Path, options: InputOptions, channels: int | None
) -> tuple[torch.Tensor, str, np.ndarray]:
    from fvis.images import read_image

    array, notes = read_image(path, channels, options.size, options.max_pixels)
    tensor = torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()
    tensor, norm_note = _normalise(tensor, options.norm)
    display = (array * 255).round().clip(0, 255).astype(np.uint8)
    return tensor, f"{path.name} ({'; '.join([*notes, norm_note])})", display


def _normalise(tensor: torch.Tensor, norm: str) -> tuple[torch.Tensor, str]:
    channels = tensor.shape[1]
    if norm == "none":
        return tensor, "scaled to [0, 1]"
    if norm in ("auto", "imagenet"):
        if channels != 3:
            if norm == "imagenet":
                raise UsageError(f"--norm imagenet needs 3 channels; the input has {channels}")
            return tensor, "scaled to [0, 1]"
        mean, std = tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)
        label = "ImageNet mean/std"
    else:
        mean, std = _parse_norm(norm, channels)
        label = f"mean {mean}, std {std}"
    m = torch.tensor(mean, dtype=tensor.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=tensor.dtype).view(1, -1, 1, 1)
    return (tensor - m) / s, f"scaled to [0, 1], normalised with {label}"


def _parse_norm(norm: str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    try:
        if "/" in norm:
            mean_s, std_s = norm.split("/", 1)
            mean = tuple(float(v) for v in mean_s.split(","))
            std = tuple(float(v) for v in std_s.split(","))
        else:
            m, s = (float(v) for v in norm.split(","))
            mean, std = (m,) * channels, (s,) * channels
    except ValueError:
        raise UsageError(
            f"--norm {norm!r} must be imagenet, none, MEAN,STD or M1,M2,M3/S1,S2,S3"
        ) from None
    if len(mean) != channels or len(std) != channels or any(v <= 0 for v in std):
        raise UsageError(f"--norm {norm!r} needs {channels} means and positive stds")
    return mean, std
