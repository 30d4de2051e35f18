"""The pipeline as plain functions: ``load -> walk -> capture -> analyse -> render/report``.

The CLI maps options to these calls and nothing else; a notebook can call them directly.
"""

from __future__ import annotations

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

    @property
    def label(self) -> str:
        return str(self.path) if self.path else f"<{BUNDLED}>"


def resolve_model(
    path: Path | None, load: LoadOptions, cwd: Path | None = None
) -> tuple[ModelRef, Config | None]:
    """The model argument, else ``[tool.fvis]`` in ``cwd/pyproject.toml``, else the sample."""
    config = find_config(cwd or Path.cwd())
    if path is not None:
        return ModelRef(path, load), config
    if config is not None and config.model is not None:
        merged = LoadOptions(
            arch=load.arch or config.arch,
            arch_kwargs=load.arch_kwargs or config.arch_kwargs,
            allow_modules=load.allow_modules or config.allow_modules,
            trust=load.trust,
            strict=load.strict,
        )
        return ModelRef(config.model, merged, f"{config.file} [tool.fvis]"), config
    if load.arch:
        raise UsageError("--arch needs a MODEL file to load weights from")
    return ModelRef(None, load, BUNDLED), config


def open_model(ref: ModelRef) -> LoadedModel:
    """Load the referenced model, ready to run (safely; see ``fvis.loading``)."""
    if ref.path is None:
        from fvis.sample import build_sample

        return LoadedModel(build_sample(), ModelSource(None, "bundled", "", (BUNDLED,)))
    return load_model(ref.path, ref.load)


def model_tree(ref: ModelRef) -> ModelTree:
    """The module tree without running anything or reading tensor data."""
    if ref.path is None:
        from fvis.sample import build_sample

        return ModelTree.of(node_from_module(build_sample()), BUNDLED)
    return inspect_model(ref.path, ref.load)


def list_layers(ref: ModelRef, inputs: InputOptions | None = None) -> Listing:
    """The module tree; with ``inputs``, one forward pass adds calls and output shapes.

    >>> listing = list_layers(resolve_model(None, LoadOptions())[0])    # doctest: +SKIP
    >>> [i.name for i in listing.tree.layers][:3]
    ['', 'inner', 'inner.linear']
    """
    if inputs is None:
        tree = model_tree(ref)
        return Listing(tree, ref.label, _format_of(ref))
    loaded = open_model(ref)
    prepared = prepare_inputs(loaded, inputs)
    runs = trace_runs(loaded, prepared)
    tree = ModelTree.of(node_from_module(loaded.module), "; ".join(loaded.source.notes))
    return Listing(tree, ref.label, loaded.source.kind, runs, prepared.description)


def _format_of(ref: ModelRef) -> str:
    if ref.path is None:
        return "bundled"
    from fvis.formats import sniff

    return sniff(ref.path).kind.value


def prepare_inputs(loaded: LoadedModel, inputs: InputOptions) -> Prepared:
    from fvis.inputs import prepare
    from fvis.sample import SAMPLE_INPUT_SHAPE

    if loaded.source.path is None and not inputs.sources and not inputs.shape:
        from dataclasses import replace

        inputs = replace(inputs, shape=SAMPLE_INPUT_SHAPE)
    return prepare(loaded.module, inputs)


def trace_runs(loaded: LoadedModel, prepared: Prepared) -> dict[str, LayerRuns]:
    """Calls and output shapes of every module, from one forward pass under ``no_grad``."""
    from fvis.capture import Mode, capture

    result = capture(loaded.module, _call_args(prepared), [], mode=Mode.INFERENCE)
    runs: dict[str, LayerRuns] = {}
    for record in result.trace:
        previous = runs.get(record.name)
        shapes = previous.output_shapes if previous else record.output_shapes
        runs[record.name] = LayerRuns(record.call, shapes)
    return runs


def _call_args(prepared: Prepared) -> Any:
    return prepared.kwargs if prepared.kwargs and not prepared.args else prepared.args
