"""Reports that CI systems read: JUnit XML and a GitHub step-summary in Markdown (pure)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from typing import Any

from fvis.gates import CheckOutcome, Failure
from fvis.text import for_terminal_plain


def _xml_text(text: str) -> str:
    # XML 1.0 cannot hold most control characters: escape them as \xNN like the terminal does.
    return for_terminal_plain(text)


def junit_xml(
    outcome: CheckOutcome, extra: Sequence[Failure] = (), suite: str = "fvis check"
) -> bytes:
    """One test case per (layer, gate) check; failures carry the cause and the hint.

    >>> junit_xml(CheckOutcome((("inner.relu", "nonfinite"),), ())).startswith(b"<?xml")
    True
    """
    failures: dict[tuple[str, str], list[Failure]] = {}
    for failure in (*outcome.failures, *extra):
        failures.setdefault((failure.layer, failure.gate), []).append(failure)
    cases = list(dict.fromkeys([*outcome.checks, *((f.layer, f.gate) for f in extra)]))
    root = ET.Element("testsuites")
    suite_el = ET.SubElement(
        root,
        "testsuite",
        name=suite,
        tests=str(len(cases)),
        failures=str(sum(1 for c in cases if c in failures)),
        errors="0",
    )
    for layer, gate in cases:
        case = ET.SubElement(
            suite_el,
            "testcase",
            classname=_xml_text(f"fvis.{gate}"),
            name=_xml_text(f"{layer} [{gate}]"),
        )
        for failure in failures.get((layer, gate), []):
            element = ET.SubElement(
                case, "failure", message=_xml_text(failure.cause), type=_xml_text(gate)
            )
            element.text = _xml_text(failure.line())
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def step_summary(report: Mapping[str, Any], failures: Sequence[Failure]) -> str:
    """Markdown for ``$GITHUB_STEP_SUMMARY``: the verdict per capture, then the failures."""
    from fvis.report import _code, _md

    status = "passed" if not failures else f"failed ({len(failures)})"
    lines = [
        f"### fvis check: {status}",
        "",
        f"Model `{_code(report['model']['file'])}`, "
        f"input {_md(report['input']['description'])}, mode `{report['mode']}`",
        "",
        "| capture | shape | verdict |",
        "|---|---|---|",
    ]
    for c in report["captures"]:
        verdict = (c.get("verdict") or {}).get("summary", "")
        lines.append(f"| `{_code(c['label'])}` | {tuple(c['shape'])} | {_md(verdict)} |")
    for entry in report.get("not_run") or [{"layer": n} for n in report["never_ran"]]:
        summary = entry.get("summary", "never ran")
        lines.append(f"| `{_code(entry['layer'])}` | - | {_md(summary)} |")
    if failures:
        lines += ["", "| layer | gate | cause | hint |", "|---|---|---|---|"]
        lines += [
            f"| `{_code(f.layer)}` | {_md(f.gate)} | {_md(f.cause)} | {_md(f.hint)} |"
            for f in failures
        ]
    return "\n".join(lines) + "\n"
