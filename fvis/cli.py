"""The ``fvis`` command: option parsing and one error boundary, over ``fvis.api``.

Heavy imports (torch, numpy, PIL) are deferred into the commands so ``fvis --help`` is instant.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from fvis.choices import Cmap, Mode, NormScope, What
from fvis.errors import ExitStatus, FvisError, OutputError, UsageError

EXIT_CODES_HELP = (
    "Exit codes: 0 ok; 1 checks failed; 2 usage error (bad option, missing file, unknown "
    "layer); 3 unreadable, corrupt or unsupported file; 4 refused for safety; 5 model and "
    "input incompatible or forward failed; 6 output problem; 70 internal error (a bug); "
    "130 interrupted; 141 stdout closed; 143 terminated."
)

app = typer.Typer(
    name="fvis",
    help="See what a layer deep inside a PyTorch model sees, and whether its output is still "
    "on the autograd graph.\n\n" + EXIT_CODES_HELP,
    add_completion=False,
    no_args_is_help=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# --------------------------------------------------------------------------- shared options

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
        help="Where to run: cpu, cuda, cuda:N, mps or auto (CUDA when available; the default "
        "for a checkpoint).",
        show_default=False,
    ),
]
DtypeOpt = Annotated[
    str | None,
    typer.Option(
        "--dtype",
        help="Cast the model after loading: float32, bfloat16 or float16 (inputs follow).",
        show_default=False,
    ),
]
DeviceMapOpt = Annotated[
    str | None,
    typer.Option(
        "--device-map",
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
        help="Text to tokenize with the tokenizer saved beside the model (offline) and pass as "
        "input_ids/attention_mask; its tokens label the pictures. Repeatable (one sample each).",
        show_default=False,
    ),
]
TextFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--text-file", help="Texts to tokenize, one per line (like --text).", show_default=False
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

F = TypeVar("F", bound=Callable[..., Any])


# --------------------------------------------------------------------------- error boundary


def _debug(ctx: typer.Context | None) -> bool:
    flag = bool(ctx and ctx.find_root().meta.get("fvis.debug"))
    return flag or os.environ.get("FVIS_DEBUG", "") not in ("", "0")


def boundary(func: F) -> F:
    """Map domain errors to one line + hint + exit code; bugs to a traceback and 70."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = kwargs.get("ctx")  # every command takes the typer context first
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning
                return func(*args, **kwargs)
        except FvisError as exc:
            if _debug(ctx):
                traceback.print_exc()
            _error(exc.message, exc.hint)
            raise typer.Exit(int(exc.exit_status)) from None
        except KeyboardInterrupt as exc:
            terminated = type(exc).__name__ == "Terminated"
            _error("terminated" if terminated else "interrupted")
            status = ExitStatus.TERMINATED if terminated else ExitStatus.INTERRUPTED
            raise typer.Exit(int(status)) from None
        except typer.Exit:
            raise
        except BrokenPipeError:
            # `fvis layers | head`: the reader went away; exit like a shell does on SIGPIPE.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise typer.Exit(int(ExitStatus.BROKEN_PIPE)) from None
        except Exception:
            traceback.print_exc()
            _error(
                "internal error: this is a bug in fvis", "please report it with the traceback above"
            )
            raise typer.Exit(int(ExitStatus.INTERNAL)) from None

    return wrapper  # type: ignore[return-value]


def _show_warning(message: Any, category: type[Warning], *_args: Any, **_kwargs: Any) -> None:
    """fvis's own warnings (``--trust``) as one line; others as Python prints them."""
    from fvis.trust import TrustWarning

    if issubclass(category, TrustWarning):
        _note(f"warning: {message}")
    else:
        sys.stderr.write(warnings.formatwarning(message, category, *_args[:2]))


def _error(message: str, hint: str | None = None) -> None:
    from fvis.text import for_terminal_plain

    sys.stderr.write(f"fvis: error: {for_terminal_plain(message)}\n")
    if hint:
        sys.stderr.write(f"hint: {for_terminal_plain(hint)}\n")


def _note(message: str) -> None:
    from fvis.text import for_terminal_plain

    sys.stderr.write(f"fvis: {for_terminal_plain(message)}\n")


@app.callback()
def root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False,
) -> None:
    """fvis: feature maps and grad-tracking reports for nested PyTorch models."""
    ctx.meta["fvis.debug"] = debug
    if version:
        from importlib.metadata import version as dist_version

        typer.echo(f"fvis {dist_version('fvis')}")
        raise typer.Exit(0)


# --------------------------------------------------------------------------- helpers


