"""Names are data: layer and tensor names come from files other people made.

``for_terminal`` makes a name safe to print (no rich markup, no control characters);
``for_filename`` makes it safe as one path component inside the output folder.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable

_UNSAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9._#@\-\[\]]+")
MAX_FILENAME_STEM = 120


def for_terminal(text: str) -> str:
    """Escape control and format characters as ``\\xNN`` / ``\\uNNNN`` and rich markup.

    >>> for_terminal("[red]x\\x1b[2J")
    '\\\\[red]x\\\\x1b\\\\[2J'
    """
    from rich.markup import escape

    return escape(for_terminal_plain(text))


def _visible(ch: str) -> str:
    if ch.isprintable() and unicodedata.category(ch) not in ("Cf", "Co", "Cs"):
        return ch
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def for_filename(name: str) -> str:
    """One safe path component: no separators, no traversal, no hidden files, length capped.

    >>> for_filename("../../etc/passwd")
    'etc.passwd'
    """
    cleaned = _UNSAFE_FILE_CHARS.sub("_", unicodedata.normalize("NFKC", name).replace("/", "."))
    cleaned = re.sub(r"\.{2,}", ".", cleaned).strip("._ ") or "layer"
    if len(cleaned) > MAX_FILENAME_STEM:
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:10]
        cleaned = f"{cleaned[: MAX_FILENAME_STEM - 11]}~{digest}"
    return cleaned


def unique_filenames(stems: list[str], suffix: str) -> list[str]:
    """Sanitized, case-insensitively unique file names, in the order given."""
    taken: set[str] = set()
    out = []
    for stem in stems:
        base = for_filename(stem)
        candidate, n = base, 1
        while (candidate + suffix).lower() in taken:
            n += 1
            candidate = f"{base}~{n}"
        taken.add((candidate + suffix).lower())
        out.append(candidate + suffix)
    return out


def for_terminal_plain(text: str) -> str:
    """Control characters escaped, for plain (non-rich) output such as error lines."""
    if text.isascii() and text.isprintable():  # the common case, checked in C
        return text
    return "".join(_visible(ch) for ch in text)


def num_text(value: float | None) -> str:
    """A statistic as the reports print it: 4 significant digits, ``-`` for none."""
    return "-" if value is None else f"{value:.4g}"


def shape_text(shape: Iterable[int]) -> str:
    """``(1, 3, 224, 224)``: how shapes read everywhere fvis prints them."""
    return "(" + ", ".join(str(d) for d in shape) + ")"


def preview(items: Iterable[object], limit: int = 3) -> str:
    """The first ``limit`` items, comma-separated, and how many more: ``a, b, ... (+2 more)``."""
    items = list(items)
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def link_target(name: str) -> str:
    """A relative link to a file: percent-encoded, so ``relu#1.png`` is not read as the page
    ``relu`` with the fragment ``1.png`` (``?``, ``%``, spaces and quotes likewise).

    >>> link_target("relu#1@cat.png")
    'relu%231%40cat.png'
    """
    from urllib.parse import quote

    return quote(name, safe="")
