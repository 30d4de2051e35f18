"""Run the default ``fvis check`` (``fvis.api.check``) on a model built in memory.

The model is handed to the pipeline in place of a loaded file (``fvis.api.open_model``,
which ``fvis.dumping`` calls through the module):
loading is tested elsewhere; here the verdicts and gates are what is under test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import fvis.api as api
from fvis.gates import DEFAULT_GATES, parse_gates
from fvis.inputs import InputOptions
from fvis.loading import LoadedModel, LoadOptions, ModelSource


def default_check(
    monkeypatch: pytest.MonkeyPatch,
    model: nn.Module,
    inputs: InputOptions,
    **dump: Any,
) -> api.CheckResult:
    loaded = LoadedModel(model.eval(), ModelSource(Path("model.pt"), "state_dict"))
    monkeypatch.setattr(api, "open_model", lambda ref: loaded)
    ref = api.ModelRef(Path("model.pt"), LoadOptions())
    gates = api.CheckOptions(gates=parse_gates(DEFAULT_GATES))
    return api.check(ref, inputs, api.DumpOptions(**dump), gates)


def image(size: int = 64) -> InputOptions:
    return InputOptions(shape=(1, 3, size, size), seed=0)


def token_ids(folder: Path, length: int = 12, vocab: int = 100) -> InputOptions:
    path = folder / "ids.pt"
    torch.save(
        torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0)), path
    )
    return InputOptions(sources=(str(path),))


def failures_text(result: api.CheckResult) -> str:
    return "\n".join(f"{f.layer}: {f.gate}: {f.cause}" for f in result.failures)


def verdicts(result: api.CheckResult) -> dict[str, dict[str, Any]]:
    return {c["label"]: c["verdict"] for c in result.dump.report["captures"]}


def not_run(result: api.CheckResult) -> dict[str, dict[str, Any]]:
    return {e["layer"]: e for e in result.dump.report["not_run"]}
