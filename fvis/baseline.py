"""Baselines: record what each capture looked like, and catch regressions against it.

A baseline (schema ``fvis.baseline/1``) keeps, per capture label: shape, dtype, call count,
the grad verdict (``connected`` and its cause) and summary statistics. Comparing flags:

- a capture that disappeared or appeared (a layer renamed, removed, or a branch now taken);
- a shape, dtype or call-count change;
- a verdict change (connected -> disconnected, or a different cause);
- drift of ``mean``, ``std``, ``min`` and ``max`` beyond ``|now - then| <= atol + rtol*|then|``
  (defaults ``rtol=1e-3``, ``atol=1e-4``: far above CPU/BLAS rounding noise for a seeded input,
  far below what a changed weight or op produces); NaN/Inf counts must match exactly.

Statistics are only meaningful with a deterministic input: a file, or ``--shape`` with
``--seed``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fvis.errors import BadFileError, UsageError
from fvis.gates import Failure

SCHEMA = "fvis.baseline/1"
COMPARED_STATS = ("mean", "std", "min", "max")
EXACT_STATS = ("nan", "posinf", "neginf")
_STAT_KEYS = (*COMPARED_STATS, *EXACT_STATS)


def make_baseline(report: Mapping[str, Any]) -> dict[str, Any]:
    """A baseline dict from a report (pure)."""
    return {
        "schema": SCHEMA,
        "input": report["input"]["description"],
        "mode": report["mode"],
        "captures": {
            c["label"]: {
                "shape": c["shape"],
                "dtype": c["dtype"],
                "calls": c["calls"],
                "connected": (c.get("verdict") or {}).get("connected"),
                "cause": (c.get("verdict") or {}).get("cause"),
                "stats": {k: c["stats"][k] for k in (*COMPARED_STATS, *EXACT_STATS)},
            }
            for c in report["captures"]
        },
        "never_ran": list(report["never_ran"]),
    }


def read_baseline(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(  # a missing file is a usage error (exit 2), as everywhere in fvis
            f"{path}: no such baseline file", hint="write one first with --write-baseline"
        ) from None
    except (OSError, ValueError) as exc:
        raise BadFileError(f"{path} is not a readable baseline ({exc})") from None
    except RecursionError:
        raise BadFileError(f"{path} is not a readable baseline (nested too deeply)") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise BadFileError(f"{path} is not an fvis baseline (schema {SCHEMA} expected)")
    problem = _schema_problem(data)
    if problem:
        raise BadFileError(
            f"{path} is a damaged fvis baseline: {problem}",
            hint="rewrite it with --write-baseline",
        )
    return data


_CAPTURE_KEYS = ("shape", "dtype", "calls", "connected", "cause", "stats")


def _schema_problem(data: Mapping[str, Any]) -> str:
    """What ``compare`` would trip over in a baseline, or ``""``."""
    captures = data.get("captures")
    if not isinstance(captures, dict):
        return "'captures' is missing or not an object"
    if not isinstance(data.get("never_ran", []), list):
        return "'never_ran' is not a list"
    for label, entry in captures.items():
        if not isinstance(entry, dict) or any(k not in entry for k in _CAPTURE_KEYS):
            return f"capture {label!r} lacks one of {', '.join(_CAPTURE_KEYS)}"
        stats = entry["stats"]
        if not isinstance(stats, dict) or any(k not in stats for k in _STAT_KEYS):
            return f"capture {label!r} lacks statistics"
        numbers = [stats[k] for k in COMPARED_STATS]
        if not all(v is None or isinstance(v, int | float) for v in numbers):
            return f"capture {label!r} has statistics that are not numbers"
    return ""


def compare(
    baseline: Mapping[str, Any], now: Mapping[str, Any], rtol: float = 1e-3, atol: float = 1e-4
) -> list[Failure]:
    """Regressions of ``now`` (a baseline dict) against ``baseline``."""
    failures: list[Failure] = []
    then_caps, now_caps = baseline["captures"], now["captures"]
    for label in then_caps.keys() - now_caps.keys():
        failures.append(
            Failure(
                label,
                "baseline",
                "capture disappeared",
                "a layer was renamed, removed, or stopped running",
            )
        )
    for label in now_caps.keys() - then_caps.keys():
        failures.append(
            Failure(
                label,
                "baseline",
                "new capture not in the baseline",
                "rewrite the baseline if the change is intended",
            )
        )
    same_input = (baseline.get("input"), baseline.get("mode")) == (
        now.get("input"),
        now.get("mode"),
    )
    if not same_input:  # statistics of another input cannot be compared: say that once
        failures.append(
            Failure(
                "-",
                "baseline",
                f"the input differs from the baseline's ({baseline.get('input')}, "
                f"{baseline.get('mode')} vs {now.get('input')}, {now.get('mode')})",
                "use the same --input or --shape/--seed, or rewrite the baseline",
            )
        )
    for label in sorted(then_caps.keys() & now_caps.keys()):
        failures += _compare_capture(
            label, then_caps[label], now_caps[label], rtol, atol, same_input
        )
    for name in set(now.get("never_ran", [])) - set(baseline.get("never_ran", [])):
        failures.append(Failure(name, "baseline", "ran in the baseline, never runs now", ""))
    return sorted(failures, key=lambda f: f.layer)


def _compare_capture(
    label: str,
    then: Mapping[str, Any],
    now: Mapping[str, Any],
    rtol: float,
    atol: float,
    compare_stats: bool = True,
) -> list[Failure]:
    out = []
    for key in ("shape", "dtype", "calls"):
        if then[key] != now[key]:
            out.append(Failure(label, "baseline", f"{key} changed: {then[key]} -> {now[key]}", ""))
    if (then["connected"], then["cause"]) != (now["connected"], now["cause"]):
        out.append(
            Failure(
                label,
                "baseline",
                f"verdict changed: {then['cause']} -> {now['cause']}",
                "see the grad verdict for where the graph is cut",
            )
        )
    for key in EXACT_STATS if compare_stats else ():
        if then["stats"][key] != now["stats"][key]:
            out.append(
                Failure(
                    label,
                    "baseline",
                    f"{key} count changed: {then['stats'][key]} -> {now['stats'][key]}",
                    "",
                )
            )
    for key in COMPARED_STATS if compare_stats else ():
        a, b = now["stats"][key], then["stats"][key]
        if not _close(a, b, rtol, atol):
            out.append(
                Failure(
                    label,
                    "baseline",
                    f"{key} drifted: {_fmt(b)} -> {_fmt(a)} (rtol {rtol:g}, atol {atol:g})",
                    "weights or ops changed; rewrite the baseline if intended",
                )
            )
    return out


def _close(a: float | None, b: float | None, rtol: float, atol: float) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=0.0, abs_tol=atol + rtol * abs(b))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"
