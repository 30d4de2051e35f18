"""The pipeline as plain functions: ``load -> walk -> capture -> analyse -> render/report``.

The CLI maps options to these calls and nothing else; a notebook can call them directly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fvis.config import Config, find_config
from fvis.errors import UsageError
from fvis.layers import ModelTree, node_from_module
from fvis.listing import LayerRuns, Listing
from fvis.loading import LoadedModel, LoadOptions, ModelSource, inspect_model, load_model

if TYPE_CHECKING:
    from fvis.inputs import InputOptions, Prepared

BUNDLED = "bundled sample inner_outer"


@dataclass(frozen=True)
class ModelRef:
    """Which model to use: a file, or the bundled sample (``path is None``)."""

    path: Path | None
    load: LoadOptions = field(default_factory=LoadOptions)
    origin: str = ""  # "" (the argument), "pyproject.toml [tool.fvis]" or BUNDLED
    module: Any = field(default=None, compare=False)  # a live nn.Module (check_module)

    @property
    def label(self) -> str:
        if self.module is not None:
            return f"<live {type(self.module).__name__}>"
        return str(self.path) if self.path else f"<{BUNDLED}>"


def resolve_model(
    path: Path | None, load: LoadOptions, cwd: Path | None = None
) -> tuple[ModelRef, Config | None]:
    """The model argument, else ``[tool.fvis]`` in ``cwd/pyproject.toml``, else the sample.

    With a model argument the config is not read at all: a broken pyproject elsewhere in the
    repository must not break ``fvis layers model.pt``.
    """
    if path is not None:
        return ModelRef(path, load), None
    config = find_config(cwd or Path.cwd())
    if config is not None and config.model is not None:
        merged = dataclasses.replace(
            load,
            arch=load.arch or config.arch,
            arch_kwargs=load.arch_kwargs or config.arch_kwargs,
            allow_modules=load.allow_modules or config.allow_modules,
            arch_config=config.file if config.arch and not load.arch else None,
            allow_modules_config=(
                config.file if config.allow_modules and not load.allow_modules else None
            ),
        )
        return ModelRef(config.model, merged, f"{config.file} [tool.fvis]"), config
    if load.arch:
        raise UsageError("--arch needs a MODEL file to load weights from")
    return ModelRef(None, load, BUNDLED), config


def open_model(ref: ModelRef) -> LoadedModel:
    """Load the referenced model, ready to run (safely; see ``fvis.loading``)."""
    if ref.module is not None:
        return LoadedModel(ref.module, ModelSource(None, "live module", "", ()))
    if ref.path is None:
        from fvis.sample import build_sample

        sample = LoadedModel(build_sample(), ModelSource(None, "bundled", "", (BUNDLED,)))
        if ref.load.big is None:
            return sample
        from fvis.big import dispatch

        module, note = dispatch(sample.module, ref.load.big)
        return LoadedModel(module, ModelSource(None, "bundled", "", (BUNDLED, note)))
    return load_model(ref.path, ref.load)


def model_tree(ref: ModelRef) -> ModelTree:
    """The module tree without running anything or reading tensor data."""
    if ref.path is None:
        from fvis.sample import build_sample

        return ModelTree.of(node_from_module(build_sample()), BUNDLED)
    return inspect_model(ref.path, ref.load)


def list_layers(ref: ModelRef, inputs: InputOptions | None = None, ops: bool = False) -> Listing:
    """The module tree; with ``inputs``, one forward pass adds calls and output shapes (and
    with ``ops`` every tensor op inside the forwards, ``fvis.ops``).

    >>> listing = list_layers(resolve_model(None, LoadOptions())[0])    # doctest: +SKIP
    >>> [i.name for i in listing.tree.layers][:3]
    ['', 'inner', 'inner.linear']
    """
    if inputs is None:
        tree = model_tree(ref)
        return Listing(tree, ref.label, tree.kind or "bundled")
    loaded = open_model(ref)
    prepared = prepare_inputs(loaded, inputs)
    runs, op_records = trace_runs(loaded, prepared, ops)
    tree = ModelTree.of(node_from_module(loaded.module), "; ".join(loaded.source.notes))
    listing = Listing(tree, ref.label, loaded.source.kind, runs, prepared.description)
    return dataclasses.replace(listing, ops=op_records) if ops else listing


def prepare_inputs(loaded: LoadedModel, inputs: InputOptions) -> Prepared:
    from fvis.inputs import MAX_SHAPE_ELEMENTS, prepare
    from fvis.pt2 import check_example_inputs
    from fvis.sample import SAMPLE_INPUT_SHAPE

    if inputs.texts:
        from fvis.prompts import prepare_text

        return prepare_text(loaded.module, loaded.source.path, inputs)
    if loaded.source.path is None and not inputs.sources and not inputs.shape:
        inputs = dataclasses.replace(inputs, shape=SAMPLE_INPUT_SHAPE)
    if not inputs.sources and not inputs.shape:  # the program's own shapes get synthesized
        check_example_inputs(loaded.source.label, loaded.source.example_inputs, MAX_SHAPE_ELEMENTS)
    return prepare(loaded.module, inputs, loaded.source.example_inputs)


def trace_runs(
    loaded: LoadedModel, prepared: Prepared, ops: bool = False
) -> tuple[dict[str, LayerRuns], tuple[Any, ...]]:
    """Calls and output shapes of every module, from one forward pass under inference mode,
    and with ``ops`` every tensor op (``fvis.records.OpRecord``), listed but not captured."""
    from fvis.capture import Mode, capture

    result = capture(
        loaded.module,
        prepared.args,
        [],
        mode=Mode.INFERENCE,
        kwargs=prepared.kwargs,
        ops=ops,
        every_op=False,
    )
    runs: dict[str, LayerRuns] = {}
    for record in result.trace:
        previous = runs.get(record.name)
        shapes = previous.output_shapes if previous else record.output_shapes
        runs[record.name] = LayerRuns(record.call, shapes)
    return runs, result.ops


# The dump and check pipelines live in their own modules; they are part of this API.
from fvis.checking import CheckOptions, CheckResult, check, check_module  # noqa: E402
from fvis.dumping import DumpOptions, DumpResult, choose_layers, dump  # noqa: E402

__all__ = [
    "BUNDLED",
    "CheckOptions",
    "CheckResult",
    "DumpOptions",
    "DumpResult",
    "ModelRef",
    "check",
    "check_module",
    "choose_layers",
    "dump",
    "list_layers",
    "model_tree",
    "open_model",
    "prepare_inputs",
    "resolve_model",
    "trace_runs",
]
