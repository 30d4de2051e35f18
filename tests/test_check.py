"""``fvis check`` end to end: every gate fails on a model that violates it and passes on one
that does not, expectations, baselines, ``[tool.fvis]`` discovery, JUnit, the GitHub step
summary, ``--json`` and ``--images``.

Models are state dicts saved once per module in a temporary folder and loaded with ``--arch``:
the zoo samples, plus ``cases.py`` (written below) for NaN/Inf, dead ReLUs, hostile names and
variants of inner_outer (wider, detaching, with an extra layer).
"""

from __future__ import annotations

import errno
import json
import os
import re
import runpy
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from markdown_it import MarkdownIt

from fvis.text import for_terminal_plain

HOSTILE_NAMES = [
    "\x00nul",
    "\x1b[31mred",
    "\x7fdel",
    "\x85nel",
    "\ufffe",
    "]]>&<\"'",
    "tab\there",
]

CASES_PY = '''
import torch
from torch import nn

HOSTILE_NAMES = @HOSTILE_NAMES@


class Inner(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.linear = nn.Linear(10, hidden)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.linear(x))


class Outer(nn.Module):
    """inner_outer's layout (and state-dict keys) with a configurable width."""

    def __init__(self, hidden=5):
        super().__init__()
        self.inner = Inner(hidden)
        self.linear_out = nn.Linear(hidden, 2)

    def forward(self, x):
        return self.linear_out(self.inner(x))


class DetachedOuter(Outer):
    def forward(self, x):
        return self.linear_out(self.inner(x).detach())


class OuterExtra(Outer):
    def __init__(self, hidden=5):
        super().__init__(hidden)
        self.extra = nn.ReLU()  # after a ReLU: the values, so linear_out's, stay the same

    def forward(self, x):
        return self.linear_out(self.extra(self.inner(x)))


class OuterSkip(OuterExtra):
    def forward(self, x):
        return self.linear_out(self.inner(x))  # self.extra never runs


class LogNeg(nn.Module):
    def forward(self, x):
        return torch.log(-x.abs() - 1)  # NaN everywhere


class DivZero(nn.Module):
    def forward(self, x):
        return x / 0  # +Inf and -Inf


def nonfinite(kind="log"):
    """linear -> act -> head, where act makes NaN ("log"), +-Inf ("div") or nothing ("ok")."""
    model = nn.Sequential()
    model.add_module("linear", nn.Linear(4, 4))
    model.add_module("act", {"log": LogNeg, "div": DivZero, "ok": nn.Tanh}[kind]())
    model.add_module("head", nn.Linear(4, 2))
    return model


class DeadNet(nn.Module):
    """1x1 conv -> ReLU -> pooled head; the state dict sets the biases that kill channels."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.relu = nn.ReLU()
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.relu(self.conv(x)).mean((2, 3)))


class Hostile(nn.Module):
    """NaN first, then Linears named with control characters: every capture fails nonfinite."""

    def __init__(self):
        super().__init__()
        self.add_module("log", LogNeg())
        for name in HOSTILE_NAMES:
            self.add_module(name, nn.Linear(4, 4))

    def forward(self, x):
        for module in self._modules.values():
            x = module(x)
        return x
'''.replace("@HOSTILE_NAMES@", repr(HOSTILE_NAMES))

# name -> (state dict file, arch, shape, arch kwargs); "cases.py:" archs live in the folder.
SPECS: dict[str, tuple[str, str, str, str | None]] = {
    "inner_outer": ("inner_outer.pt", "fvis.sample:OuterModel", "1,10", None),
    "nested_cnn": ("nested_cnn.pt", "sample_models.zoo:Classifier", "1,3,32,32", None),
    "detach_inner": ("detach_inner.pt", "sample_models.zoo:DetachOuter", "1,10", None),
    "frozen_nograd": ("frozen_nograd.pt", "sample_models.zoo:FrozenTransfer", "1,10", None),
    "never_runs": ("never_runs.pt", "sample_models.zoo:NeverRuns", "1,10", None),
    "stores_inplace": ("stores_inplace.pt", "sample_models.zoo:StoresInplace", "1,10", None),
    "nan_log": ("nonfinite.pt", "cases.py:nonfinite", "1,4", '{"kind": "log"}'),
    "nan_div": ("nonfinite.pt", "cases.py:nonfinite", "1,4", '{"kind": "div"}'),
    "nan_ok": ("nonfinite.pt", "cases.py:nonfinite", "1,4", '{"kind": "ok"}'),
    "dead": ("dead.pt", "cases.py:DeadNet", "1,3,8,8", None),
    "hostile": ("hostile.pt", "cases.py:Hostile", "1,4", None),
}

RunCli = Callable[..., tuple[int, str, str]]  # the `cli` fixture: (exit code, stdout, stderr)

FAIL_RE = re.compile(
    r"^FAIL (?P<layer>.+?): (?P<gate>[a-z-]+(?::[a-z0-9.-]+)?): (?P<cause>.+?)"
    r"(?: \(hint: (?P<hint>.+)\))?$"
)
FAILED_RE = re.compile(r"^fvis check failed: (\d+) of (\d+) checks \((\d+) captures?\)$", re.M)


