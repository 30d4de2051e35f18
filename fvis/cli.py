"""The ``fvis`` command: option parsing and one error boundary, over ``fvis.api``.

Heavy imports (torch, numpy, PIL) are deferred into the commands so ``fvis --help`` is instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from fvis.choices import Cmap, Mode, NormScope, What
from fvis.cli_boundary import boundary, say_note, terminate_as_interrupt
from fvis.cli_options import (
    AllOpt,
    AllowModuleOpt,
    ArchKwargsOpt,
    ArchOpt,
    AttnOpt,
    BackwardOpt,
    ChannelsOpt,
    DepthOpt,
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    InputGradOpt,
    InputOpt,
    JsonOpt,
    LayerOpt,
    MaxBytesOpt,
    MaxMemoryOpt,
    MaxPixelsOpt,
    ModelArg,
    ModeOpt,
    NormOpt,
    OffloadOpt,
    OpsOpt,
    SeedOpt,
    ShapeOpt,
    SizeOpt,
    StrictOpt,
    TargetOpt,
    TargetPositionOpt,
    TextFileOpt,
    TextOpt,
    TokenizerOpt,
    TrustOpt,
    TrustShaOpt,
    WhatOpt,
    input_options,
    load_options,
    parse_sample,
    positive,
    resolve_ref,
)
from fvis.cli_print import (
    make_console,
    print_dump,
    print_listing_notes,
    progress_line,
    report_check,
)
from fvis.errors import ExitStatus

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


# --------------------------------------------------------------------------- error boundary


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

    ref, config = resolve_ref(
        model,
        load_options(arch, arch_kwargs, allow_module, trust, trust_sha256, max_model_bytes, strict),
    )
    # --ops asks for a forward pass: without an input, one is synthesized as dump does
    wants_run = bool(
        ops or input or text or text_file or shape or (config and (config.inputs or config.shape))
    )
    inputs = (
        input_options(
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
    console = make_console()
    console.print(to_rich(listing, depth, filter))
    if listing.ops is not None:
        from fvis.listing import ops_table

        console.print(ops_table(listing.ops, filter))
    print_listing_notes(console, listing)


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

    ref, config = resolve_ref(
        model,
        load_options(
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
    inputs = input_options(
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
    positive(max_channels, "--max-channels")
    options = DumpOptions(
        layers=layers,
        all_leaves=all_leaves,
        depth=depth,
        mode=mode.value,
        what=what.value,
        train=train,
        sample=parse_sample(sample),
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
        batch_size=positive(batch_size, "--batch-size"),
        ops=ops,
        device=device or (config.device if config else None),
        dtype=dtype or (config.dtype if config else None),
    )
    with terminate_as_interrupt(), progress_line(enabled=not (quiet or json_out)) as tick:
        result = run_dump(ref, inputs, options, out, overwrite, progress=tick)
    for note in result.notes:
        say_note(note)
    if json_out:
        sys.stdout.write(json.dumps(result.report, indent=2) + "\n")
    elif not quiet:
        print_dump(result)


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

    ref, config = resolve_ref(
        model,
        load_options(
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
    inputs = input_options(
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
    with terminate_as_interrupt(), progress_line(enabled=not (quiet or json_out)) as tick:
        result = run_check(ref, inputs, options, gates, out, overwrite, progress=tick)
    report_check(result, junit, json_out, quiet)
    if not result.passed:
        raise typer.Exit(int(ExitStatus.CHECKS_FAILED))


def main() -> None:
    """Console-script entry point."""
    app(prog_name="fvis")
