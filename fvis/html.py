"""``report.html``: one self-contained page from the same report dict as ``report.json``.

No server, no network: CSS and a small script are inline; pictures are embedded as data URIs
when they total at most ``EMBED_LIMIT`` bytes (the page then works on its own, e.g. as a CI
artifact), and referenced relative to the page otherwise (it then needs its folder). Every
name from the model goes through Jinja2's autoescaping: names are data, not HTML.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

from fvis.text import for_terminal_plain, link_target, num_text, shape_text

EMBED_LIMIT = 8 << 20  # bytes of PNG embedded before switching to relative links


def to_html(report: Mapping[str, Any], pngs: Mapping[str, bytes] | None = None) -> str:
    """Render the page; ``pngs`` maps the pictures named in the report to their bytes (they
    are embedded when small enough, else linked by name).

    >>> page = to_html(report)                        # doctest: +SKIP
    >>> page.startswith("<!DOCTYPE html>")
    True
    """
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("fvis", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        # Every printed value: control characters from layer names become visible \xNN text
        # (autoescaping then handles <, >, & and quotes).
        finalize=_visible,
    )
    env.filters["num"] = num_text
    env.filters["shape"] = shape_text
    sources = _image_sources(pngs or {})
    return env.get_template("report.html.j2").render(
        report=report,
        src=lambda name: sources.get(name) or link_target(name),
        badge=badge,
        tree=_tree_rows(report),
        grad_bars=_grad_bars(report),
        embedded=bool(sources),
        data_json=_script_json({"captures": [c["label"] for c in report["captures"]]}),
        index_of={c["label"]: i for i, c in enumerate(report["captures"])},
    )


def _script_json(value: Any) -> Any:
    """JSON safe inside ``<script>``: no ``</script>`` or ``<!--`` can be formed."""
    from markupsafe import Markup

    text = json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e")
    return Markup(text.replace("&", "\\u0026"))


def _visible(value: Any) -> Any:
    from markupsafe import Markup

    if not isinstance(value, str) or isinstance(value, Markup):  # Markup is ours, already safe
        return value
    return for_terminal_plain(value)


def badge(capture: Mapping[str, Any]) -> tuple[str, str]:
    """``(css class, text)`` of the verdict badge for one capture."""
    verdict = capture.get("verdict") or {}
    stats = capture["stats"]
    if stats["nan"] or stats["posinf"] or stats["neginf"]:
        return "bad", "non-finite"
    if capture["grad"]["modified_in_place"]:
        return "warn", "in place"
    if verdict.get("connected"):
        return "ok", "connected"
    cause = verdict.get("cause", "disconnected")
    return "cut", cause.replace("-", " ")


def _image_sources(pngs: Mapping[str, bytes]) -> dict[str, Any]:
    from markupsafe import Markup

    if sum(len(data) for data in pngs.values()) > EMBED_LIMIT:
        return {}
    # Markup: base64 needs no escaping, and skipping the per-value checks keeps pages fast.
    return {
        name: Markup("data:image/png;base64," + base64.b64encode(data).decode())
        for name, data in pngs.items()
    }


def _tree_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The module tree with each layer's badges (from its captures), depth-first."""
    by_layer: dict[str, list[tuple[str, str, str]]] = {}
    for c in report["captures"]:
        css, text = badge(c)
        by_layer.setdefault(c["layer"], []).append((css, text, c["label"]))
    never = set(report["never_ran"])
    rows = []
    for layer in report.get("layers", []):
        badges = by_layer.get(layer["name"], [])
        if layer["name"] in never:
            badges = [("bad", "never ran", layer["name"])]
        rows.append({**layer, "badges": badges})
    return rows


def _grad_bars(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    norms = [
        (c["label"], (c.get("gradient") or {}).get("norm"))
        for c in report["captures"]
        if "gradient" in c
    ]
    peak = max((n for _, n in norms if n), default=0.0)
    return [
        {
            "label": label,
            "norm": norm,
            "width": 0 if not norm or not peak else max(1, round(100 * norm / peak)),
        }
        for label, norm in norms
    ]
