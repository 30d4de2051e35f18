"""What fvis's pictures are drawn with: the 256-entry colour table (a colour map's 251
colours, then NaN, +Inf, -Inf, background and text) and Pillow's built-in bitmap font, its
metrics and digit glyphs, each built once. Pure, numpy and Pillow only (no torch)."""

from __future__ import annotations

from functools import cache
from typing import cast

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont

from fvis.choices import Cmap

N_COLOURS = 251
MID_INDEX = (N_COLOURS - 1) // 2
NAN_INDEX = 251
POSINF_INDEX = 252
NEGINF_INDEX = 253
BACKGROUND_INDEX = 254
TEXT_INDEX = 255
RESERVED_COLOURS: dict[int, tuple[int, int, int]] = {
    NAN_INDEX: (255, 0, 255),
    POSINF_INDEX: (0, 255, 0),
    NEGINF_INDEX: (0, 255, 255),
    BACKGROUND_INDEX: (22, 60, 70),
    TEXT_INDEX: (250, 250, 250),
}

MAX_TITLE_CHARS = 120


def safe_text(text: str) -> str:
    """Text the bitmap font can draw: others become '?', capped at 120 chars with '...'."""
    safe = "".join(c if ord(c) < 256 and c.isprintable() else "?" for c in text)
    if len(safe) > MAX_TITLE_CHARS:
        safe = safe[: MAX_TITLE_CHARS - 3] + "..."
    return safe


_ANCHORS: dict[Cmap, tuple[str, ...]] = {
    Cmap.GRAY: ("000000", "ffffff"),
    # viridis, magma: 9 evenly spaced samples of matplotlib's tables; coolwarm: Moreland's.
    Cmap.VIRIDIS: (
        *("440154", "472d7b", "3b528b", "2c728e", "21908c"),
        *("27ad81", "5dc863", "aadc32", "fde725"),
    ),
    Cmap.MAGMA: (
        *("000004", "1d1147", "51127c", "822681", "b63679"),
        *("e65164", "fb8861", "fec287", "fcfdbf"),
    ),
    Cmap.COOLWARM: (
        *("3b4cc0", "6282ea", "8db0fe", "b8d0f9", "dddddd"),
        *("f5c4ad", "f49a7b", "de604d", "b40426"),
    ),
}


def cmap_table(cmap: Cmap) -> NDArray[np.uint8]:
    """The colour map's (251, 3) RGB table, low to high, interpolated from anchor colours.

    >>> cmap_table(Cmap.GRAY)[[0, -1]].tolist()
    [[0, 0, 0], [255, 255, 255]]
    """
    anchors = np.array([list(bytes.fromhex(h)) for h in _ANCHORS[cmap]], np.float64)
    at = np.linspace(0.0, 1.0, len(anchors))
    x = np.linspace(0.0, 1.0, N_COLOURS)
    channels = [np.interp(x, at, anchors[:, i]) for i in range(3)]
    return np.rint(np.stack(channels, axis=1)).astype(np.uint8)


@cache
def palette(cmap: Cmap) -> bytes:
    """The 256-entry RGB palette: colour map, then the reserved colours."""
    table = np.zeros((256, 3), np.uint8)
    table[:N_COLOURS] = cmap_table(cmap)
    for index, rgb in RESERVED_COLOURS.items():
        table[index] = rgb
    return table.tobytes()


@cache
def bitmap_font() -> ImageFont.ImageFont:
    """Pillow's built-in bitmap font: Latin-1, fixed metrics, no FreeType needed."""
    loader = getattr(ImageFont, "load_default_imagefont", None)  # Pillow >= 10.1
    # Before 10.1, load_default() itself returned the bitmap font.
    return cast(ImageFont.ImageFont, loader() if loader else ImageFont.load_default())


def text_width(text: str) -> int:
    """Pixel width of text in the bitmap font."""
    return int(bitmap_font().getbbox(text)[2])


@cache
def line_height() -> int:
    """Height of one line of text in the bitmap font, plus one pixel of leading."""
    return int(bitmap_font().getbbox("0Ag|_")[3]) + 1


@cache
def digit_glyphs() -> NDArray[np.bool_]:
    """(11, height, width) masks of '0'..'9' and a blank, drawn once with the bitmap font."""
    gw = max(text_width(d) for d in "0123456789")
    gh = line_height() - 1
    glyphs = np.zeros((11, gh, gw), np.bool_)
    for digit in range(10):
        mask = Image.new("1", (gw, gh), 0)
        ImageDraw.Draw(mask).text((0, 0), str(digit), fill=1, font=bitmap_font())
        glyphs[digit] = np.asarray(mask)
    glyphs.flags.writeable = False
    return glyphs
