"""The dump report: one dict (``report.json``, schema ``fvis.report/1``) and pure renderings of
it (Markdown, a rich table). ``report.md`` and the terminal show the same facts as the JSON.

Schema ``fvis.report/1`` (fields are only ever added)::

    {"schema", "fvis_version", "torch_version",
     "model": {"file", "format", "sha256", "class", "params", "trainable", "frozen", "notes"},
     "input": {"description", "shapes", "dtypes", "samples", "image",
               "tokens"},  # each sample's tokens (--text, a saved BatchEncoding), else []
     "mode": "grad" | "no-grad" | "inference", "train": bool,
     "captures": [{"label", "layer", "call", "calls", "path", "shape", "token_grid",
                   # token_grid: [prefix tokens, H, W] of ViT tokens on a patch grid, or null
                   "dtype", "device",
                   "grad": {"grad_enabled", "inference_mode", "requires_grad", "grad_fn",
                            "is_leaf", "is_inference", "version", "version_after",
                            "grad_fn_after", "modified_in_place"},
                   "stats": {"numel", "min", "max", "mean", "std", "zero_fraction", "nan",
                             "posinf", "neginf", "channels", "dead_channels",
                             "channel_axis"},  # the dim counted as channels (fvis.axes)
                   "verdict": {...} | null,  # with "cut_at": {"file", "line", "function",
                                             # "op", "library"} | null (fvis.sources.CutSite)
                   "images": [{"file", "sample", "layout",  # grid|heatmap|strip|tokens|empty
                               "shown_channels", "total_channels",
                               "note", "channels": [[index, min, max], ...]}]}],
     "never_ran": [layer, ...], "warnings": [str, ...],
     "output_notes": [{"layer", "note"}, ...],  # what a captured layer's output held that
                                                 # could not be captured (no tensor, ...)
     "not_run": [{"layer", "requested", "connected", "cause", "where", "summary", "hint",
                  "in_place", "origin", "library"}],
     "layers": [{"name", "class", "depth", "leaf", "nested_model", "params", "shared_with"}],
     "backward": null | {"target", "error", "params": [{"layer", "trainable", "received",
                                                        "starved"}]}}

With ``--backward`` every capture also has ``"gradient": {"reached", "norm"}``. With ``--ops``
the report has ``"ops"`` (every tensor op of the forward, as in ``fvis layers --ops``) and op
captures have ``"path": ":softmax#1"`` (``fvis.ops``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fvis.text import for_terminal, for_terminal_plain, link_target, num_text, shape_text

SCHEMA = "fvis.report/1"


@dataclass(frozen=True)
class ImageRef:
    """One picture written for a capture."""

    file: str
    sample: int | None
    layout: str
    shown_channels: int
    total_channels: int
    note: str = ""
    channels: tuple[tuple[int, float | None, float | None], ...] = ()  # (index, min, max)


@dataclass(frozen=True)
class ReportInput:
    """Everything the report is built from; built by ``fvis.api.dump``."""

    model: Mapping[str, Any]
    input: Mapping[str, Any]
    mode: str
    train: bool
    captures: Sequence[Any]  # fvis.capture.Capture
    never_ran: Sequence[str]
    images: Mapping[str, Sequence[ImageRef]] = field(default_factory=dict)  # by capture label
    verdicts: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # by capture label
    warnings: Sequence[str] = ()
    output_notes: Mapping[str, Sequence[str]] = field(default_factory=dict)  # by layer


def build_report(
    data: ReportInput, backward: Any = None, tree: Any = None, input_image: str | None = None
) -> dict[str, Any]:
    """The report as a JSON-ready dict (schema ``fvis.report/1``); pure.

    ``backward`` is a ``fvis.backward.BackwardResult`` when ``--backward`` ran; ``tree`` the
    ``ModelTree`` (listed under ``"layers"``); ``input_image`` the file showing the input.
    """
    import torch

    from fvis import __version__

    report: dict[str, Any] = {
        "schema": SCHEMA,
        "fvis_version": __version__,
        "torch_version": torch.__version__,
        "model": dict(data.model),
        "input": dict(data.input),
        "mode": data.mode,
        "train": data.train,
        "captures": [_capture_json(c, data) for c in data.captures],
        "never_ran": list(data.never_ran),
        "warnings": list(data.warnings),
        "output_notes": [
            {"layer": layer, "note": note}
            for layer, notes in data.output_notes.items()
            for note in notes
        ],
        "backward": _backward_json(backward),
        "layers": _layers_json(tree),
    }
    report["input"]["image"] = input_image
    if backward is not None:
        for capture in report["captures"]:
            flow = backward.captures.get(capture["label"])
            capture["gradient"] = {"reached": flow.reached, "norm": flow.norm} if flow else None
    return report


def _layers_json(tree: Any) -> list[dict[str, Any]]:
    if tree is None:
        return []
    return [
        {
            "name": i.name,
            "class": i.class_name,
            "depth": i.depth,
            "leaf": i.is_leaf,
            "nested_model": i.is_nested_model,
            "params": i.params,
            "shared_with": list(i.aliases),
        }
        for i in tree.layers
    ]


def _backward_json(backward: Any) -> dict[str, Any] | None:
    if backward is None:
        return None
    return {
        "target": backward.target,
        "error": backward.error,
        "params": [
            {
                "layer": p.layer,
                "trainable": p.trainable,
                "received": p.received,
                "starved": p.starved,
            }
            for p in backward.params
        ],
    }


def _capture_json(capture: Any, data: ReportInput) -> dict[str, Any]:
    grad = dataclasses.asdict(capture.grad)
    grad["modified_in_place"] = capture.grad.modified_in_place
    return {
        "label": capture.label,
        "layer": capture.layer,
        "call": capture.call,
        "calls": capture.calls_total,
        "path": capture.path,
        "shape": list(capture.shape),
        "token_grid": list(capture.token_grid) if capture.token_grid else None,
        "dtype": capture.dtype,
        "device": capture.device,
        "grad": grad,
        "stats": {k: _finite_or_none(v) for k, v in dataclasses.asdict(capture.stats).items()},
        "verdict": dict(data.verdicts[capture.label]) if capture.label in data.verdicts else None,
        "images": [dataclasses.asdict(i) for i in data.images.get(capture.label, ())],
    }


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/Inf
    return value


# --------------------------------------------------------------------------- Markdown


def to_markdown(report: Mapping[str, Any]) -> str:
    """``report.md``: the same facts for people, pictures linked (relative paths)."""
    model, inp = report["model"], report["input"]
    lines = [
        f"# fvis report: {_md(model.get('file', ''))}",
        "",
        f"- model: `{_code(model.get('class', ''))}` ({_md(model.get('format', ''))}), "
        f"{model.get('params', 0):,} parameters, sha256 `{model.get('sha256', '') or '-'}`",
        f"- input: {_md(inp.get('description', ''))}",
        f"- mode: `{report['mode']}`{' (train)' if report['train'] else ' (eval)'}; "
        f"fvis {report['fvis_version']}, torch {report['torch_version']}",
        "",
        "| capture | shape | grad_fn | requires_grad | in place | min | max | "
        "zeros | non-finite | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_md_row(c) for c in report["captures"]]
    if _not_run(report):
        lines += ["", "**Not called:**", ""]
        lines += [
            f"- `{_code(e['layer'])}`: {_md(e.get('summary', 'never ran'))}"
            for e in _not_run(report)
        ]
    for warning in report["warnings"]:
        lines.append(f"\n> warning: {_md(warning)}")
    for item in report.get("output_notes", []):
        lines.append(f"\n> note: `{_code(item['layer'])}` {_md(item['note'])}")
    lines += ["", "## Pictures", ""]
    for c in report["captures"]:
        for image in c["images"]:
            note = f" ({_md(image['note'])})" if image["note"] else ""
            lines.append(
                f"### `{_code(c['label'])}`{note}\n\n"
                f"![{_md(c['label'])}](<{link_target(image['file'])}>)\n"
            )
    return "\n".join(lines) + "\n"


def _not_run(report: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Requested modules that were not called, with their verdicts (older reports: names)."""
    if "not_run" in report:
        return list(report["not_run"])
    return [{"layer": name} for name in report["never_ran"]]


