"""``check``: ``dump`` plus gates, expectations and a baseline, the CI gate
(``fvis.api`` re-exports it)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fvis.loading import LoadOptions

if TYPE_CHECKING:
    from fvis.api import ModelRef
    from fvis.inputs import InputOptions, Prepared

from fvis.dumping import DumpOptions, DumpResult, _run_dump, _write_outputs


@dataclass(frozen=True)
class CheckOptions:
    """Mirrors ``fvis check``'s gate options."""

    gates: tuple[Any, ...] = ()  # fvis.gates.Gate
    expectations: tuple[Any, ...] = ()  # fvis.gates.Expectation
    baseline: Path | None = None
    write_baseline: Path | None = None
    rtol: float = 1e-3
    atol: float = 1e-4
    strict_library: bool = False  # also fail on cuts made by design inside library code


@dataclass(frozen=True)
class CheckResult:
    dump: DumpResult
    outcome: Any  # fvis.gates.CheckOutcome
    baseline_failures: tuple[Any, ...] = ()

    @property
    def failures(self) -> tuple[Any, ...]:
        return (*self.outcome.failures, *self.baseline_failures)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def checks(self) -> int:
        """Gate checks plus one baseline comparison per compared capture."""
        return int(self.dump.report.get("check", {}).get("checks", len(self.outcome.checks)))


def _baseline_checks(baseline: Any, current: Any) -> int:
    """One check per compared capture and never-ran layer, plus the input itself."""
    labels = set(baseline["captures"]) | set(current["captures"])
    return len(labels) + len(set(current.get("never_ran", []))) + 1


def check(
    ref: ModelRef,
    inputs: InputOptions | Prepared,
    options: DumpOptions,
    gates: CheckOptions,
    out: Path | None = None,
    overwrite: bool = False,
    progress: Callable[[Any], None] | None = None,
) -> CheckResult:
    """``dump`` plus gates, expectations and a baseline; nothing is written unless ``out``.

    >>> result = check(ref, InputOptions(shape=(1, 10)), DumpOptions(),
    ...                CheckOptions(gates=parse_gates("nonfinite")))     # doctest: +SKIP
    >>> result.passed
    True
    """
    import json

    from fvis.baseline import compare, make_baseline, read_baseline
    from fvis.gates import evaluate
    from fvis.output import OutputDir, write_file_atomic

    names = {g.name for g in gates.gates}
    # Unknown layers fail the `missing` gate (exit 1) when it is on, else are a usage error.
    options = dataclasses.replace(
        options, missing_ok="missing" in names, backward=options.backward or "no-grad-flow" in names
    )
    baseline = read_baseline(gates.baseline) if gates.baseline else None  # fail before work
    folder = OutputDir.open(out, overwrite) if out is not None else None
    with folder or contextlib.nullcontext():  # any failure: nothing new is left behind
        run = _run_dump(ref, inputs, options, progress)
        outcome = evaluate(
            run.report, gates.gates, gates.expectations, run.missing, gates.strict_library
        )
        current = make_baseline(run.report)
        regressions = tuple(compare(baseline, current, gates.rtol, gates.atol)) if baseline else ()
        failures = [*outcome.failures, *regressions]
        run.report["check"] = {
            "passed": not failures,
            "checks": len(outcome.checks)
            + (_baseline_checks(baseline, current) if baseline else 0),
            "failures": [dataclasses.asdict(f) for f in failures],
        }
        if gates.write_baseline is not None:
            text = json.dumps(current, indent=2, allow_nan=False) + "\n"
            write_file_atomic(gates.write_baseline, text.encode())
        files = _write_outputs(folder, run, options) if folder is not None else []
    result = DumpResult(run.report, tuple(files), out, run.notes, run.missing)
    return CheckResult(result, outcome, regressions)


def check_module(
    module: Any,
    inputs: Any,
    options: DumpOptions | None = None,
    gates: CheckOptions | None = None,
) -> CheckResult:
    """``check`` on a live ``nn.Module`` with tensors you made (a list, a tuple or a dict of
    keyword inputs, or one tensor): what the pytest fixture ``fvis_check`` runs.

    >>> check_module(model, [torch.randn(1, 10)]).passed            # doctest: +SKIP
    True
    """

    from fvis.gates import DEFAULT_GATES, parse_gates
    from fvis.inputs import Prepared

    if isinstance(inputs, Mapping):
        prepared = Prepared((), dict(inputs), "keyword inputs given in Python")
    else:
        args = tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)
        prepared = Prepared(args, {}, "inputs given in Python")
    gates = gates or CheckOptions(gates=parse_gates(DEFAULT_GATES))
    from fvis.api import ModelRef

    ref = ModelRef(None, LoadOptions(), "live module", module=module)
    return check(ref, prepared, options or DumpOptions(), gates)
