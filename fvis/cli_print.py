"""What the CLI prints: the module tree notes, the dump table, the check result, the
progress line (rich, to a terminal or a pipe)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from fvis.errors import OutputError


def make_console() -> Any:
    from rich.console import Console

    class _PipeAwareConsole(Console):
        def on_broken_pipe(self) -> None:  # rich exits 1 ("checks failed") by itself
            raise BrokenPipeError

    console = _PipeAwareConsole(highlight=False)
    if not console.is_terminal:  # pipes and CI logs: do not crop long dotted names at 80
        console.width = max(console.width, 200)
    return console


def print_listing_notes(console: Any, listing: Any) -> None:
    from fvis.listing import human, never_ran
    from fvis.text import for_terminal

    root = listing.tree.layers[0]
    console.print(
        f"{len(listing.tree.layers)} modules, {human(root.params)} parameters "
        f"({human(root.trainable)} trainable, {human(root.frozen)} frozen)"
    )
    if listing.tree.source_note:
        console.print(f"[dim]{for_terminal(listing.tree.source_note)}[/dim]")
    if listing.input_description:
        console.print(f"[dim]input: {for_terminal(listing.input_description)}[/dim]")
    missing = never_ran(listing)
    if missing:
        console.print(f"[red]never ran:[/red] {', '.join(for_terminal(n) for n in missing)}")


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def print_dump(result: Any) -> None:
    from fvis.report import backward_lines, to_table
    from fvis.text import for_terminal

    console = make_console()
    inputs = result.report["input"]
    if "device" in inputs:
        console.print(f"[dim]device: {inputs['device']}, dtype: {inputs['dtype']}[/dim]")
    console.print(to_table(result.report))
    console.print(f"[dim]input: {for_terminal(inputs['description'])}[/dim]")
    for entry in result.report["not_run"]:
        console.print(
            f"[yellow]not called:[/yellow] {for_terminal(entry['layer'])}: "
            f"{for_terminal(entry.get('summary', 'its __call__ did not happen'))}"
        )
    for line in backward_lines(result.report):
        console.print(for_terminal(line))
    console.print(
        f"wrote {len(result.files)} files to {for_terminal(str(result.out))}/ "
        f"({plural(sum(n.endswith('.png') for n in result.files), 'picture')}, report.html, "
        "report.json, report.md)"
    )


@contextlib.contextmanager
def progress_line(enabled: bool) -> Any:
    """A transient progress line on stderr while layers fire, only on a terminal."""
    from rich.console import Console

    console = Console(stderr=True)
    if not (enabled and console.is_terminal):
        yield None
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("capturing", total=None)
        count = 0

        def tick(capture: Any) -> None:
            nonlocal count
            count += 1
            bar.update(task, description=f"captured {count} tensors")

        yield tick


def report_check(result: Any, junit: Path | None, json_out: bool, quiet: bool) -> None:

    from fvis.ci_reports import junit_xml, step_summary
    from fvis.output import write_file_atomic
    from fvis.text import for_terminal_plain

    failures = result.failures
    if junit is not None:
        write_file_atomic(junit, junit_xml(result.outcome, result.baseline_failures))
    summary_path = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary_path:
        try:
            with open(summary_path, "a", encoding="utf-8") as fh:
                fh.write(step_summary(result.dump.report, failures))
        except OSError as exc:
            raise OutputError(
                f"cannot append to GITHUB_STEP_SUMMARY {summary_path}: {exc.strerror or exc}"
            ) from None
    if json_out:
        check = result.dump.report["check"]  # api.check put the verdict there already
        payload = {
            "passed": check["passed"],
            "failures": check["failures"],
            "report": result.dump.report,
        }
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return
    for failure in failures:
        sys.stdout.write(f"FAIL {for_terminal_plain(failure.line())}\n")
    if not quiet:
        from fvis.report import output_note_lines

        for line in output_note_lines(result.dump.report):
            sys.stdout.write(f"note: {for_terminal_plain(line)}\n")
        failing = len({(f.layer, f.gate) for f in failures})
        status = "passed" if result.passed else f"failed: {failing} of {result.checks} checks"
        captures = plural(len(result.dump.report["captures"]), "capture")
        empty = _no_tensor_layers(result.dump.report)
        extra = f"; no tensor from {', '.join(empty)}" if empty else ""
        sys.stdout.write(f"fvis check {status} ({captures}{for_terminal_plain(extra)})\n")


def _no_tensor_layers(report: dict[str, Any]) -> list[str]:
    """Captured layers whose output held no tensor at all (their note says what it was)."""
    captured = {c["layer"] for c in report["captures"]}
    notes = report.get("output_notes", [])
    return list(dict.fromkeys(n["layer"] for n in notes if n["layer"] not in captured))
