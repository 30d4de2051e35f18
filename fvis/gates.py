"""CI gates over a dump report: pure functions from ``report.json`` data to failures.

Gates (``--fail-on``, comma-separated):

==================  =====================================================================
``missing``         a requested layer does not exist in the model
``not-run``         a requested layer never ran
``disconnected``    a capture is not connected to the model's output
``grad-off``        a capture ran with grad mode off (no_grad / inference mode)
``inplace``         a capture was modified in place after it was taken
``nonfinite``       a capture holds NaN or +-Inf
``dead:FRACTION``   more than FRACTION of a capture's channels are all zero
``no-grad-flow``    with ``--backward``: a layer with trainable parameters got no gradient
==================  =====================================================================

``--expect 'PATTERN=STATE'`` overrides the gates for matching layers: the layer must be in
STATE (``connected``, ``disconnected``, ``grad-off``, ``not-run``) and nothing else is
checked for it, so an intended cut (a frozen backbone) passes and an unintended one fails.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fvis.errors import UsageError

GATE_NAMES = (
    "missing",
    "not-run",
    "disconnected",
    "grad-off",
    "inplace",
    "nonfinite",
    "dead",
    "no-grad-flow",
)
DEFAULT_GATES = "missing,not-run,disconnected,nonfinite"
EXPECT_STATES = ("connected", "disconnected", "grad-off", "not-run")


@dataclass(frozen=True)
class Gate:
    name: str
    threshold: float | None = None  # for dead:FRACTION

    @property
    def label(self) -> str:
        return f"{self.name}:{self.threshold:g}" if self.threshold is not None else self.name


@dataclass(frozen=True)
class Expectation:
    pattern: str
    state: str


@dataclass(frozen=True)
class Failure:
    """One failed check: which capture, which gate, why, and what to do."""

    layer: str
    gate: str
    cause: str
    hint: str

    def line(self) -> str:
        return f"{self.layer}: {self.gate}: {self.cause}" + (
            f" (hint: {self.hint})" if self.hint else ""
        )


@dataclass(frozen=True)
class CheckOutcome:
    """Every check that ran (for JUnit), and the failures among them."""

    checks: tuple[tuple[str, str], ...]  # (layer, gate) pairs evaluated
    failures: tuple[Failure, ...]

    @property
    def passed(self) -> bool:
        return not self.failures


def parse_gates(text: str) -> tuple[Gate, ...]:
    """``"missing,dead:0.5"`` -> gates; unknown names are a usage error naming the choices.

    >>> [g.label for g in parse_gates("nonfinite,dead:0.5")]
    ['nonfinite', 'dead:0.5']
    """
    gates = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, value = item.partition(":")
        if name not in GATE_NAMES:
            raise UsageError(
                f"unknown gate {item!r} in --fail-on", hint="gates: " + ", ".join(GATE_NAMES)
            )
        gates.append(Gate(name, _fraction(item, value) if name == "dead" else None))
        if name != "dead" and value:
            raise UsageError(f"gate {name!r} takes no value (got {item!r})")
    return tuple(gates)


def _fraction(item: str, value: str) -> float:
    try:
        fraction = float(value)
    except ValueError:
        raise UsageError(f"gate {item!r}: dead needs a fraction, e.g. dead:0.5") from None
    if not 0.0 <= fraction < 1.0:
        raise UsageError(f"gate {item!r}: the fraction must be in [0, 1)")
    return fraction


def parse_expectations(items: Iterable[str]) -> tuple[Expectation, ...]:
    """``["backbone.*=disconnected"]`` -> expectations."""
    out = []
    for item in items:
        pattern, sep, state = item.rpartition("=")
        if not sep or not pattern or state not in EXPECT_STATES:
            raise UsageError(
                f"--expect {item!r} must look like 'PATTERN=STATE'",
                hint="states: " + ", ".join(EXPECT_STATES),
            )
        out.append(Expectation(pattern, state))
    return tuple(out)


def evaluate(
    report: Mapping[str, Any],
    gates: Sequence[Gate],
    expectations: Sequence[Expectation] = (),
    missing: Sequence[str] = (),
    strict_library: bool = False,
) -> CheckOutcome:
    """Run every gate and expectation over a report (schema ``fvis.report/1``).

    ``disconnected`` passes captures that are constant with respect to the inputs and, unless
    ``strict_library``, captures cut by installed library code (a cut made by design there,
    such as torchvision's RPN detaching its proposals)."""
    checks: list[tuple[str, str]] = []
    failures: list[Failure] = []
    names = {g.name for g in gates}
    if "missing" in names:
        for name in missing:
            checks.append((name, "missing"))
            failures.append(
                Failure(
                    name,
                    "missing",
                    "no such layer in the model",
                    "run 'fvis layers MODEL' to list the names",
                )
            )
    for entry in _not_run(report):
        name = entry["layer"]
        expectation = _expectation_for(name, expectations)
        if expectation is not None:
            checks.append((name, f"expect:{expectation.state}"))
            if expectation.state != "not-run":
                failures.append(
                    Failure(
                        name,
                        f"expect:{expectation.state}",
                        entry.get("summary", "never ran"),
                        "the module's __call__ did not happen",
                    )
                )
        elif "not-run" in names and entry.get("requested", True):
            checks.append((name, "not-run"))
            if entry.get("cause") == "removed-by-export":  # nothing could ever call it
                continue
            failures.append(
                Failure(
                    name,
                    "not-run",
                    "asked for but " + entry.get("summary", "never ran"),
                    entry.get(
                        "hint", "called as .forward(), a functional op, or a branch not taken"
                    ),
                )
            )
    for capture in report.get("captures", []):
        expectation = _expectation_for(capture["layer"], expectations)
        if expectation is not None:
            checks.append((capture["label"], f"expect:{expectation.state}"))
            failures += _check_expectation(capture, expectation)
            continue
        for gate in gates:
            if gate.name in ("missing", "not-run", "no-grad-flow"):
                continue
            checks.append((capture["label"], gate.label))
            failure = _check_gate(capture, gate, strict_library)
            if failure is not None:
                failures.append(failure)
    if "no-grad-flow" in names:
        failures += _grad_flow_failures(report, checks)
    return CheckOutcome(tuple(checks), tuple(failures))


def _not_run(report: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The requested modules that were not called; reports written before ``not_run`` existed
    list only names, every one of them requested."""
    if "not_run" in report:
        return list(report["not_run"])
    return [{"layer": name} for name in report.get("never_ran", [])]


def _expectation_for(layer: str, expectations: Sequence[Expectation]) -> Expectation | None:
    matches = [e for e in expectations if fnmatch.fnmatchcase(layer, e.pattern)]
    return matches[-1] if matches else None  # the last matching --expect wins


def _state(capture: Mapping[str, Any]) -> str:
    verdict = capture.get("verdict") or {}
    if verdict.get("connected"):
        return "connected"
    if verdict.get("cause") in ("grad-off", "inference"):
        return "grad-off"
    return "disconnected"


def _check_expectation(capture: Mapping[str, Any], expectation: Expectation) -> list[Failure]:
    state = _state(capture)
    wanted = expectation.state
    ok = state == wanted or (wanted == "disconnected" and state == "grad-off")
    if ok:
        return []
    summary = (capture.get("verdict") or {}).get("summary", state)
    return [
        Failure(
            capture["label"],
            f"expect:{wanted}",
            f"expected {wanted}, got {summary}",
            (capture.get("verdict") or {}).get("hint", ""),
        )
    ]


def _by_design(verdict: Mapping[str, Any], strict_library: bool) -> bool:
    """Not connected, and not a fault: constant outputs, values computed from the input alone
    (nothing to differentiate yet), integer outputs, and cuts inside library code."""
    if verdict.get("cause") in ("constant", "input-only", "not-differentiable", "checkpointed"):
        return True  # integer outputs (labels, token ids) can never carry a gradient
    return bool(verdict.get("library")) and not strict_library


def _check_gate(
    capture: Mapping[str, Any], gate: Gate, strict_library: bool = False
) -> Failure | None:
    verdict = capture.get("verdict") or {}
    stats, grad = capture["stats"], capture["grad"]
    label = capture["label"]
    if (
        gate.name == "disconnected"
        and not verdict.get("connected", True)
        and not _by_design(verdict, strict_library)
    ):
        return Failure(
            label, gate.label, verdict.get("summary", "not connected"), verdict.get("hint", "")
        )
    if gate.name == "grad-off" and (not grad["grad_enabled"] or grad["inference_mode"]):
        return Failure(
            label, gate.label, verdict.get("summary", "grad mode off"), verdict.get("hint", "")
        )
    if gate.name == "inplace" and grad.get("modified_in_place"):
        return Failure(
            label,
            gate.label,
            f"modified in place after capture ({grad['grad_fn']} -> {grad['grad_fn_after']})",
            "use out-of-place ops (inplace=False) or clone before storing",
        )
    if gate.name == "nonfinite" and (stats["nan"] or stats["posinf"] or stats["neginf"]):
        return Failure(
            label,
            gate.label,
            f"NaN {stats['nan']}, +Inf {stats['posinf']}, -Inf {stats['neginf']}",
            "check the input scale and the layer's weights",
        )
    if gate.name == "dead" and stats["channels"]:
        fraction = stats["dead_channels"] / stats["channels"]
        if fraction > (gate.threshold or 0.0):
            return Failure(
                label,
                gate.label,
                f"{stats['dead_channels']} of {stats['channels']} "
                f"channels are all zero ({fraction:.0%})",
                "dead ReLUs: check initialisation, learning rate or the input",
            )
    return None


def _grad_flow_failures(report: Mapping[str, Any], checks: list[tuple[str, str]]) -> list[Failure]:
    backward = report.get("backward")
    if not backward:
        return [Failure("-", "no-grad-flow", "the gate needs --backward", "add --backward")]
    if backward.get("error"):
        checks.append(("-", "no-grad-flow"))
        return [Failure("-", "no-grad-flow", backward["error"], "")]
    failures = []
    for param in backward["params"]:
        checks.append((param["layer"], "no-grad-flow"))
        if param["starved"]:
            failures.append(
                Failure(
                    param["layer"],
                    "no-grad-flow",
                    f"none of its {param['trainable']} trainable parameter "
                    "tensors received a gradient",
                    "freeze it (requires_grad_(False)) if intended, else find "
                    "the cut in the grad verdicts",
                )
            )
    return failures