def _md_row(c: Mapping[str, Any]) -> str:
    s, g = c["stats"], c["grad"]
    verdict = (c.get("verdict") or {}).get("summary", "")
    cells = [
        f"`{_code(c['label'])}`",
        shape_text(c["shape"]),
        f"`{g['grad_fn'] or '-'}`",
        str(g["requires_grad"]),
        "**yes**" if g["modified_in_place"] else "no",
        num_text(s["min"]),
        num_text(s["max"]),
        f"{s['zero_fraction']:.0%}",
        str(s["nan"] + s["posinf"] + s["neginf"]),
        _md(verdict),
    ]
    return "| " + " | ".join(cells) + " |"


def _md(text: str) -> str:
    # Names are data: neutralise Markdown and HTML so a layer name cannot inject markup.
    out = _plain_one_line(str(text))
    for ch in "\\`*_{}[]<>()#+!|":
        out = out.replace(ch, "\\" + ch)
    return out


def _code(text: str) -> str:
    """Text for inside a Markdown code span: backslash escapes are literal there, so only
    backticks (which would end the span) and pipes (which would end a table cell) change."""
    return _plain_one_line(str(text)).replace("`", "'").replace("|", "\\|")


def _plain_one_line(text: str) -> str:
    return for_terminal_plain(text).replace("\n", " ")