@dataclass(frozen=True)
class Models:
    folder: Path

    def arch(self, name: str) -> str:
        """``cases.py:X`` as an absolute path, anything else unchanged."""
        return str(self.folder / name) if name.startswith("cases.py:") else name

    def args(self, key: str, *, weights: Path | None = None, arch: str | None = None) -> list[str]:
        """MODEL --arch ... --shape ... for a model in SPECS (optionally other weights/arch)."""
        file, default_arch, shape, kwargs = SPECS[key]
        args = [str(weights or self.folder / file), "--arch", self.arch(arch or default_arch)]
        return [*args, "--shape", shape, *(["--arch-kwargs", kwargs] if kwargs else [])]

    def state(self, key: str) -> dict[str, torch.Tensor]:
        """The saved state dict of a model in SPECS (a fresh copy, free to change)."""
        return torch.load(self.folder / SPECS[key][0], weights_only=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    """State dicts for every model in SPECS (under a second), and cases.py beside them."""
    from sample_models.zoo import build

    folder = tmp_path_factory.mktemp("check_models")
    (folder / "cases.py").write_text(CASES_PY)
    cases = runpy.run_path(str(folder / "cases.py"))
    zoo = ("inner_outer", "nested_cnn", "detach_inner", "frozen_nograd", "never_runs")
    for name in (*zoo, "stores_inplace"):
        torch.save(build(name).state_dict(), folder / f"{name}.pt")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(cases["nonfinite"]().state_dict(), folder / "nonfinite.pt")
        torch.save(cases["Hostile"]().state_dict(), folder / "hostile.pt")
        torch.save(cases["Outer"](6).state_dict(), folder / "outer6.pt")
        dead = cases["DeadNet"]()
        with torch.no_grad():
            dead.conv.bias[:6] = -100.0  # 6 of 8 channels can never be positive
            dead.conv.bias[6:] = 1.0
        torch.save(dead.state_dict(), folder / "dead.pt")
    return Models(folder)


@pytest.fixture(autouse=True)
def _in_empty_folder(chdir: Path) -> None:
    """Every test runs in an empty tmp_path: no pyproject.toml unless the test writes one."""


def _fails(stdout: str) -> list[tuple[str, str, str, str]]:
    """(layer, gate, cause, hint) of every FAIL line; each line must have that shape."""
    lines = [line for line in stdout.splitlines() if line.startswith("FAIL ")]
    matches = [FAIL_RE.match(line) for line in lines]
    assert all(matches), lines
    return [(m["layer"], m["gate"], m["cause"], m["hint"] or "") for m in matches if m]


def _save(path: Path, state: dict[str, torch.Tensor]) -> Path:
    torch.save(state, path)
    return path


def _scaled(state: dict[str, torch.Tensor], key: str, factor: float) -> dict[str, torch.Tensor]:
    return {k: v * factor if k == key else v.clone() for k, v in state.items()}


# --------------------------------------------------------------------------- each gate

# (id, model, extra args, the failing (layer, gate) pairs, a fragment of every cause)
FAILING = [
    ("missing", "inner_outer", ["-l", "inner.relu", "-l", "nope"], {("nope", "missing")},
     "no such layer"),
    ("not-run", "never_runs", ["--fail-on", "not-run", "-l", "skipped", "-l", "direct"],
     {("skipped", "not-run"), ("direct", "not-run")}, "asked for but "),
    ("disconnected-detach", "detach_inner", [],
     {("inner.linear", "disconnected"), ("inner.relu", "disconnected")},
     "inner (DetachingInner.forward) detaches a value computed from it"),
    ("disconnected-no-grad", "frozen_nograd", ["--fail-on", "disconnected"],
     {("backbone.linear", "disconnected"), ("backbone.relu", "disconnected")},
     "ran under no_grad inside FrozenTransfer.forward"),
    ("grad-off-no-grad-block", "frozen_nograd", ["--fail-on", "grad-off"],
     {("backbone.linear", "grad-off"), ("backbone.relu", "grad-off")}, "grad mode off"),
    ("grad-off-mode-no-grad", "inner_outer", ["--fail-on", "grad-off", "--mode", "no-grad"],
     {("inner.linear", "grad-off"), ("inner.relu", "grad-off"), ("linear_out", "grad-off")},
     "--mode no-grad"),
    ("grad-off-mode-inference", "inner_outer", ["--fail-on", "grad-off", "--mode", "inference"],
     {("inner.linear", "grad-off"), ("inner.relu", "grad-off"), ("linear_out", "grad-off")},
     "inference mode"),
    ("inplace-relu-after-bn", "nested_cnn", ["--fail-on", "inplace"],
     {("backbone.bn1", "inplace"), ("backbone.layer1.0.bn2", "inplace")},
     "modified in place after capture (NativeBatchNormBackward0"),
    ("inplace-stored", "stores_inplace", ["--fail-on", "inplace"], {("inner.act", "inplace")},
     "(GeluBackward0 -> MulBackward0)"),
    ("nonfinite-nan", "nan_log", [], {("act", "nonfinite"), ("head", "nonfinite")}, "NaN "),
    ("nonfinite-inf", "nan_div", ["-l", "act"], {("act", "nonfinite")}, "NaN 0, +Inf "),
    ("dead", "dead", ["--fail-on", "dead:0.5"], {("relu", "dead:0.5")},
     "6 of 8 channels are all zero (75%)"),
    ("no-grad-flow", "detach_inner", ["--fail-on", "no-grad-flow"],
     {("inner.linear", "no-grad-flow")}, "none of its 2 trainable parameter tensors"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("model", "extra", "expected", "cause"),
    [case[1:] for case in FAILING],
    ids=[case[0] for case in FAILING],
)
def test_gate_fails_on_a_model_that_violates_it(
    cli: RunCli,
    models: Models,
    model: str,
    extra: list[str],
    expected: set[tuple[str, str]],
    cause: str,
) -> None:
    code, stdout, stderr = cli("check", *models.args(model), *extra)
    assert code == 1, stderr
    fails = _fails(stdout)
    pairs = [(layer, gate) for layer, gate, _, _ in fails]
    assert len(pairs) == len(set(pairs)), "exactly one FAIL line per failure"
    assert set(pairs) == expected
    for _layer, _gate, text, hint in fails:
        assert cause in text
        assert hint, "every gate failure carries a hint"
    summary = FAILED_RE.search(stdout)
    assert summary is not None, stdout
    assert int(summary[1]) == len(expected) <= int(summary[2])


PASSING = [
    ("missing", "inner_outer", ["-l", "inner.relu", "--fail-on", "missing"]),
    ("not-run", "inner_outer", ["--fail-on", "not-run"]),
    ("not-run-only-requested", "never_runs", ["-l", "trunk", "-l", "relu"]),
    ("disconnected", "inner_outer", ["--fail-on", "disconnected"]),
    ("grad-off", "inner_outer", ["--fail-on", "grad-off"]),
    ("grad-off-cut-with-grad-on", "detach_inner", ["--fail-on", "grad-off"]),
    ("inplace", "inner_outer", ["--fail-on", "inplace"]),
    ("inplace-not-a-default-gate", "nested_cnn", []),
    ("nonfinite", "nan_ok", ["--fail-on", "nonfinite"]),
    ("dead", "nested_cnn", ["--fail-on", "dead:0"]),  # ReLUs with every channel alive
    ("no-grad-flow", "inner_outer", ["--fail-on", "no-grad-flow"]),
    ("no-grad-flow-frozen-is-fine", "frozen_nograd", ["--fail-on", "no-grad-flow"]),
]


@pytest.mark.parametrize(
    ("model", "extra"), [case[1:] for case in PASSING], ids=[case[0] for case in PASSING]
)
def test_gate_passes_on_a_model_that_does_not_violate_it(
    cli: RunCli, models: Models, model: str, extra: list[str]
) -> None:
    code, stdout, stderr = cli("check", *models.args(model), *extra)
    assert code == 0, stdout + stderr
    assert "FAIL" not in stdout
    assert re.search(r"^fvis check passed \(\d+ captures?\)$", stdout, re.M), stdout


def test_unknown_layer_without_the_missing_gate_is_a_usage_error(
    cli: RunCli, models: Models
) -> None:
    code, stdout, stderr = cli(
        "check", *models.args("inner_outer"), "-l", "nope", "--fail-on", "nonfinite"
    )
    assert code == 2
    assert "FAIL" not in stdout
    assert "no layer 'nope'" in stderr


@pytest.mark.parametrize(
    ("fraction", "code"), [("0", 1), ("0.5", 1), ("0.74", 1), ("0.75", 0), ("0.9", 0)]
)
def test_dead_gate_threshold_is_strictly_more_than_the_fraction(
    cli: RunCli, models: Models, fraction: str, code: int
) -> None:
    # 6 of 8 channels are dead (75%): "more than FRACTION" fails below 0.75 only.
    result, stdout, stderr = cli("check", *models.args("dead"), "--fail-on", f"dead:{fraction}")
    assert result == code, stdout + stderr
    expected = [("relu", f"dead:{float(fraction):g}")] if code else []
    assert [(layer, gate) for layer, gate, _, _ in _fails(stdout)] == expected


@pytest.mark.parametrize("spec", ["bogus", "dead", "dead:1", "dead:-0.1", "dead:x", "inplace:1"])
def test_bad_fail_on_is_a_usage_error(cli: RunCli, models: Models, spec: str) -> None:
    code, stdout, stderr = cli("check", *models.args("inner_outer"), "--fail-on", spec)
    assert code == 2
    assert stderr.startswith("fvis: error: ") and "FAIL" not in stdout


def test_no_grad_flow_after_a_no_grad_forward_is_a_failure_not_a_crash(
    cli: RunCli, models: Models
) -> None:
    code, stdout, _ = cli(
        "check", *models.args("inner_outer"), "--mode", "no-grad", "--fail-on", "no-grad-flow"
    )
    assert code == 1
    cause = "backward impossible: the forward ran with --mode no-grad; use --mode grad"
    assert _fails(stdout) == [("-", "no-grad-flow", cause, "")]


def test_check_writes_no_files_without_out(cli: RunCli, models: Models, tmp_path: Path) -> None:
    code, _, stderr = cli("check", *models.args("detach_inner"))
    assert code == 1, stderr
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- expectations


def test_expectations_make_an_intended_cut_pass(cli: RunCli, models: Models) -> None:
    args = models.args("frozen_nograd")
    assert cli("check", *args)[0] == 1  # without them, the frozen backbone fails
    code, stdout, stderr = cli(
        "check", *args, "--expect", "backbone.*=disconnected", "--expect", "head=connected"
    )
    assert code == 0, stdout + stderr
    assert "FAIL" not in stdout


def test_expectation_fails_when_the_layer_is_connected(cli: RunCli, models: Models) -> None:
    code, stdout, _ = cli(
        "check",
        *models.args("inner_outer"),
        "--expect",
        "inner.*=disconnected",
        "--expect",
        "linear_out=connected",
    )
    assert code == 1
    fails = _fails(stdout)
    assert [(f[0], f[1]) for f in fails] == [
        ("inner.linear", "expect:disconnected"),
        ("inner.relu", "expect:disconnected"),
    ]
    for _, _, cause, hint in fails:
        assert cause == "expected disconnected, got connected to the output"
        assert hint


@pytest.mark.parametrize(
    ("order", "failing"),
    [
        (["inner.*=disconnected", "inner.relu=connected"], ["inner.linear"]),
        (["inner.relu=connected", "inner.*=disconnected"], ["inner.linear", "inner.relu"]),
    ],
)
def test_the_last_matching_expectation_wins(
    cli: RunCli, models: Models, order: list[str], failing: list[str]
) -> None:
    args = [a for spec in order for a in ("--expect", spec)]
    code, stdout, _ = cli("check", *models.args("inner_outer"), *args)
    assert code == 1
    assert [f[0] for f in _fails(stdout)] == failing


def test_expectations_for_not_run_and_grad_off(cli: RunCli, models: Models) -> None:
    ok = cli(
        "check",
        *models.args("never_runs"),
        "--expect",
        "skipped=not-run",
        "--expect",
        "direct=not-run",
    )
    assert ok[0] == 0, ok
    code, stdout, _ = cli(
        "check",
        *models.args("never_runs"),
        "--expect",
        "direct=connected",
        "--expect",
        "trunk=not-run",
    )
    assert code == 1
    # `skipped` is not asked for by name (every leaf is taken): not called is no failure
    fails = [f[:3] for f in _fails(stdout)]
    assert [f[:2] for f in fails] == [("direct", "expect:connected"), ("trunk", "expect:not-run")]
    assert fails[0][2].startswith("not called as a module, but 2 of its 2 trainable")
    assert fails[1][2] == "expected not-run, got connected to the output"
    frozen = cli("check", *models.args("frozen_nograd"), "--expect", "backbone.*=grad-off")
    assert frozen[0] == 0, frozen
    code, stdout, _ = cli("check", *models.args("detach_inner"), "--expect", "inner.*=grad-off")
    assert code == 1  # a .detach() is a cut with grad mode on, not grad-off
    expected = "expected grad-off, got used, then detached"
    assert all(f[2].startswith(expected) for f in _fails(stdout))


@pytest.mark.parametrize("spec", ["inner.relu=bogus", "nostate", "=connected", "inner.relu="])
def test_bad_expect_is_a_usage_error(cli: RunCli, models: Models, spec: str) -> None:
    code, stdout, stderr = cli("check", *models.args("inner_outer"), "--expect", spec)
    assert code == 2
    assert "must look like 'PATTERN=STATE'" in stderr
    assert "hint: states: connected, disconnected, grad-off, not-run" in stderr
    assert "FAIL" not in stdout


# --------------------------------------------------------------------------- baselines


def _write_baseline(cli: RunCli, args: list[str], path: Path) -> Path:
    code, stdout, stderr = cli("check", *args, "--write-baseline", path, "--fail-on", "missing")
    assert code == 0, stdout + stderr
    return path


def test_baseline_round_trip_passes_and_the_file_is_clean_json(
    cli: RunCli, models: Models, tmp_path: Path
) -> None:
    folder = tmp_path / "ci"
    folder.mkdir()
    path = folder / "fvis-baseline.json"
    code, stdout, stderr = cli("check", *models.args("inner_outer"), "--write-baseline", path)
    assert code == 0, stdout + stderr
    assert [p.name for p in folder.iterdir()] == ["fvis-baseline.json"]  # no temp file left
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["schema"] == "fvis.baseline/1"
    assert data["input"] == "random normal (1, 10), seed 0"
    assert data["mode"] == "grad" and data["never_ran"] == []
    assert list(data["captures"]) == ["inner.linear", "inner.relu", "linear_out"]
    relu = data["captures"]["inner.relu"]
    assert (relu["shape"], relu["dtype"], relu["calls"]) == ([1, 5], "float32", 1)
    assert (relu["connected"], relu["cause"]) == (True, "connected")
    assert set(relu["stats"]) == {"mean", "std", "min", "max", "nan", "posinf", "neginf"}
    code, stdout, stderr = cli("check", *models.args("inner_outer"), "--baseline", path)
    assert code == 0, stdout + stderr
    assert "FAIL" not in stdout
    # rewriting replaces the file in place, again without leftovers
    _write_baseline(cli, models.args("inner_outer"), path)
    assert [p.name for p in folder.iterdir()] == ["fvis-baseline.json"]


def test_changed_weights_drift(cli: RunCli, models: Models, tmp_path: Path) -> None:
    baseline = _write_baseline(cli, models.args("inner_outer"), tmp_path / "b.json")
    scaled = _save(
        tmp_path / "scaled.pt", _scaled(models.state("inner_outer"), "linear_out.weight", 1.1)
    )
    args = models.args("inner_outer", weights=scaled)
    code, stdout, _ = cli("check", *args, "--baseline", baseline)
    assert code == 1
    fails = _fails(stdout)
    assert {f[:2] for f in fails} == {("linear_out", "baseline")}  # the inner layers held
    assert sorted(f[2].split()[0] for f in fails) == ["max", "mean", "min", "std"]
    assert all(" drifted: " in f[2] and "(rtol 0.001, atol 0.0001)" in f[2] for f in fails)
    # a looser tolerance accepts the 10% change
    code, stdout, _ = cli("check", *args, "--baseline", baseline, "--rtol", "0.5")
    assert code == 0, stdout


def test_rounding_noise_stays_within_tolerance(cli: RunCli, models: Models, tmp_path: Path) -> None:
    baseline = _write_baseline(cli, models.args("inner_outer"), tmp_path / "b.json")
    noisy = {k: v * (1 + 1e-7) for k, v in models.state("inner_outer").items()}
    args = models.args("inner_outer", weights=_save(tmp_path / "noisy.pt", noisy))
    code, stdout, _ = cli("check", *args, "--baseline", baseline)
    assert code == 0, stdout


def test_another_input_is_one_failure_not_a_drift_per_statistic(
    cli: RunCli, models: Models, tmp_path: Path
) -> None:
    baseline = _write_baseline(cli, models.args("inner_outer"), tmp_path / "b.json")
    code, stdout, _ = cli(
        "check", *models.args("inner_outer"), "--seed", "1", "--baseline", baseline
    )
    assert code == 1
    fails = _fails(stdout)
    assert [f[:2] for f in fails] == [("-", "baseline")]
    assert "input differs from the baseline's" in stdout and "drifted" not in stdout


def test_shape_change_fails(cli: RunCli, models: Models, tmp_path: Path) -> None:
    baseline = _write_baseline(cli, models.args("inner_outer"), tmp_path / "b.json")
    weights, arch = models.folder / "outer6.pt", "cases.py:Outer"
    wide = [
        *models.args("inner_outer", weights=weights, arch=arch),
        "--arch-kwargs",
        '{"hidden": 6}',
    ]
    code, stdout, stderr = cli("check", *wide, "--baseline", baseline)
    assert code == 1, stderr
    shapes = [f for f in _fails(stdout) if f[2].startswith("shape changed")]
    assert [(f[0], f[2]) for f in shapes] == [
        ("inner.linear", "shape changed: [1, 5] -> [1, 6]"),
        ("inner.relu", "shape changed: [1, 5] -> [1, 6]"),
    ]


def test_verdict_change_fails(cli: RunCli, models: Models, tmp_path: Path) -> None:
    baseline = _write_baseline(cli, models.args("inner_outer"), tmp_path / "b.json")
    # the same weights in a class whose forward detaches inner's output
    detached = models.args("inner_outer", arch="cases.py:DetachedOuter")
    code, stdout, _ = cli("check", *detached, "--baseline", baseline, "--fail-on", "nonfinite")
    assert code == 1
    fails = _fails(stdout)
    assert [f[0] for f in fails] == ["inner.linear", "inner.relu"]  # the values did not change
    for _, gate, cause, hint in fails:
        assert gate == "baseline"
        assert cause.startswith("verdict changed: connected -> ")
        assert "grad verdict" in hint


def test_layers_that_appear_or_disappear_fail(cli: RunCli, models: Models, tmp_path: Path) -> None:
    plain = models.args("inner_outer")
    extra = models.args("inner_outer", arch="cases.py:OuterExtra")  # same weights, + extra
    base_plain = _write_baseline(cli, plain, tmp_path / "plain.json")
    base_extra = _write_baseline(cli, extra, tmp_path / "extra.json")
    code, stdout, _ = cli("check", *extra, "--baseline", base_plain)
    assert code == 1
    assert [f[:3] for f in _fails(stdout)] == [
        ("extra", "baseline", "new capture not in the baseline")
    ]
    code, stdout, _ = cli("check", *plain, "--baseline", base_extra)
    assert code == 1
    assert [f[:3] for f in _fails(stdout)] == [("extra", "baseline", "capture disappeared")]


def test_a_layer_that_stops_running_fails(cli: RunCli, models: Models, tmp_path: Path) -> None:
    layers = ["-l", "extra", "-l", "linear_out", "--fail-on", "nonfinite"]
    extra = models.args("inner_outer", arch="cases.py:OuterExtra")
    baseline = _write_baseline(cli, [*extra, *layers], tmp_path / "b.json")
    skip = models.args("inner_outer", arch="cases.py:OuterSkip")
    code, stdout, _ = cli("check", *skip, *layers, "--baseline", baseline)
    assert code == 1
    assert {f[:3] for f in _fails(stdout)} == {
        ("extra", "baseline", "capture disappeared"),
        ("extra", "baseline", "ran in the baseline, never runs now"),
    }


def test_nan_count_change_fails(cli: RunCli, models: Models, tmp_path: Path) -> None:
    baseline = _write_baseline(cli, models.args("nan_ok"), tmp_path / "b.json")
    code, stdout, _ = cli(
        "check", *models.args("nan_log"), "--baseline", baseline, "--fail-on", "missing"
    )
    assert code == 1
    causes = {(f[0], f[2]) for f in _fails(stdout)}
    assert ("act", "nan count changed: 0 -> 4") in causes
    assert ("head", "nan count changed: 0 -> 2") in causes
    # a baseline of a NaN model is valid JSON (statistics null) and compares equal to itself
    nan_base = _write_baseline(cli, models.args("nan_log"), tmp_path / "nan.json")
    assert json.loads(nan_base.read_text())["captures"]["act"]["stats"]["mean"] is None
    code, stdout, _ = cli(
        "check", *models.args("nan_log"), "--baseline", nan_base, "--fail-on", "missing"
    )
    assert code == 0, stdout


def test_missing_baseline_file_is_exit_2_with_a_hint(
    cli: RunCli, models: Models, tmp_path: Path
) -> None:
    code, stdout, stderr = cli(
        "check", *models.args("inner_outer"), "--baseline", tmp_path / "nope.json"
    )
    assert code == 2  # a missing file is a usage error, as in the README's table
    assert "nope.json: no such baseline file" in stderr
    assert "hint: write one first with --write-baseline" in stderr
    assert "FAIL" not in stdout


@pytest.mark.parametrize(
    "text",
    ['{"schema": "fvis.report/1", "captures": {}}', "[1, 2]", "not json", ""],
    ids=["report-json", "list", "not-json", "empty"],
)
def test_a_file_that_is_not_a_baseline_is_exit_3(
    cli: RunCli, models: Models, tmp_path: Path, text: str
) -> None:
    path = tmp_path / "other.json"
    path.write_text(text)
    code, _, stderr = cli("check", *models.args("inner_outer"), "--baseline", path)
    assert code == 3
    assert "other.json is not" in stderr


def test_a_failed_baseline_write_keeps_the_old_file(
    cli: RunCli, models: Models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "b.json"
    path.write_text("old\n")

    def no_space(src: Any, dst: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    code, _, stderr = cli("check", *models.args("inner_outer"), "--write-baseline", path)
    assert code == 6
    assert "cannot write" in stderr and "No space left on device" in stderr
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["b.json"]  # the temp file was removed


# --------------------------------------------------------------------------- [tool.fvis]


def _project(folder: Path, models: Models, **extra: str) -> Path:
    """A project with models/m.pt (stores_inplace), data/x.pt and a [tool.fvis] table."""
    (folder / "models").mkdir()
    (folder / "data").mkdir()
    torch.save(models.state("stores_inplace"), folder / "models" / "m.pt")
    torch.save(torch.randn(1, 10, generator=torch.Generator().manual_seed(1)), folder / "data/x.pt")
    lines = [
        "[tool.fvis]",
        'model = "models/m.pt"',
        'arch = "sample_models.zoo:StoresInplace"',
        'input = "data/x.pt"',
        'layers = ["inner.*", "head"]',
        'fail-on = "missing,not-run,disconnected,nonfinite"',
        'expect = ["head=connected"]',
        *(f"{key} = {value}" for key, value in extra.items()),
    ]
    (folder / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return folder


def test_config_alone_runs_the_check(cli: RunCli, models: Models, chdir: Path) -> None:
    _project(chdir, models)
    code, stdout, stderr = cli("check", "--json")
    assert code == 0, stdout + stderr
    assert f"model {chdir / 'models' / 'm.pt'} from {chdir / 'pyproject.toml'} [tool.fvis]" in (
        stderr
    )
    report = json.loads(stdout)["report"]
    assert [c["label"] for c in report["captures"]] == ["inner.linear", "inner.act", "head"]
    assert report["input"]["description"] == "x.pt (torch tensor)"  # data/x.pt, not --shape
    assert report["check"]["checks"] == 5  # 2 layers x 2 gates + head's expectation


def test_flags_override_the_config(cli: RunCli, models: Models, chdir: Path) -> None:
    _project(chdir, models)
    code, stdout, _ = cli("check", "--fail-on", "inplace")  # the model stores and edits in place
    assert code == 1
    assert [f[:2] for f in _fails(stdout)] == [("inner.act", "inplace")]
    code, stdout, _ = cli("check", "--fail-on", "inplace", "-l", "head", "--json")
    assert code == 0, stdout
    assert [c["label"] for c in json.loads(stdout)["report"]["captures"]] == ["head"]
    code, stdout, _ = cli("check", "--expect", "head=disconnected")
    assert code == 1
    assert [f[:2] for f in _fails(stdout)] == [("head", "expect:disconnected")]


def test_config_fail_on_is_used_and_an_explicit_model_ignores_the_config(
    cli: RunCli, models: Models, chdir: Path
) -> None:
    _project(chdir, models)
    text = (chdir / "pyproject.toml").read_text().replace('"missing,', '"inplace,missing,')
    (chdir / "pyproject.toml").write_text(text)
    code, stdout, _ = cli("check")
    assert code == 1
    assert [f[:2] for f in _fails(stdout)] == [("inner.act", "inplace")]
    assert cli("check", "--fail-on", "nonfinite")[0] == 0
    code, stdout, stderr = cli("check", *models.args("nested_cnn"))  # not the config's model
    assert code == 0, stdout + stderr
    assert "[tool.fvis]" not in stderr


def test_config_with_shape_and_baseline(cli: RunCli, models: Models, chdir: Path) -> None:
    _project(chdir, models)
    toml = chdir / "pyproject.toml"
    toml.write_text(toml.read_text().replace('input = "data/x.pt"', 'shape = "2,10"'))
    (chdir / "ci").mkdir()
    assert cli("check", "--write-baseline", "ci/base.json", "-q")[0] == 0
    toml.write_text(toml.read_text() + 'baseline = "ci/base.json"\n')
    code, stdout, stderr = cli("check", "--json")
    assert code == 0, stdout + stderr
    assert json.loads(stdout)["report"]["input"]["description"] == "random normal (2, 10), seed 0"
    state = _scaled(models.state("stores_inplace"), "head.weight", 1.1)
    torch.save(state, chdir / "models" / "m.pt")
    code, stdout, _ = cli("check")
    assert code == 1
    assert {f[:2] for f in _fails(stdout)} == {("head", "baseline")}
    assert all("drifted" in f[2] for f in _fails(stdout))


def test_unknown_config_key_is_a_usage_error(cli: RunCli, models: Models, chdir: Path) -> None:
    _project(chdir, models, **{"fail_on": '"inplace"'})
    code, stdout, stderr = cli("check")
    assert code == 2
    assert "unknown key 'fail_on' in [tool.fvis]" in stderr
    assert "hint: known keys: model, arch" in stderr and "fail-on" in stderr
    assert "FAIL" not in stdout


def test_config_paths_resolve_against_the_pyproject_folder(
    models: Models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fvis.config import find_config

    project = tmp_path / "proj"
    project.mkdir()
    _project(project, models, baseline='"ci/base.json"')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = find_config(project)
    assert config is not None
    assert config.model == project / "models" / "m.pt"
    assert config.inputs == (str(project / "data" / "x.pt"),)
    assert config.baseline == project / "ci" / "base.json"


def test_cli_reads_config_paths_relative_to_its_folder(
    cli: RunCli, models: Models, chdir: Path
) -> None:
    # everything relative, the architecture a file beside the pyproject
    (chdir / "models").mkdir()
    (chdir / "net.py").write_text(CASES_PY)
    torch.save(models.state("nan_ok"), chdir / "models" / "n.pt")
    (chdir / "pyproject.toml").write_text(
        '[tool.fvis]\nmodel = "models/n.pt"\narch = "net.py:nonfinite"\n'
        'arch-kwargs = { kind = "ok" }\nshape = "1,4"\n'
    )
    code, stdout, stderr = cli("check")
    assert code == 0, stdout + stderr


def test_api_config_arch_file_resolves_against_the_pyproject_folder(
    models: Models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fvis.api import CheckOptions, DumpOptions, check, resolve_model
    from fvis.gates import parse_gates
    from fvis.inputs import InputOptions
    from fvis.loading import LoadOptions

    project = tmp_path / "proj"
    project.mkdir()
    (project / "net.py").write_text(CASES_PY)
    torch.save(models.state("nan_ok"), project / "n.pt")
    (project / "pyproject.toml").write_text(
        '[tool.fvis]\nmodel = "n.pt"\narch = "net.py:nonfinite"\narch-kwargs = { kind = "ok" }\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ref, _ = resolve_model(None, LoadOptions(), cwd=project)
    result = check(
        ref, InputOptions(shape=(1, 4)), DumpOptions(), CheckOptions(gates=parse_gates("nonfinite"))
    )
    assert result.passed


def test_config_keyword_input_resolves_against_the_pyproject_folder(
    models: Models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fvis.config import find_config

    project = tmp_path / "proj"
    project.mkdir()
    (project / "pyproject.toml").write_text('[tool.fvis]\ninput = ["mask=data/m.pt"]\n')
    monkeypatch.chdir(tmp_path)
    config = find_config(project)
    assert config is not None
    assert config.inputs == ("mask=" + str(project / "data" / "m.pt"),)


# --------------------------------------------------------------------------- JUnit


def _junit(path: Path) -> tuple[ET.Element, list[ET.Element]]:
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    suite = root.find("testsuite")
    assert suite is not None
    return suite, suite.findall("testcase")


def test_junit_counts_checks_and_failures(cli: RunCli, models: Models, tmp_path: Path) -> None:
    junit = tmp_path / "fvis-junit.xml"
    code, stdout, _ = cli("check", *models.args("nan_log"), "--junit", junit, "--json")
    assert code == 1
    payload = json.loads(stdout)
    suite, cases = _junit(junit)
    assert int(suite.get("tests", "")) == len(cases) == payload["report"]["check"]["checks"] == 6
    failed = [c for c in cases if c.find("failure") is not None]
    assert int(suite.get("failures", "")) == len(failed) == len(payload["failures"]) == 2
    assert sorted(c.get("name", "") for c in failed) == ["act [nonfinite]", "head [nonfinite]"]
    for case in failed:
        failure = case.find("failure")
        assert failure is not None
        assert failure.get("type") == "nonfinite"
        assert failure.get("message", "").startswith("NaN ")
        assert "hint: check the input scale" in (failure.text or "")
    # a passing run: every check a test case, none failed
    assert cli("check", *models.args("nan_ok"), "--junit", junit)[0] == 0
    suite, cases = _junit(junit)
    assert suite.get("failures") == "0" and int(suite.get("tests", "")) == len(cases) == 6
    assert all(c.find("failure") is None for c in cases)


def test_junit_includes_baseline_failures(cli: RunCli, models: Models, tmp_path: Path) -> None:
    baseline = _write_baseline(cli, models.args("inner_outer"), tmp_path / "b.json")
    scaled = _save(tmp_path / "s.pt", _scaled(models.state("inner_outer"), "inner.linear.bias", 2))
    junit = tmp_path / "j.xml"
    code, _, _ = cli(
        "check",
        *models.args("inner_outer", weights=scaled),
        "--baseline",
        baseline,
        "--junit",
        junit,
    )
    assert code == 1
    _, cases = _junit(junit)
    baseline_cases = [c for c in cases if c.get("classname") == "fvis.baseline"]
    assert baseline_cases, [c.get("name") for c in cases]
    for case in baseline_cases:
        messages = [f.get("message", "") for f in case.findall("failure")]
        assert messages and all("drifted" in m or "changed" in m for m in messages)


def test_junit_survives_hostile_layer_names(cli: RunCli, models: Models, tmp_path: Path) -> None:
    junit = tmp_path / "j.xml"
    code, stdout, _ = cli(
        "check", *models.args("hostile"), "--junit", junit, "--fail-on", "nonfinite"
    )
    assert code == 1
    assert len(_fails(stdout)) == len(HOSTILE_NAMES) + 1  # NaN from the first layer on
    suite, cases = _junit(junit)  # parses: no raw control characters in the XML
    names = {c.get("name", "") for c in cases}
    for name in HOSTILE_NAMES:
        assert f"{for_terminal_plain(name)} [nonfinite]" in names
    text = junit.read_text(encoding="utf-8")
    assert not re.search("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffe]", text)
    assert int(suite.get("failures", "")) == len(HOSTILE_NAMES) + 1
    assert all("NaN" in f.get("message", "") for f in suite.iter("failure"))


# --------------------------------------------------------------------------- step summary


def test_step_summary_is_appended_with_every_capture_and_the_failures(
    cli: RunCli, models: Models, tmp_path: Path
) -> None:
    summary = tmp_path / "summary.md"
    summary.write_text("# earlier step\n\n")
    env = {"GITHUB_STEP_SUMMARY": str(summary)}
    code, _, _ = cli(
        "check", *models.args("never_runs"), "-l", "*", "-l", "skipped", "-l", "direct", env=env
    )
    assert code == 1
    text = summary.read_text()
    assert text.startswith("# earlier step\n\n### fvis check: failed (2)\n")
    assert "| capture | shape | verdict |" in text
    assert "| `trunk` | (1, 8) | connected to the output |" in text
    assert "| `relu` | (1, 8) | connected to the output |" in text
    assert "| `skipped` | - | never ran for this input" in text
    assert "| `direct` | - | not called as a module, but 2 of its 2 trainable" in text
    assert "| layer | gate | cause | hint |" in text
    assert "| `skipped` | not-run | asked for but never ran for this input" in text
    assert "| `direct` | not-run | asked for but not called as a module" in text
    assert cli("check", *models.args("inner_outer"), env=env)[0] == 0
    text = summary.read_text()
    assert text.startswith("# earlier step\n\n### fvis check: failed (2)\n")
    assert text.count("### fvis check") == 2 and "### fvis check: passed\n" in text
    assert text.count("| layer | gate | cause | hint |") == 1  # a passing run lists no failures


def _code_cells(markdown: str) -> list[str]:
    """The text of every inline code span in table cells, as GitHub renders it."""
    html = MarkdownIt("commonmark").enable("table").render(markdown)
    return re.findall(r"<td><code>(.*?)</code></td>", html)


def test_step_summary_shows_layer_names_verbatim(
    cli: RunCli, models: Models, tmp_path: Path
) -> None:
    summary = tmp_path / "summary.md"
    env = {"GITHUB_STEP_SUMMARY": str(summary)}
    assert cli("check", *models.args("inner_outer"), env=env)[0] == 0
    assert _code_cells(summary.read_text()) == ["inner.linear", "inner.relu", "linear_out"]


# --------------------------------------------------------------------------- --json, --images


def test_json_output(cli: RunCli, models: Models) -> None:
    code, stdout, _ = cli("check", *models.args("detach_inner"), "--json")
    assert code == 1
    payload = json.loads(stdout)
    assert set(payload) == {"passed", "failures", "report"}
    assert payload["passed"] is False
    assert [(f["layer"], f["gate"]) for f in payload["failures"]] == [
        ("inner.linear", "disconnected"),
        ("inner.relu", "disconnected"),
    ]
    assert all(set(f) == {"layer", "gate", "cause", "hint"} for f in payload["failures"])
    report = payload["report"]
    assert report["schema"] == "fvis.report/1"
    assert report["check"]["passed"] is False
    assert report["check"]["failures"] == payload["failures"]
    code, stdout, _ = cli("check", *models.args("inner_outer"), "--json")
    assert code == 0
    assert json.loads(stdout)["passed"] is True and json.loads(stdout)["failures"] == []


@pytest.mark.parametrize(
    ("model", "code", "result"),
    [("detach_inner", 1, "check failed"), ("inner_outer", 0, "check passed")],
)
def test_images_report_shows_the_check_result(
    cli: RunCli, models: Models, tmp_path: Path, model: str, code: int, result: str
) -> None:
    out = tmp_path / "out"
    assert cli("check", *models.args(model), "--images", "--out", out)[0] == code
    html = (out / "report.html").read_text(encoding="utf-8")
    assert re.search(rf'id="check-result">{result}</span>', html)
    check = json.loads((out / "report.json").read_text())["check"]
    assert check["passed"] is (code == 0)
    assert check["checks"] == 6
    assert len(check["failures"]) == (2 if code else 0)
    assert any(p.suffix == ".png" for p in out.iterdir())


def test_out_without_images_writes_reports_only(
    cli: RunCli, models: Models, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert cli("check", *models.args("inner_outer"), "--out", out)[0] == 0
    names = {p.name for p in out.iterdir()}
    assert {"report.json", "report.md", "report.html"} <= names
    assert not any(n.endswith(".png") for n in names)


# --------------------------------------------------------------------------- known bugs


def test_failed_count_never_exceeds_the_checks(cli: RunCli, models: Models, tmp_path: Path) -> None:
    baseline = _write_baseline(cli, models.args("inner_outer"), tmp_path / "b.json")
    scaled = _save(
        tmp_path / "s.pt", _scaled(models.state("inner_outer"), "linear_out.weight", 1.1)
    )
    code, stdout, _ = cli(
        "check",
        *models.args("inner_outer", weights=scaled),
        "--baseline",
        baseline,
        "--fail-on",
        "nonfinite",
    )
    assert code == 1
    summary = FAILED_RE.search(stdout)
    assert summary is not None
    # Several statistics of one capture can drift: they are one failing check.
    assert int(summary[1]) == len({f[:2] for f in _fails(stdout)}) <= int(summary[2])


def test_a_repeated_unknown_layer_fails_once(cli: RunCli, models: Models) -> None:
    code, stdout, _ = cli("check", *models.args("inner_outer"), "-l", "nope", "-l", "nope")
    assert code == 1
    assert [f[:2] for f in _fails(stdout)] == [("nope", "missing")]
