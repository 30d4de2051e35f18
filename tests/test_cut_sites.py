"""Grad verdicts name the source line that cut the graph (issue 15): ``cut_at`` in report.json.

Each model below marks its cutting line with a ``# cut:`` comment; the expected line number is
found by searching this file for the marker, never written down. Ground truth that the graph
really is cut there comes from ``torch.autograd.grad`` on an independent forward hook.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from fvis.api import DumpOptions, check_module
from fvis.capture import capture
from fvis.grads import diagnose
from sample_models import zoo as zoo_module
from sample_models.zoo import SAMPLES, build, example_input
from tests.conftest import RunCli

HERE = Path(__file__).resolve()


def _marker_line(marker: str, source: str | None = None) -> int:
    """The one line of this file (or of ``source``) carrying ``# cut: marker``."""
    lines = source.splitlines() if source is not None else HERE.read_text().splitlines()
    found = [i for i, text in enumerate(lines, 1) if text.rstrip().endswith(f"# cut: {marker}")]
    assert len(found) == 1, (marker, found)
    return found[0]


class Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        feats = self.inner(x).detach()  # cut: detach
        return self.head(feats)


class DataUser(Wrapper):
    def forward(self, x: Tensor) -> Tensor:
        feats = self.inner(x).data  # cut: data
        return self.head(feats)


