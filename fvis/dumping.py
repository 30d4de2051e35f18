"""``dump``: one forward pass with hooks on the chosen layers (in batches if asked), the
verdicts, the backward pass, pictures and the report (``fvis.api`` re-exports it)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fvis.errors import UsageError
from fvis.layers import ModelTree, node_from_module
from fvis.loading import LoadedModel

if TYPE_CHECKING:
    from fvis.api import ModelRef
    from fvis.inputs import InputOptions, Prepared


@dataclass(frozen=True)
class DumpOptions:
    """Mirrors ``fvis dump``'s options (everything but the model and the inputs)."""

    layers: tuple[str, ...] = ()
    all_leaves: bool = False
    depth: int | None = None
    mode: str = "grad"
    what: str = "output"  # output | input | both (fvis.capture's ``what``)
    train: bool = False
    sample: int | str | None = "auto"  # index; None: every sample; "auto": all if several files
    images: bool = True
    save_tensors: bool = False
    cmap: str = "viridis"
    norm_scope: str = "channel"
    max_channels: int = 64
    backward: bool = False
    target: int | None = None  # logit to backpropagate from; None: the sum of the output
    target_position: int | None = None  # token of a (N, T, V) output; None: the last token
    gradcam: bool = False
    input_requires_grad: bool = False
    missing_ok: bool = False  # unknown --layer names are returned (for the `missing` gate)
    batch_size: int | None = None  # split the inputs into forward passes of at most this many
    device: str | None = None  # cpu | cuda | cuda:N | mps | auto (fvis.placement)
    dtype: str | None = None  # float32 | bfloat16 | float16: the model is cast after loading
    ops: bool = False  # also record tensor ops; ``--layer`` patterns with ':' name ops (fvis.ops)


@dataclass(frozen=True)
class DumpResult:
    report: dict[str, Any]
    files: tuple[str, ...]
    out: Path | None
    notes: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()  # --layer names that matched nothing (with missing_ok)


def choose_layers(
    tree: ModelTree, options: DumpOptions, label: str = "MODEL"
) -> tuple[list[str], list[str], list[str]]:
    """Dotted names to hook, notes on how they were chosen, and unknown names.

    Explicit names and globs resolve as in ``fvis layers`` (an unknown one raises, or with
    ``missing_ok`` is returned); ``all_leaves`` takes every leaf module; ``depth`` takes the
    modules at that depth plus shallower leaves. With none of these, every leaf module is
    taken and a note says so.
    """
    from fvis.layers import resolve
    from fvis.ops import is_op_pattern, take_op_pattern

    named = [i for i in tree.layers if i.name and i.first_name == i.name]
    leaves = [i.name for i in named if i.is_leaf]
    chosen: list[str] = []
    notes: list[str] = []
    missing: list[str] = []
    for pattern in options.layers:
        if take_op_pattern(pattern, options.ops):  # an op pattern: matched during forward
            chosen.append(pattern)
            continue
        try:
            chosen += [i.first_name or i.name for i in resolve(tree.layers, [pattern], label)]
        except UsageError:
            if not options.missing_ok:
                raise
            if pattern not in missing:
                missing.append(pattern)
    if options.all_leaves:
        chosen += leaves
    if options.depth is not None:
        depth = options.depth
        chosen += [i.name for i in named if i.depth == depth or (i.is_leaf and i.depth < depth)]
    if not (options.layers or options.all_leaves or options.depth is not None):
        chosen = leaves
        notes.append(f"no --layer given: capturing every leaf module ({len(leaves)})")
    if options.ops and not any(is_op_pattern(p) for p in options.layers):
        notes.append("--ops, no op pattern: capturing every compute op outside captured leaves")
    return list(dict.fromkeys(chosen)), notes, missing


@dataclass(frozen=True)
class _DumpRun:
    report: dict[str, Any]
    gallery: Any  # fvis.gallery.Gallery
    captures: tuple[Any, ...]
    notes: tuple[str, ...]
    missing: tuple[str, ...]


def dump(
    ref: ModelRef,
    inputs: InputOptions,
    options: DumpOptions,
    out: Path | None,
    overwrite: bool = False,
    progress: Callable[[Any], None] | None = None,
) -> DumpResult:
    """Run the model once with hooks on the chosen layers; write pictures and reports.

    ``out=None`` writes nothing (the report is still returned). Example::

        dump(resolve_model(Path("m.pt"), LoadOptions(arch="pkg:Net"))[0],
             InputOptions(sources=("cat.png",)), DumpOptions(layers=("inner.relu",)),
             Path("fvis-out"))
    """
    from fvis.output import OutputDir

    folder = OutputDir.open(out, overwrite) if out is not None else None  # fail before work
    with folder or contextlib.nullcontext():  # any failure: nothing new is left behind
        run = _run_dump(ref, inputs, options, progress)
        files = _write_outputs(folder, run, options) if folder is not None else []
    return DumpResult(run.report, tuple(files), out, run.notes, run.missing)


