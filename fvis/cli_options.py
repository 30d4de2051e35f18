"""The CLI's shared options (typer ``Annotated`` aliases) and the builders that turn them
into the API's option records (``LoadOptions``, ``InputOptions``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from fvis.choices import Mode, What
from fvis.cli_boundary import say_note
from fvis.errors import UsageError

ModelArg = Annotated[
    Path | None,
    typer.Argument(
        help="Checkpoint file. Default: [tool.fvis] model in ./pyproject.toml, "
        "else the bundled sample.",
        show_default=False,
        readable=False,  # fvis reports unreadable files itself, in one line (exit 3)
        metavar="MODEL",
    ),
]
ArchOpt = Annotated[
    str | None,
    typer.Option(
        "--arch",
        help="Architecture for a state dict: 'pkg.module:callable' or 'path/file.py:callable'.",
        show_default=False,
    ),
]
ArchKwargsOpt = Annotated[
    str | None,
    typer.Option(
        "--arch-kwargs",
        help="JSON keyword arguments for --arch, e.g. '{\"num_classes\": 10}'.",
        show_default=False,
    ),
]
AllowModuleOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--allow-module",
        metavar="MODULE",
        help="Allow classes from this module when loading a pickled "
        "model (your code, your decision). Repeatable.",
        show_default=False,
    ),
]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust",
        help="Run code from the checkpoint (full unpickling): only for files you trust.",
    ),
]
TrustShaOpt = Annotated[
    str | None,
    typer.Option(
        "--trust-sha256",
        metavar="HEX",
        help="Trust only the file with this SHA-256 (implies --trust); any other content is "
        "refused.",
        show_default=False,
    ),
]
StrictOpt = Annotated[
    bool,
    typer.Option(
        "--strict/--no-strict",
        help="Fail when the weights do not fit the architecture (default); --no-strict loads "
        "what fits and lists missing and unexpected keys as warnings.",
    ),
]
MaxBytesOpt = Annotated[
    int | None,
    typer.Option(
        "--max-model-bytes",
        help="Refuse zip checkpoints that declare more content than this many bytes, and "
        "pickles whose constructor calls would allocate more (default for those: twice the "
        "file size plus 64 MiB).",
        show_default=False,
    ),
]
AttnOpt = Annotated[
    str | None,
    typer.Option(
        "--attn-implementation",
        metavar="KERNEL",
        help="A transformers model's attention kernel: eager computes the attention "
        "probabilities (sdpa and flash attention never form them), e.g. eager.",
        show_default=False,
    ),
]
DeviceOpt = Annotated[
    str | None,
    typer.Option(
        "--device",
        metavar="DEVICE",
        help="Where to run: cpu, cuda, cuda:N, mps or auto (CUDA when available; the default "
        "for a checkpoint).",
        show_default=False,
    ),
]
DtypeOpt = Annotated[
    str | None,
    typer.Option(
        "--dtype",
        metavar="DTYPE",
        help="Cast the model after loading: float32, bfloat16 or float16 (inputs follow).",
        show_default=False,
    ),
]
DeviceMapOpt = Annotated[
    str | None,
    typer.Option(
        "--device-map",
        metavar="auto",
        help="auto: dispatch the weights across GPUs, CPU and disk with accelerate, for "
        "models bigger than memory (pip install 'fvis[big]').",
        show_default=False,
    ),
]
MaxMemoryOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--max-memory",
        metavar="DEVICE=SIZE",
        help="Memory budget per device for --device-map, e.g. cpu=4GiB or 0=20GiB. Repeatable.",
        show_default=False,
    ),
]
OffloadOpt = Annotated[
    Path | None,
    typer.Option(
        "--offload-folder",
        metavar="DIR",
        help="Empty folder for the weights --device-map offloads to disk (default: a "
        "temporary folder, removed at exit).",
        show_default=False,
    ),
]
InputOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--input",
        "-i",
        metavar="FILE",
        help="Image, tensor file (.pt/.npy/.safetensors) or folder; "
        "name=FILE for keyword inputs. Repeatable.",
        show_default=False,
    ),
]
TextOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--text",
        metavar="TEXT",
        help="Text to tokenize with the tokenizer saved beside the model (offline) and pass as "
        "input_ids/attention_mask; its tokens label the pictures. Repeatable (one sample each).",
        show_default=False,
    ),
]
TextFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--text-file",
        metavar="FILE",
        help="Texts to tokenize, one per line (like --text).",
        show_default=False,
    ),
]
TokenizerOpt = Annotated[
    Path | None,
    typer.Option(
        "--tokenizer",
        metavar="DIR",
        help="Folder holding the tokenizer for --text (default: the model's folder).",
        show_default=False,
    ),
]
ShapeOpt = Annotated[
    str | None,
    typer.Option(
        "--shape", help="Random input of this shape, e.g. 1,3,224,224.", show_default=False
    ),
]
SeedOpt = Annotated[
    int, typer.Option("--seed", min=0, max=2**63 - 1, help="Seed for random inputs.")
]
SizeOpt = Annotated[
    str | None, typer.Option("--size", help="Resize images to HxW.", show_default=False)
]
NormOpt = Annotated[
    str,
    typer.Option(
        "--norm",
        help="Image normalisation: auto (ImageNet for RGB), imagenet, "
        "none, MEAN,STD or M1,M2,M3/S1,S2,S3.",
    ),
]
MaxPixelsOpt = Annotated[
    int | None,
    typer.Option(
        "--max-input-pixels",
        min=1,
        help="Refuse input images with more pixels than this, before decoding "
        "(default 16,777,216 = 4096x4096).",
        show_default=False,
    ),
]
ChannelsOpt = Annotated[
    int | None,
    typer.Option(
        "--channels",
        help="Channels the model expects (default: read from the first convolution).",
        show_default=False,
    ),
]
DepthOpt = Annotated[
    int | None,
    typer.Option(
        "--depth", min=0, help="Show modules down to this depth (root is 0).", show_default=False
    ),
]
LayerOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--layer",
        "-l",
        metavar="NAME",
        help="Dotted layer name or glob (repeatable), as listed by 'fvis layers'.",
        show_default=False,
    ),
]
AllOpt = Annotated[bool, typer.Option("--all", help="Every leaf module.")]
BackwardOpt = Annotated[
    bool,
    typer.Option(
        "--backward",
        help="Run one backward pass from the output and report the gradient reaching each "
        "capture and each layer's parameters (needed by the no-grad-flow gate).",
    ),
]
TargetOpt = Annotated[
    int | None,
    typer.Option(
        "--target",
        help="With --backward: backpropagate from this logit (last dim) instead of the sum of "
        "the output.",
        show_default=False,
    ),
]
TargetPositionOpt = Annotated[
    int | None,
    typer.Option(
        "--target-position",
        help="With --target on a (N, T, V) output: the token to take the logit at "
        "(default: the last token, -1), instead of summing it over every position.",
        show_default=False,
    ),
]
InputGradOpt = Annotated[
    bool,
    typer.Option(
        "--input-requires-grad",
        help="Make the input require grad, to check gradient flow through frozen layers.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON to stdout instead.")]


ModeOpt = Annotated[
    Mode,
    typer.Option(
        "--mode",
        help="grad: forward with grad enabled (the grad report is meaningful); "
        "no-grad / inference: as your inference code runs.",
    ),
]


OpsOpt = Annotated[
    bool,
    typer.Option(
        "--ops",
        help="Also see the tensor ops inside each forward (module:op#index, e.g. "
        "'inner:softmax#1'); --layer patterns with ':' choose them, e.g. 'inner:*'.",
    ),
]


WhatOpt = Annotated[
    What,
    typer.Option(
        "--what",
        help="Capture each chosen module's output, its positional inputs (layer:input), or both.",
    ),
]


def load_options(
    arch: str | None,
    arch_kwargs: str | None,
    allow_module: list[str] | None,
    trust: bool,
    trust_sha256: str | None,
    max_model_bytes: int | None = None,
    strict: bool = True,
    attn_implementation: str | None = None,
    big: tuple[str | None, list[str] | None, Path | None, str | None] = (None, None, None, None),
) -> Any:
    from fvis.big import parse as parse_big
    from fvis.config import check_nesting
    from fvis.formats import Limits
    from fvis.loading import LoadOptions, Trust, check_allow_modules

    kwargs: dict[str, Any] = {}
    if arch_kwargs:
        try:
            kwargs = json.loads(arch_kwargs)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--arch-kwargs is not valid JSON: {exc}") from None
        except RecursionError:  # json recurses per level of nesting
            raise UsageError("--arch-kwargs is nested too deeply to read") from None
        if not isinstance(kwargs, dict):
            raise UsageError("--arch-kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'")
        check_nesting(kwargs, "--arch-kwargs")
    check_allow_modules(tuple(allow_module or ()))
    if max_model_bytes is not None and max_model_bytes < 1:
        raise UsageError("--max-model-bytes must be positive")
    return LoadOptions(
        arch=arch,
        arch_kwargs=kwargs,
        allow_modules=tuple(allow_module or ()),
        trust=Trust.from_flags(trust, trust_sha256),
        strict=strict,
        limits=Limits(max_model_bytes=max_model_bytes),
        attn_implementation=attn_implementation,
        big=parse_big(big[0], big[1] or (), big[2], big[3]),
    )


def input_options(
    inputs: list[str] | None,
    shape: str | None,
    seed: int,
    size: str | None,
    norm: str,
    channels: int | None,
    config: Any,
    max_pixels: int | None = None,
    texts: list[str] | None = None,
    text_file: Path | None = None,
    tokenizer: Path | None = None,
) -> Any:
    from fvis.inputs import MAX_IMAGE_PIXELS, InputOptions, parse_shape, parse_size
    from fvis.prompts import read_text_file

    sources = tuple(inputs or ()) or (config.inputs if config and not shape else ())
    shape = shape or (config.shape if config and not sources else None)
    return InputOptions(
        sources=sources,
        shape=parse_shape(shape) if shape else None,
        seed=seed,
        size=parse_size(size) if size else None,
        norm=norm,
        channels=channels,
        max_pixels=max_pixels or MAX_IMAGE_PIXELS,
        texts=(*(texts or ()), *(read_text_file(text_file) if text_file else ())),
        tokenizer=tokenizer,
    )


def resolve_ref(model: Path | None, load: Any) -> Any:
    from fvis.api import BUNDLED, resolve_model

    ref, config = resolve_model(model, load)
    if ref.origin == BUNDLED:
        say_note(f"no model given and no [tool.fvis] in ./pyproject.toml: using the {BUNDLED}")
    elif ref.origin:
        say_note(f"model {ref.path} from {ref.origin}")
    return ref, config


def positive(value: int | None, flag: str) -> int | None:
    if value is not None and value < 1:
        raise UsageError(f"{flag} must be at least 1")
    return value


def parse_sample(text: str) -> int | str | None:
    if text == "all":
        return None
    if text == "auto":
        return "auto"
    if not text.isdigit():
        raise UsageError(f"--sample {text!r} must be a batch index or 'all'")
    return int(text)