def _frozen_features(module: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():  # cut: no_grad
        return module(x)


class HelperNoGrad(Wrapper):
    def forward(self, x: Tensor) -> Tensor:
        return self.head(_frozen_features(self.inner, x))


@torch.no_grad()
def _decorated_features(module: nn.Module, x: Tensor) -> Tensor:
    return module(x)


class DecoratedNoGrad(Wrapper):
    def forward(self, x: Tensor) -> Tensor:
        feats = _decorated_features(self.inner, x)  # cut: decorated
        return self.head(feats)


class GradSwitchedOff(Wrapper):
    def forward(self, x: Tensor) -> Tensor:
        torch.set_grad_enabled(False)  # cut: set_grad_enabled
        feats = self.inner(x)
        torch.set_grad_enabled(True)
        return self.head(feats)


class InferenceInside(Wrapper):
    def forward(self, x: Tensor) -> Tensor:
        with torch.inference_mode():  # cut: inference
            feats = self.inner(x)
        return self.head(feats.clone())


class ItemRoundTrip(Wrapper):
    def forward(self, x: Tensor) -> Tensor:
        scale = torch.tensor(self.inner(x).mean().item())  # cut: item
        return self.head(x) * scale


class RequiresGradOff(nn.Module):
    """A fresh leaf (made every forward, so a second pass sees the same) passes through an
    Identity, then stops requiring grad: the Identity's output is cut off the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Identity()
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        bias = self.pre(torch.zeros(x.shape[-1], requires_grad=True))
        bias.requires_grad_(False)  # cut: requires_grad
        return self.head(x + bias)


# model, captured layer, marker, op named, function qualname
CASES = [
    (Wrapper, "inner", "detach", ".detach()", "Wrapper.forward"),
    (DataUser, "inner", "data", ".data", "DataUser.forward"),
    (HelperNoGrad, "inner", "no_grad", "torch.no_grad()", "_frozen_features"),
    (DecoratedNoGrad, "inner", "decorated", "@torch.no_grad()", "DecoratedNoGrad.forward"),
    (
        GradSwitchedOff,
        "inner",
        "set_grad_enabled",
        "torch.set_grad_enabled(False)",
        "GradSwitchedOff.forward",
    ),
    (InferenceInside, "inner", "inference", "torch.inference_mode()", "InferenceInside.forward"),
    (ItemRoundTrip, "inner", "item", ".item()", "ItemRoundTrip.forward"),
    (RequiresGradOff, "pre", "requires_grad", ".requires_grad_(False)", "RequiresGradOff.forward"),
]
IDS = [case[0].__name__ for case in CASES]


def _really_cut(model: nn.Module, layer: str) -> bool:
    """Ground truth: no gradient from the output reaches the layer's output (or it has none)."""
    seen: list[Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        out = model(torch.randn(2, 4))
    finally:
        handle.remove()
    if not seen[0].requires_grad:
        return True
    return torch.autograd.grad(out.sum(), seen[0], allow_unused=True)[0] is None


def _assert_names_line(cut_at: dict[str, Any] | None, marker: str, op: str, function: str) -> None:
    assert cut_at is not None
    assert Path(cut_at["file"]).resolve() == HERE
    assert cut_at["line"] == _marker_line(marker)
    assert cut_at["function"] == function and cut_at["op"] == op
    assert cut_at["library"] is False


@pytest.mark.parametrize(("cls", "layer", "marker", "op", "function"), CASES, ids=IDS)
def test_api_verdict_names_the_cutting_line(
    cls: type[nn.Module], layer: str, marker: str, op: str, function: str
) -> None:
    assert _really_cut(cls(), layer)
    result = check_module(cls(), [torch.randn(2, 4)], DumpOptions(layers=(layer,), images=False))
    verdict = {c["label"]: c["verdict"] for c in result.dump.report["captures"]}[layer]
    assert not verdict["connected"]
    _assert_names_line(verdict["cut_at"], marker, op, function)
    where = f"{Path(verdict['cut_at']['file'])}:{_marker_line(marker)} in {function}"
    assert f"graph cut by {op} at {where}" in verdict["summary"]
    assert not result.passed  # a cut in the user's code still fails the default gate


@pytest.mark.parametrize(("cls", "layer", "marker", "op", "function"), CASES, ids=IDS)
def test_cli_report_json_carries_cut_at(
    cls: type[nn.Module],
    layer: str,
    marker: str,
    op: str,
    function: str,
    cli: RunCli,
    tmp_path: Path,
) -> None:
    weights, out = tmp_path / "w.pt", tmp_path / "out"
    torch.save(cls().state_dict(), weights)
    arch = f"{HERE}:{cls.__name__}"
    code, _, stderr = cli(
        "dump", weights, "--arch", arch, "--shape", "2,4", "--layer", layer, "--out", out
    )
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    verdict = {c["label"]: c["verdict"] for c in report["captures"]}[layer]
    _assert_names_line(verdict["cut_at"], marker, op, function)


def test_connected_layers_carry_no_cut_at() -> None:
    result = check_module(Wrapper(), [torch.randn(2, 4)], DumpOptions(layers=("head",)))
    verdict = result.dump.report["captures"][0]["verdict"]
    assert verdict["connected"] and verdict["cut_at"] is None


ZOO = Path(zoo_module.__file__).resolve()
_CUT_CAUSES = {"cut-inside", "cut-downstream", "grad-off", "inference"}


@pytest.mark.parametrize("name", list(SAMPLES))
def test_every_cut_verdict_on_the_sample_zoo_names_its_source_line(name: str) -> None:
    """Every leaf of every sample: a verdict that blames a cut names a line of zoo.py whose
    text is the cut (``.detach()`` or a ``no_grad`` block)."""
    model = build(name)
    result = check_module(model, [example_input(name)], DumpOptions(images=False))
    for entry in result.dump.report["captures"]:
        verdict = entry["verdict"]
        if verdict["cause"] not in _CUT_CAUSES:
            assert verdict["cut_at"] is None, entry["label"]
            continue
        cut_at = verdict["cut_at"]
        assert cut_at is not None, entry["label"]
        assert Path(cut_at["file"]).resolve() == ZOO, entry["label"]
        line = ZOO.read_text().splitlines()[cut_at["line"] - 1]
        assert ".detach()" in line or "with torch.no_grad():" in line, (entry["label"], line)
        cls_name, method = cut_at["function"].split(".")
        lines, first = inspect.getsourcelines(getattr(getattr(zoo_module, cls_name), method))
        assert first <= cut_at["line"] < first + len(lines)  # inside the function named


def test_zoo_cut_samples_name_the_exact_line() -> None:
    """The three cut samples, against the zoo's own source (searched, not written down)."""
    from sample_models import zoo

    expected = {
        "detach_inner": (zoo.DetachingInner, "return out.detach()", "inner.relu"),
        "frozen_nograd": (zoo.FrozenTransfer, "with torch.no_grad():", "backbone.relu"),
        "shared_mixed": (zoo.SharedMixed, "with torch.no_grad():", "shared#2"),
    }
    for name, (cls, text, label) in expected.items():
        lines, first = inspect.getsourcelines(cls.forward)
        line = first + next(i for i, t in enumerate(lines) if t.strip() == text)
        layer = label.split("#")[0]
        verdicts = diagnose(capture(build(name), [example_input(name)], [layer], watch_ops=True))
        site = verdicts[label].cut_at
        assert site is not None and site.line == line, name
        assert site.function == f"{cls.__name__}.forward"


LIBRARY = """
import torch
from torch import nn


class Proposals(nn.Module):
    def __init__(self):
        super().__init__()
        self.score = nn.Linear(4, 4)

    def forward(self, x):
        return self.score(x).detach()  # cut: library


class Detector(nn.Module):
    def __init__(self):
        super().__init__()
        self.rpn = Proposals()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.rpn(x))
"""


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = tmp_path / "site-packages"  # where an installed library's code lives
    site.mkdir()
    (site / "fakedet_cuts.py").write_text(LIBRARY)
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop("fakedet_cuts", None)


def test_a_cut_in_library_code_is_marked_library_and_passes_the_gate(installed: Path) -> None:
    import fakedet_cuts

    result = check_module(
        fakedet_cuts.Detector(), [torch.randn(2, 4)], DumpOptions(layers=("rpn.score",))
    )
    verdict = result.dump.report["captures"][0]["verdict"]
    cut_at = verdict["cut_at"]
    assert cut_at is not None and cut_at["library"] is True and verdict["library"] is True
    assert Path(cut_at["file"]).resolve() == (installed / "fakedet_cuts.py").resolve()
    assert cut_at["line"] == _marker_line("library", LIBRARY)
    assert cut_at["function"] == "Proposals.forward" and cut_at["op"] == ".detach()"
    assert result.passed  # by design in installed code: the default gate passes