def _run_dump(
    ref: ModelRef,
    inputs: InputOptions | Prepared,
    options: DumpOptions,
    progress: Callable[[Any], None] | None = None,
) -> _DumpRun:
    from fvis import api  # late: fvis.api re-exports this module
    from fvis.backward import merge_flows
    from fvis.capture import train_mode
    from fvis.gallery import Gallery
    from fvis.inputs import Prepared
    from fvis.ops import ops_outcome
    from fvis.report import build_report

    loaded = api.open_model(ref)
    prepared = inputs if isinstance(inputs, Prepared) else api.prepare_inputs(loaded, inputs)
    loaded, prepared, where = _placed(loaded, prepared, options, ref)
    sample = _which_sample(options.sample, prepared)
    options = dataclasses.replace(options, sample=sample)
    tree = ModelTree.of(node_from_module(loaded.module))
    layers, notes, missing = choose_layers(tree, options, ref.label)
    gallery = Gallery.from_options(options, prepared.labels, prepared.tokens)
    if options.images and prepared.display is not None:
        gallery.add_input(prepared.display)
    grad_at: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if options.input_requires_grad and not _require_grad(prepared):
        grad_at, note = _embedding_requires_grad(loaded.module)
        notes.append(note)
    captures: list[Any] = []
    verdicts: dict[str, Any] = {}
    flows = []
    never_sets: list[tuple[str, ...]] = []
    output_notes: dict[str, list[str]] = {}
    not_called_sets: list[set[str]] = []
    op_records: tuple[Any, ...] = ()
    chunks = _batches(prepared, options.batch_size)
    with grad_at:  # the embedding hook, where --input-requires-grad needs one
        for index, (args, kwargs) in enumerate(chunks):
            with train_mode(loaded.module, options.train):  # backward recomputes checkpoints
                result = _capture_and_analyse(
                    loaded,
                    (args, kwargs),
                    layers,
                    options,
                    sample,
                    gallery,
                    progress,
                    index,
                    len(chunks),
                )
            captures += result.captures
            verdicts.update(result.verdicts)
            flows.append(result.flow)
            never_sets.append(result.never_ran)
            for layer, texts in result.output_notes.items():
                known = output_notes.setdefault(layer, [])
                known += [t for t in texts if t not in known]
            not_called_sets.append(set(result.not_called))
            if index == 0 and options.ops:
                missing += ops_outcome(options.layers, result.ops, options.missing_ok, notes)
                op_records = result.ops
            del result
    never_ran = tuple(n for n in never_sets[0] if all(n in s for s in never_sets))
    not_called = set.intersection(*not_called_sets)
    not_run = _not_run_entries(tree, options.layers, not_called, verdicts)
    flow = merge_flows(flows)
    if flow is not None and options.gradcam:
        gallery.add_gradcams(captures, flow.grads, prepared.displays)
    images = gallery.name_files(captures)
    data = _report_input(loaded, prepared, tree, options, captures, never_ran, images, verdicts)
    placed = {**data.input, "device": where[0], "dtype": where[1]}
    data = dataclasses.replace(data, output_notes=output_notes, input=placed)
    if len(chunks) > 1:
        notes.append(
            f"ran {prepared.batch_size} samples in {len(chunks)} batches of at most "
            f"{options.batch_size}"
        )
    report = build_report(data, flow, tree, gallery.input_file)
    report["not_run"] = not_run
    if options.ops:  # every op of the first pass, captured or not: the names --layer takes
        from fvis.listing import ops_json

        report["ops"] = ops_json(op_records)
    return _DumpRun(report, gallery, tuple(captures), tuple(notes), tuple(missing))


@dataclass(frozen=True)
class _Pass:
    """What one forward pass (one batch) leaves behind once its graph is released."""

    captures: tuple[Any, ...]
    verdicts: dict[str, Any]
    flow: Any
    never_ran: tuple[str, ...]
    not_called: tuple[str, ...]
    output_notes: Mapping[str, tuple[str, ...]]
    ops: tuple[Any, ...] = ()  # fvis.records.OpRecord, with DumpOptions.ops