# --------------------------------------------------------------------------- terminal


def to_table(report: Mapping[str, Any]) -> Any:
    """A ``rich.table.Table``: one row per capture, warnings in colour."""
    from rich.table import Table

    table = Table(show_lines=False, header_style="bold")
    for column in ("capture", "shape", "grad_fn", "range", "zeros", "notes"):
        table.add_column(column, overflow="fold")
    for c in report["captures"]:
        table.add_row(
            for_terminal(c["label"]),
            shape_text(c["shape"]),
            for_terminal(c["grad"]["grad_fn"] or "-"),
            f"[{num_text(c['stats']['min'])}, {num_text(c['stats']['max'])}]",
            f"{c['stats']['zero_fraction']:.0%}",
            _row_notes(c),
        )
    for entry in _not_run(report):
        summary = for_terminal(entry.get("summary", "never ran"))
        table.add_row(for_terminal(entry["layer"]), "-", "-", "-", "-", summary)
    for item in report.get("output_notes", []):
        note = for_terminal(item["note"])
        table.add_row(for_terminal(item["layer"]), "-", "-", "-", "-", f"[yellow]{note}[/yellow]")
    return table


def output_note_lines(report: Mapping[str, Any]) -> list[str]:
    """``layer: note`` for each captured layer whose output held something not captured."""
    return [f"{item['layer']}: {item['note']}" for item in report.get("output_notes", [])]


def backward_lines(report: Mapping[str, Any]) -> list[str]:
    """Plain-text findings of ``--backward``: an error, or layers whose parameters starved."""
    backward = report.get("backward")
    if not backward:
        return []
    if backward["error"]:
        return [backward["error"]]
    starved = [p["layer"] for p in backward["params"] if p["starved"]]
    lines = [f"backward from the {backward['target']}"]
    if starved:
        lines.append("no gradient reached the trainable parameters of: " + ", ".join(starved))
    return lines


def _row_notes(c: Mapping[str, Any]) -> str:
    notes = []
    verdict = c.get("verdict") or {}
    if verdict.get("summary"):
        style = "green" if verdict.get("connected") else "yellow"
        # The in-place part gets its own red note below, with the grad_fn change.
        summary = verdict["summary"].removesuffix("; modified in place after capture")
        notes.append(f"[{style}]{for_terminal(summary)}[/{style}]")
    gradient = c.get("gradient")
    if gradient is not None:
        notes.append(
            f"grad norm {num_text(gradient['norm'])}"
            if gradient["reached"]
            else "[yellow]no gradient reached it[/yellow]"
        )
    if c["grad"]["modified_in_place"]:
        notes.append(
            f"[red]modified in place after capture ({c['grad']['grad_fn']} -> "
            f"{c['grad']['grad_fn_after']})[/red]"
        )
    s = c["stats"]
    if s["nan"] or s["posinf"] or s["neginf"]:
        notes.append(f"[red]NaN {s['nan']}, +Inf {s['posinf']}, -Inf {s['neginf']}[/red]")
    if s["dead_channels"]:
        last = s.get("channel_axis") == len(c["shape"]) - 1  # features, not dim 1
        where = " (last dim)" if last else ""
        notes.append(
            f"[yellow]{s['dead_channels']} of {s['channels']} channels{where} all zero[/yellow]"
        )
    return "; ".join(notes)