def _load_options(
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


def _input_options(
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


def _resolve(model: Path | None, load: Any) -> Any:
    from fvis.api import BUNDLED, resolve_model

    ref, config = resolve_model(model, load)
    if ref.origin == BUNDLED:
        _note(f"no model given and no [tool.fvis] in ./pyproject.toml: using the {BUNDLED}")
    elif ref.origin:
        _note(f"model {ref.path} from {ref.origin}")
    return ref, config


def _console() -> Any:
    from rich.console import Console

    class _PipeAwareConsole(Console):
        def on_broken_pipe(self) -> None:  # rich exits 1 ("checks failed") by itself
            raise BrokenPipeError

    console = _PipeAwareConsole(highlight=False)
    if not console.is_terminal:  # pipes and CI logs: do not crop long dotted names at 80
        console.width = max(console.width, 200)
    return console


# --------------------------------------------------------------------------- commands


@app.command()
@boundary
def layers(
    ctx: typer.Context,
    model: ModelArg = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    allow_module: AllowModuleOpt = None,
    trust: TrustOpt = False,
    trust_sha256: TrustShaOpt = None,
    max_model_bytes: MaxBytesOpt = None,
    strict: StrictOpt = True,
    input: InputOpt = None,
    text: TextOpt = None,
    text_file: TextFileOpt = None,
    tokenizer: TokenizerOpt = None,
    shape: ShapeOpt = None,
    seed: SeedOpt = 0,
    size: SizeOpt = None,
    norm: NormOpt = "auto",
    channels: ChannelsOpt = None,
    max_input_pixels: MaxPixelsOpt = None,
    depth: DepthOpt = None,
    filter: Annotated[
        str | None,
        typer.Option(
            "--filter", help="Only names matching this glob, e.g. 'backbone.*'.", show_default=False
        ),
    ] = None,
    json_out: JsonOpt = False,
    ops: OpsOpt = False,
) -> None:
    """List the module tree: dotted names, classes, parameters, nested models, shared modules.

    With --input or --shape, one forward pass adds output shapes, call counts and the layers
    that never ran (and with --ops every tensor op inside the forwards). Without, nothing from
    the file runs and no tensor data is read.
    """
    from fvis.api import list_layers
    from fvis.errors import MaliciousFileError
    from fvis.listing import refusal_json, to_json, to_rich

    ref, config = _resolve(
        model,
        _load_options(
            arch, arch_kwargs, allow_module, trust, trust_sha256, max_model_bytes, strict
        ),
    )
    # --ops asks for a forward pass: without an input, one is synthesized as dump does
    wants_run = bool(
        ops or input or text or text_file or shape or (config and (config.inputs or config.shape))
    )
    inputs = (
        _input_options(
            input,
            shape,
            seed,
            size,
            norm,
            channels,
            config,
            max_input_pixels,
            text,
            text_file,
            tokenizer,
        )
        if wants_run
        else None
    )
    try:
        listing = list_layers(ref, inputs, ops)
    except MaliciousFileError as exc:
        if json_out:  # the verdict on stdout for scripts; the error line on stderr as usual
            sys.stdout.write(json.dumps(refusal_json(exc), indent=2) + "\n")
        raise
    if json_out:
        sys.stdout.write(json.dumps(to_json(listing, depth, filter), indent=2) + "\n")
        return
    console = _console()
    console.print(to_rich(listing, depth, filter))
    if listing.ops is not None:
        from fvis.listing import ops_table

        console.print(ops_table(listing.ops, filter))
    _print_listing_notes(console, listing)


def _print_listing_notes(console: Any, listing: Any) -> None:
    from fvis.listing import human, never_ran
    from fvis.text import for_terminal

    root = listing.tree.layers[0]
    console.print(
        f"{len(listing.tree.layers)} modules, {human(root.params)} parameters "
        f"({human(root.trainable)} trainable, {human(root.frozen)} frozen)"
    )
    if listing.tree.source_note:
        console.print(f"[dim]{for_terminal(listing.tree.source_note)}[/dim]")
    if listing.input_description:
        console.print(f"[dim]input: {for_terminal(listing.input_description)}[/dim]")
    missing = never_ran(listing)
    if missing:
        console.print(f"[red]never ran:[/red] {', '.join(for_terminal(n) for n in missing)}")


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


@app.command()
@boundary
def dump(
    ctx: typer.Context,
    model: ModelArg = None,
    layer: LayerOpt = None,
    all_leaves: AllOpt = False,
    depth: Annotated[
        int | None,
        typer.Option(
            "--depth",
            min=0,
            help="Modules at this depth (root is 0), plus shallower leaves.",
            show_default=False,
        ),
    ] = None,
    input: InputOpt = None,
    text: TextOpt = None,
    text_file: TextFileOpt = None,
    tokenizer: TokenizerOpt = None,
    shape: ShapeOpt = None,
    seed: SeedOpt = 0,
    size: SizeOpt = None,
    norm: NormOpt = "auto",
    channels: ChannelsOpt = None,
    max_input_pixels: MaxPixelsOpt = None,
    mode: ModeOpt = Mode.GRAD,
    what: WhatOpt = What.OUTPUT,
    ops: OpsOpt = False,
    train: Annotated[
        bool,
        typer.Option(
            "--train", help="Run in train mode (default eval; the model's mode is restored)."
        ),
    ] = False,
    sample: Annotated[
        str,
        typer.Option(
            "--sample",
            help="Which sample of the batch to draw: an index, or 'all' (the default with "
            "several input files).",
        ),
    ] = "auto",
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            help="Run the inputs in forward passes of at most this many samples.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("fvis-out"),
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Use a folder holding other files (only fvis's own files are replaced).",
        ),
    ] = False,
    images: Annotated[bool, typer.Option("--images/--no-images", help="Write PNG grids.")] = True,
    save_tensors: Annotated[
        bool, typer.Option("--save-tensors", help="Also write activations.safetensors.")
    ] = False,
    cmap: Annotated[Cmap, typer.Option("--cmap")] = Cmap.VIRIDIS,
    norm_scope: Annotated[
        NormScope, typer.Option("--norm-scope", help="Normalise each channel or the whole map.")
    ] = NormScope.CHANNEL,
    max_channels: Annotated[
        int, typer.Option("--max-channels", help="Show at most this many channels (top by energy).")
    ] = 64,
    backward: BackwardOpt = False,
    target: TargetOpt = None,
    target_position: TargetPositionOpt = None,
    gradcam: Annotated[
        bool,
        typer.Option(
            "--gradcam",
            help="Also write a Grad-CAM overlay for each (N,C,H,W) capture (implies --backward).",
        ),
    ] = False,
    input_requires_grad: InputGradOpt = False,
    attn_implementation: AttnOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    allow_module: AllowModuleOpt = None,
    trust: TrustOpt = False,
    trust_sha256: TrustShaOpt = None,
    max_model_bytes: MaxBytesOpt = None,
    strict: StrictOpt = True,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print report.json to stdout instead of the table.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on success.")] = False,
) -> None:
    """Capture the chosen layers in one forward pass; write PNG grids, report.json and
    report.md to --out, and print a table of what each activation is."""
    from fvis.api import DumpOptions
    from fvis.api import dump as run_dump

    ref, config = _resolve(
        model,
        _load_options(
            arch,
            arch_kwargs,
            allow_module,
            trust,
            trust_sha256,
            max_model_bytes,
            strict,
            attn_implementation,
            (device_map, max_memory, offload_folder, dtype),
        ),
    )
    inputs = _input_options(
        input,
        shape,
        seed,
        size,
        norm,
        channels,
        config,
        max_input_pixels,
        text,
        text_file,
        tokenizer,
    )
    layers = tuple(layer or ()) or (config.layers if config else ())
    _positive(max_channels, "--max-channels")
    options = DumpOptions(
        layers=layers,
        all_leaves=all_leaves,
        depth=depth,
        mode=mode.value,
        what=what.value,
        train=train,
        sample=_parse_sample(sample),
        images=images,
        save_tensors=save_tensors,
        cmap=cmap.value,
        norm_scope=norm_scope.value,
        max_channels=max_channels,
        backward=backward or gradcam,
        target=target,
        target_position=target_position,
        gradcam=gradcam,
        input_requires_grad=input_requires_grad,
        batch_size=_positive(batch_size, "--batch-size"),
        ops=ops,
        device=device or (config.device if config else None),
        dtype=dtype or (config.dtype if config else None),
    )
    with _terminate_as_interrupt(), _progress(enabled=not (quiet or json_out)) as tick:
        result = run_dump(ref, inputs, options, out, overwrite, progress=tick)
    for note in result.notes:
        _note(note)
    if json_out:
        sys.stdout.write(json.dumps(result.report, indent=2) + "\n")
    elif not quiet:
        _print_dump(result)


def _positive(value: int | None, flag: str) -> int | None:
    if value is not None and value < 1:
        raise UsageError(f"{flag} must be at least 1")
    return value


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _parse_sample(text: str) -> int | str | None:
    if text == "all":
        return None
    if text == "auto":
        return "auto"
    if not text.isdigit():
        raise UsageError(f"--sample {text!r} must be a batch index or 'all'")
    return int(text)


def _print_dump(result: Any) -> None:
    from fvis.report import backward_lines, to_table
    from fvis.text import for_terminal

    console = _console()
    inputs = result.report["input"]
    if "device" in inputs:
        console.print(f"[dim]device: {inputs['device']}, dtype: {inputs['dtype']}[/dim]")
    console.print(to_table(result.report))
    console.print(f"[dim]input: {for_terminal(inputs['description'])}[/dim]")
    for entry in result.report["not_run"]:
        console.print(
            f"[yellow]not called:[/yellow] {for_terminal(entry['layer'])}: "
            f"{for_terminal(entry.get('summary', 'its __call__ did not happen'))}"
        )
    for line in backward_lines(result.report):
        console.print(for_terminal(line))
    console.print(
        f"wrote {len(result.files)} files to {for_terminal(str(result.out))}/ "
        f"({_plural(sum(n.endswith('.png') for n in result.files), 'picture')}, report.html, "
        "report.json, report.md)"
    )


@contextlib.contextmanager
def _progress(enabled: bool) -> Any:
    """A transient progress line on stderr while layers fire, only on a terminal."""
    from rich.console import Console

    console = Console(stderr=True)
    if not (enabled and console.is_terminal):
        yield None
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("capturing", total=None)
        count = 0

        def tick(capture: Any) -> None:
            nonlocal count
            count += 1
            bar.update(task, description=f"captured {count} tensors")

        yield tick


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process was so cleanup runs as for Ctrl-C."""


@contextlib.contextmanager
def _terminate_as_interrupt() -> Any:
    import signal

    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. some test runners)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@app.command()
@boundary
def check(
    ctx: typer.Context,
    model: ModelArg = None,
    layer: LayerOpt = None,
    all_leaves: AllOpt = False,
    fail_on: Annotated[
        str | None,
        typer.Option(
            "--fail-on",
            metavar="GATES",
            help="Comma-separated gates: missing, not-run, disconnected, grad-off, "
            "inplace, nonfinite, dead:FRACTION, no-grad-flow. Default: "
            "missing,not-run,disconnected,nonfinite.",
            show_default=False,
        ),
    ] = None,
    expect: Annotated[
        list[str] | None,
        typer.Option(
            "--expect",
            metavar="PATTERN=STATE",
            help="PATTERN=STATE for layers where a state is intended, e.g. "
            "'backbone.*=disconnected' (connected, disconnected, grad-off, not-run). Repeatable.",
            show_default=False,
        ),
    ] = None,
    baseline: Annotated[
        Path | None,
        typer.Option("--baseline", help="Compare with this baseline file.", show_default=False),
    ] = None,
    write_baseline: Annotated[
        Path | None,
        typer.Option(
            "--write-baseline", help="Record this run as a baseline file.", show_default=False
        ),
    ] = None,
    rtol: Annotated[
        float,
        typer.Option(
            "--rtol", help="Relative tolerance for statistics drift against the baseline."
        ),
    ] = 1e-3,
    atol: Annotated[
        float,
        typer.Option(
            "--atol", help="Absolute tolerance for statistics drift against the baseline."
        ),
    ] = 1e-4,
    junit: Annotated[
        Path | None,
        typer.Option("--junit", help="Write a JUnit XML report here.", show_default=False),
    ] = None,
    strict_library: Annotated[
        bool,
        typer.Option(
            "--strict-library",
            help="Also fail 'disconnected' on cuts inside installed library code (by default "
            "a cut there, such as torchvision's RPN detaching its proposals, is by design).",
        ),
    ] = False,
    input: InputOpt = None,
    text: TextOpt = None,
    text_file: TextFileOpt = None,
    tokenizer: TokenizerOpt = None,
    shape: ShapeOpt = None,
    seed: SeedOpt = 0,
    size: SizeOpt = None,
    norm: NormOpt = "auto",
    channels: ChannelsOpt = None,
    max_input_pixels: MaxPixelsOpt = None,
    mode: ModeOpt = Mode.GRAD,
    what: WhatOpt = What.OUTPUT,
    ops: OpsOpt = False,
    backward: BackwardOpt = False,
    target: TargetOpt = None,
    target_position: TargetPositionOpt = None,
    input_requires_grad: InputGradOpt = False,
    attn_implementation: AttnOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadOpt = None,
    images: Annotated[
        bool, typer.Option("--images", help="Also write pictures and reports to --out.")
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Write report.json/report.md (and pictures with --images) here.",
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    allow_module: AllowModuleOpt = None,
    trust: TrustOpt = False,
    trust_sha256: TrustShaOpt = None,
    max_model_bytes: MaxBytesOpt = None,
    strict: StrictOpt = True,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the report and the failures as JSON to stdout.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only failures.")] = False,
) -> None:
    """fvis dump with gates and an exit code: 0 when every gate holds, 1 when any fails."""
    from fvis.api import CheckOptions, DumpOptions
    from fvis.api import check as run_check
    from fvis.gates import DEFAULT_GATES, parse_expectations, parse_gates

    ref, config = _resolve(
        model,
        _load_options(
            arch,
            arch_kwargs,
            allow_module,
            trust,
            trust_sha256,
            max_model_bytes,
            strict,
            attn_implementation,
            (device_map, max_memory, offload_folder, dtype),
        ),
    )
    # config is None whenever MODEL was given (resolve_model does not read it then)
    inputs = _input_options(
        input,
        shape,
        seed,
        size,
        norm,
        channels,
        config,
        max_input_pixels,
        text,
        text_file,
        tokenizer,
    )
    gates = CheckOptions(
        gates=parse_gates(fail_on or (config and config.fail_on) or DEFAULT_GATES),
        expectations=parse_expectations(tuple(expect or ()) or (config.expect if config else ())),
        baseline=baseline or (config.baseline if config and not write_baseline else None),
        write_baseline=write_baseline,
        rtol=rtol,
        atol=atol,
        strict_library=strict_library,
    )
    options = DumpOptions(
        layers=tuple(layer or ()) or (config.layers if config else ()),
        all_leaves=all_leaves,
        mode=mode.value,
        what=what.value,
        images=images,
        backward=backward,
        target=target,
        target_position=target_position,
        input_requires_grad=input_requires_grad,
        ops=ops,
        device=device or (config.device if config else None),
        dtype=dtype or (config.dtype if config else None),
    )
    if images and out is None:
        out = Path("fvis-out")
    with _terminate_as_interrupt(), _progress(enabled=not (quiet or json_out)) as tick:
        result = run_check(ref, inputs, options, gates, out, overwrite, progress=tick)
    _report_check(result, junit, json_out, quiet)
    if not result.passed:
        raise typer.Exit(int(ExitStatus.CHECKS_FAILED))


def _report_check(result: Any, junit: Path | None, json_out: bool, quiet: bool) -> None:

    from fvis.ci_reports import junit_xml, step_summary
    from fvis.output import write_file_atomic
    from fvis.text import for_terminal_plain

    failures = result.failures
    if junit is not None:
        write_file_atomic(junit, junit_xml(result.outcome, result.baseline_failures))
    summary_path = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary_path:
        try:
            with open(summary_path, "a", encoding="utf-8") as fh:
                fh.write(step_summary(result.dump.report, failures))
        except OSError as exc:
            raise OutputError(
                f"cannot append to GITHUB_STEP_SUMMARY {summary_path}: {exc.strerror or exc}"
            ) from None
    if json_out:
        check = result.dump.report["check"]  # api.check put the verdict there already
        payload = {
            "passed": check["passed"],
            "failures": check["failures"],
            "report": result.dump.report,
        }
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return
    for failure in failures:
        sys.stdout.write(f"FAIL {for_terminal_plain(failure.line())}\n")
    if not quiet:
        from fvis.report import output_note_lines

        for line in output_note_lines(result.dump.report):
            sys.stdout.write(f"note: {for_terminal_plain(line)}\n")
        failing = len({(f.layer, f.gate) for f in failures})
        status = "passed" if result.passed else f"failed: {failing} of {result.checks} checks"
        captures = _plural(len(result.dump.report["captures"]), "capture")
        empty = _no_tensor_layers(result.dump.report)
        extra = f"; no tensor from {', '.join(empty)}" if empty else ""
        sys.stdout.write(f"fvis check {status} ({captures}{for_terminal_plain(extra)})\n")


def _no_tensor_layers(report: dict[str, Any]) -> list[str]:
    """Captured layers whose output held no tensor at all (their note says what it was)."""
    captured = {c["layer"] for c in report["captures"]}
    notes = report.get("output_notes", [])
    return list(dict.fromkeys(n["layer"] for n in notes if n["layer"] not in captured))


def main() -> None:
    """Console-script entry point."""
    app(prog_name="fvis")