# Verdicts an op watch can refine: a capture that requires grad but does not reach the output
# may have been used and then detached inside a parent's forward (see fvis.capture); a cut's
# verdict names the line of the .detach() the watch saw (fvis.cuts).
_NEEDS_OP_WATCH = frozenset({"unused", "cut-downstream", "cut-inside"})


def _capture_and_analyse(
    loaded: LoadedModel,
    inputs: tuple[tuple[Any, ...], dict[str, Any]],
    layers: list[str],
    options: DumpOptions,
    sample: int | None,
    gallery: Any,
    progress: Callable[[Any], None] | None,
    index: int,
    passes: int,
) -> _Pass:
    from fvis.capture import Mode, capture
    from fvis.grads import diagnose, verdict_dicts

    args, kwargs = inputs
    result = capture(
        loaded.module,
        args,
        layers,
        kwargs=kwargs,
        mode=Mode(options.mode),
        train=options.train,
        sample=sample,
        what=options.what,
        keep_values=options.gradcam,
        keep_tensors=options.save_tensors,
        on_capture=_each_capture(gallery.add if options.images else None, progress),
        batch=index if passes > 1 else None,
        callback_values=options.images,  # the progress line alone needs no copies
        ops=options.ops,
    )
    op_records = result.ops
    # Analyse each pass before the next: its autograd graph is released with `result`.
    captures, notes = result.captures, result.output_notes
    verdicts = diagnose(result)
    if Mode(options.mode) is Mode.GRAD and any(
        v.cause in _NEEDS_OP_WATCH for v in verdicts.values()
    ):
        # Only an op watch tells "detached in a parent's forward" from "unused": run the same
        # pass again with it, for the verdicts (the pictures and statistics are the first's).
        del result
        result = capture(
            loaded.module,
            args,
            layers,
            kwargs=kwargs,
            mode=Mode.GRAD,
            train=options.train,
            sample=sample,
            keep_values=False,
            batch=index if passes > 1 else None,
            watch_ops=True,
            what=options.what,
            ops=options.ops,
        )
        verdicts = diagnose(result)
    flow = _backward(loaded, result, options, sample)
    return _Pass(
        captures,
        verdict_dicts(verdicts),
        flow,
        result.never_ran,
        tuple(result.not_called),
        notes,
        op_records,
    )


def _not_run_entries(
    tree: ModelTree, patterns: tuple[str, ...], not_called: set[str], verdicts: dict[str, Any]
) -> list[dict[str, Any]]:
    """One entry per requested module that was not called, with its verdict and whether the
    user asked for it by name (``requested``): an exact ``--layer`` name, or a glob none of
    whose matches ran. Only those fail the ``not-run`` gate: a leaf of the default or
    ``--all`` selection that is not called in this configuration is not a failure."""
    from fvis.layers import resolve

    requested: set[str] = set()
    for pattern in patterns:
        try:
            infos = resolve(tree.layers, [pattern])
        except UsageError:  # a missing name: the `missing` gate reports it
            continue
        names = [i.first_name or i.name for i in infos]
        exact = len(infos) == 1 and infos[0].name == pattern
        if exact or all(n in not_called for n in names):
            requested.update(names)
    return [
        {"layer": name, "requested": name in requested, **verdicts.get(name, {})}
        for name in sorted(not_called, key=_tree_order(tree))
    ]


def _tree_order(tree: ModelTree) -> Callable[[str], int]:
    order = {info.name: i for i, info in enumerate(tree.layers)}
    return lambda name: order.get(name, len(order))


def _placed(
    loaded: LoadedModel, prepared: Prepared, options: DumpOptions, ref: ModelRef
) -> tuple[LoadedModel, Prepared, tuple[str, str]]:
    """The model and inputs on ``--device`` in ``--dtype`` (fvis.placement)."""
    from fvis.placement import parse, place

    placement = parse(options.device, options.dtype)
    dispatched = getattr(loaded.module, "hf_device_map", None) is not None
    placed = place(
        loaded.module, prepared.args, prepared.kwargs, placement, ref.module is not None, dispatched
    )
    loaded = dataclasses.replace(loaded, module=placed.module)
    prepared = dataclasses.replace(prepared, args=placed.args, kwargs=placed.kwargs)
    return loaded, prepared, (placed.device, placed.dtype)


def _which_sample(sample: int | str | None, prepared: Prepared) -> int | None:
    if isinstance(sample, str):  # "auto": every sample when several files were given
        return None if len(prepared.labels) > 1 else 0
    if sample is not None and sample >= prepared.batch_size:
        raise UsageError(
            f"--sample {sample} is outside the batch of {prepared.batch_size}",
            hint="samples count from 0; use --sample all for every one",
        )
    return sample


def _batches(prepared: Prepared, size: int | None) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """Positional and keyword inputs split along the batch dimension into passes of at most
    ``size``."""
    import torch

    args, kwargs = tuple(prepared.args), dict(prepared.kwargs)
    total = prepared.batch_size
    if size is None or total <= size:
        return [(args, kwargs)]

    def part(value: Any, start: int) -> Any:
        is_batched = isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == total
        return value[start : start + size] if is_batched else value

    return [
        (tuple(part(v, s) for v in args), {k: part(v, s) for k, v in kwargs.items()})
        for s in range(0, total, size)
    ]


def _each_capture(*consumers: Callable[[Any], None] | None) -> Callable[[Any], None] | None:
    active = [c for c in consumers if c is not None]
    if not active:
        return None

    def call_all(capture: Any) -> None:
        for consumer in active:
            consumer(capture)

    return call_all


def _require_grad(prepared: Prepared) -> bool:
    """Floating inputs require grad (``--input-requires-grad``); False when there is none."""
    import torch

    floating = [
        t
        for t in [*prepared.args, *prepared.kwargs.values()]
        if isinstance(t, torch.Tensor) and t.is_floating_point()
    ]
    for tensor in floating:
        tensor.requires_grad_(True)
    return bool(floating)


def _embedding_requires_grad(model: Any) -> tuple[Any, str]:
    """Integer inputs (token ids) cannot require grad: the first embedding's output does
    instead, through a global hook that runs before fvis's own (global hooks run in the order
    they were registered), so its capture already sees it."""
    import torch

    from fvis.inputs import first_embedding

    found = first_embedding(model)
    if found is None:
        raise UsageError(
            "--input-requires-grad: the inputs are not floating point and the model has no "
            "embedding whose output could require grad instead"
        )
    name, embedding = found

    def hook(module: Any, _args: Any, output: Any) -> None:
        if module is embedding and isinstance(output, torch.Tensor) and not output.requires_grad:
            output.requires_grad_(True)

    where = name or "the model"
    note = f"--input-requires-grad: the input ids are integers, so {where}'s output requires grad"
    return torch.nn.modules.module.register_module_forward_hook(hook), note


def _backward(loaded: LoadedModel, result: Any, options: DumpOptions, sample: int | None) -> Any:
    if not (options.backward or options.gradcam):
        return None
    from fvis.backward import BackwardResult, run_backward

    if options.mode != "grad":
        return BackwardResult(
            "-",
            f"backward impossible: the forward ran with --mode {options.mode}; use --mode grad",
            {},
            (),
            {},
        )
    return run_backward(loaded.module, result, options.target, sample, options.target_position)


def _report_input(
    loaded: LoadedModel,
    prepared: Prepared,
    tree: ModelTree,
    options: DumpOptions,
    captures: Any,
    never_ran: Any,
    images: Any,
    verdicts: Any,
) -> Any:
    from fvis.report import ReportInput

    root = tree.layers[0]
    tensors = [*prepared.args, *prepared.kwargs.values()]
    return ReportInput(
        model={
            "file": loaded.source.label,
            "format": loaded.source.kind,
            "sha256": loaded.source.sha256,
            "class": root.class_name,
            "params": root.params,
            "trainable": root.trainable,
            "frozen": root.frozen,
            "notes": list(loaded.source.notes),
        },
        input={
            "description": prepared.description,
            "shapes": [list(getattr(t, "shape", ())) for t in tensors],
            "dtypes": [str(getattr(t, "dtype", "")).removeprefix("torch.") for t in tensors],
            "samples": list(prepared.labels),
            "tokens": [list(tokens) for tokens in prepared.tokens],
        },
        mode=options.mode,
        train=options.train,
        captures=captures,
        never_ran=never_ran,
        images=images,
        verdicts=verdicts,
    )


def _write_outputs(folder: Any, run: _DumpRun, options: DumpOptions) -> list[str]:
    import json

    from fvis.html import to_html
    from fvis.report import to_markdown

    report = run.report
    names = [*run.gallery.file_names(), "report.json", "report.md", "report.html"]
    if options.save_tensors:
        names.append("activations.safetensors")
    folder.check_names(names)
    run.gallery.write(folder)
    if options.save_tensors:
        from fvis.gallery import tensors_file

        folder.write_bytes("activations.safetensors", tensors_file(run.captures))
    folder.write_text("report.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    folder.write_text("report.md", to_markdown(report))
    folder.write_text("report.html", to_html(report, run.gallery.encoded))
    folder.commit({"report": "report.json"})
    return folder.written
