"""Pictures of token sequences you can read (pure, numpy and Pillow only).

``render_tokens`` draws one sample's ``(T, D)`` activation as a heatmap with one row per
token: the tokens (or their positions) label the rows, the dims shown label the columns
(the ``max_channels`` dims with the most energy when D is larger, kept in their order), and a
colour-scale legend under it gives the values the colours stand for. Rows are at least one
text line high while the labels fit (long sequences get thinner rows, every n-th labelled).

``render_attention`` draws ``(H, T, T)`` attention probabilities as one tile per head, each
cell a token pair, with the tokens along both axes of every tile.

Both use the palette of ``fvis.render`` (the same colour maps and reserved colours).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw

from fvis.palette import (
    BACKGROUND_INDEX,
    N_COLOURS,
    TEXT_INDEX,
    bitmap_font,
    digit_glyphs,
    line_height,
    palette,
    safe_text,
    text_width,
)
from fvis.render import (
    _GAP,
    DEFAULT_OPTIONS,
    Cmap,
    Layout,
    RenderInfo,
    RenderOptions,
    _as_real,
    _header_lines,
    _robust_bounds,
    _stats,
    _to_indices,
    _top_by_energy,
    _upscale,
)

_MAX_LABEL_CHARS = 12
_MAX_BODY_SIDE = 2048
_LEGEND_H = 8
# Byte-level BPE (GPT-2) and SentencePiece mark a leading space with a letter the bitmap
# font cannot draw: show it as '_' (and GPT-2's newline as '\n').
_TOKEN_MARKS = str.maketrans({"Ġ": "_", "▁": "_", "Ċ": "\\n", "ĉ": "\\t"})


def token_label(token: str) -> str:
    """A token as the bitmap font can draw it, at most 12 characters.

    >>> token_label("Ġworld")
    '_world'
    """
    text = safe_text(token.translate(_TOKEN_MARKS))
    return text if len(text) <= _MAX_LABEL_CHARS else text[: _MAX_LABEL_CHARS - 1] + "~"


def row_labels(count: int, tokens: Sequence[str] | None) -> tuple[str, ...]:
    """The tokens when there is one per row, else the positions ``0..count-1``."""
    if tokens is not None and len(tokens) == count:
        return tuple(token_label(t) for t in tokens)
    return tuple(str(i) for i in range(count))


def render_tokens(
    values: NDArray[np.floating],
    title: str,
    tokens: Sequence[str] | None,
    options: RenderOptions = DEFAULT_OPTIONS,
    notes: tuple[str, ...] = (),
) -> tuple[Image.Image, RenderInfo]:
    """Draw one sample's ``(T, D)`` tokens: labelled rows, labelled dims, a legend."""
    arr = _as_real(values)
    value_range, *counts = _stats(arr)
    t, d = arr.shape
    shown = tuple(range(d))
    extra = list(notes)
    if d > options.max_channels:
        shown = _top_by_energy(arr.T, options.max_channels)
        extra.append(f"{len(shown)} of {d} dims shown (top by energy), labelled with their index")
    data = arr[:, list(shown)]
    low, high = _robust_bounds(data.reshape(1, -1), options.low_pct, options.high_pct)
    indices = _to_indices(data.reshape(1, -1), options).reshape(data.shape)
    labels = row_labels(t, tokens)
    if tokens is None or len(tokens) != t:
        extra.append("rows: token positions")
    row_h, every = _row_height(t)
    col_w = max(1, min(text_width("0") + 1, _MAX_BODY_SIDE // max(len(shown), 1)))
    body = _upscale(indices, row_h, col_w)
    dims = _column_labels(shown, col_w)
    header = _header_lines(title, arr.shape, value_range, tuple(extra), _three(counts))
    picture = _assemble(
        header,
        labels,
        every,
        row_h,
        dims,
        body,
        (float(low[0]), float(high[0])) if value_range else None,
        options.cmap,
    )
    return picture, _info(Layout.TOKENS, shown, d, value_range, counts, extra, header)


def _info(
    layout: Layout,
    shown: tuple[int, ...],
    total: int,
    value_range: tuple[float, float] | None,
    counts: list[int],
    notes: list[str],
    header: list[str],
) -> RenderInfo:
    nan, posinf, neginf = _three(counts)
    return RenderInfo(
        layout, shown, total, value_range, nan, posinf, neginf, "; ".join(notes), tuple(header)
    )


def _three(counts: list[int]) -> tuple[int, int, int]:
    return (counts[0], counts[1], counts[2])


def _row_height(rows: int) -> tuple[int, int]:
    """Pixels per row, and every how many rows a label is drawn."""
    line = line_height()
    height = line if rows * line <= _MAX_BODY_SIDE else max(1, _MAX_BODY_SIDE // rows)
    return height, math.ceil(line / height)


def _column_labels(shown: tuple[int, ...], col_w: int) -> NDArray[np.uint8]:
    """Each shown dim's index as digits stacked top to bottom over its column (columns too
    narrow for a digit are labelled every n-th)."""
    glyphs = digit_glyphs()
    _, gh, gw = glyphs.shape
    digits = max(len(str(i)) for i in shown) if shown else 1
    every = math.ceil((gw + 1) / col_w)
    strip = np.full((digits * gh + 1, len(shown) * col_w), BACKGROUND_INDEX, np.uint8)
    for position, index in enumerate(shown):
        if position % every:
            continue
        text = str(index).rjust(digits)  # units line up along the bottom row
        for row, char in enumerate(text):
            if char == " ":
                continue
            mask = glyphs[int(char)][:, : strip.shape[1] - position * col_w]
            cell = strip[row * gh : (row + 1) * gh, position * col_w : position * col_w + gw]
            cell[mask[:, : cell.shape[1]]] = TEXT_INDEX
    return strip


def _assemble(
    lines: list[str],
    labels: tuple[str, ...],
    every: int,
    row_h: int,
    dims: NDArray[np.uint8],
    body: NDArray[np.uint8],
    bounds: tuple[float, float] | None,
    cmap: Cmap,
) -> Image.Image:
    """Title lines; dim labels over the body; token labels left of it; the legend below."""
    line_h, gap = line_height(), _GAP
    label_w = max(text_width(label) for label in labels) + gap
    legend = _legend_text(bounds)
    top = gap * 2 + len(lines) * line_h
    body_top = top + dims.shape[0]
    legend_top = body_top + body.shape[0] + gap * 2
    width = max(label_w + body.shape[1], max(text_width(x) for x in lines), _legend_width(legend))
    height = legend_top + max(_LEGEND_H, line_h) + gap
    canvas = np.full((height, width + 2 * gap), BACKGROUND_INDEX, np.uint8)
    left = gap + label_w
    canvas[top:body_top, left : left + dims.shape[1]] = dims
    canvas[body_top : body_top + body.shape[0], left : left + body.shape[1]] = body
    image = Image.fromarray(canvas)
    image.putpalette(palette(cmap))
    draw = ImageDraw.Draw(image)
    font = bitmap_font()
    for i, line in enumerate(lines):
        draw.text((gap, gap + i * line_h), line, fill=TEXT_INDEX, font=font)
    for i in range(0, len(labels), every):
        draw.text((gap, body_top + i * row_h), labels[i], fill=TEXT_INDEX, font=font)
    _draw_legend(image, legend, legend_top)
    return image


def render_attention(
    values: NDArray[np.floating],
    title: str,
    tokens: Sequence[str],
    options: RenderOptions = DEFAULT_OPTIONS,
    notes: tuple[str, ...] = (),
) -> tuple[Image.Image, RenderInfo]:
    """Draw one sample's ``(H, T, T)`` attention: a tile per head, tokens along both axes
    (queries down the left, keys across the top), and the colour legend."""
    arr = _as_real(values)
    value_range, *counts = _stats(arr)
    heads, t, _ = arr.shape
    shown = tuple(range(min(heads, options.max_channels)))
    extra = [*notes, "rows: queries, columns: keys"]
    if len(shown) < heads:
        extra.append(f"heads 0-{len(shown) - 1} of {heads} shown")
    data = arr[list(shown)]
    # One colour scale for every head: probabilities compare across heads, and the legend
    # then holds for each tile.
    indices = _to_indices(data.reshape(1, -1), options).reshape(data.shape)
    low, high = _robust_bounds(data.reshape(1, -1), options.low_pct, options.high_pct)
    cell, every = _row_height(t * math.ceil(math.sqrt(len(shown))))
    labels = row_labels(t, tokens)
    tiles = [_attention_tile(indices[h], h, labels, cell, every) for h in shown]
    header = _header_lines(title, arr.shape, value_range, tuple(extra), _three(counts))
    picture = _assemble_tiles(header, tiles, (float(low[0]), float(high[0])), options.cmap)
    return picture, _info(Layout.GRID, shown, heads, value_range, counts, extra, header)


def _attention_tile(
    indices: NDArray[np.uint8], head: int, labels: tuple[str, ...], cell: int, every: int
) -> Image.Image:
    """One head: its title, key labels written upwards over the columns, query labels to the
    left of the rows."""
    font, line_h, gap = bitmap_font(), line_height(), _GAP
    label_w = max(text_width(label) for label in labels) + gap
    body = _upscale(indices, cell, cell)
    top = line_h + label_w
    tile = Image.new("P", (label_w + body.shape[1] + gap, top + body.shape[0] + gap))
    tile.paste(BACKGROUND_INDEX, (0, 0, tile.width, tile.height))
    tile.paste(Image.fromarray(body), (label_w, top))
    draw = ImageDraw.Draw(tile)
    draw.text((label_w, 0), f"head {head}", fill=TEXT_INDEX, font=font)
    for i in range(0, len(labels), every):
        draw.text((0, top + i * cell), labels[i], fill=TEXT_INDEX, font=font)
        upright = Image.new("L", (label_w, line_h), 0)
        ImageDraw.Draw(upright).text((0, 0), labels[i], fill=255, font=font)
        turned = np.asarray(upright.rotate(90, expand=True)) > 127  # reads bottom to top
        x = label_w + i * cell
        region = np.asarray(tile)[line_h : line_h + turned.shape[0], x : x + turned.shape[1]]
        patch = np.where(turned[: region.shape[0], : region.shape[1]], TEXT_INDEX, region)
        tile.paste(Image.fromarray(patch.astype(np.uint8)), (x, line_h))
    return tile


def _assemble_tiles(
    lines: list[str], tiles: list[Image.Image], bounds: tuple[float, float], cmap: Cmap
) -> Image.Image:
    """Tiles in a near-square grid under the title lines, the legend below."""
    gap, line_h = _GAP, line_height()
    cols = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    tile_w, tile_h = max(t.width for t in tiles), max(t.height for t in tiles)
    legend = _legend_text(bounds)
    top = gap * 2 + len(lines) * line_h
    legend_top = top + rows * (tile_h + gap) + gap
    width = max(cols * (tile_w + gap), max(text_width(x) for x in lines), _legend_width(legend))
    image = Image.new("P", (width + 2 * gap, legend_top + line_h + gap))
    image.putpalette(palette(cmap))
    image.paste(BACKGROUND_INDEX, (0, 0, image.width, image.height))
    for n, tile in enumerate(tiles):
        image.paste(tile, (gap + (n % cols) * (tile_w + gap), top + (n // cols) * (tile_h + gap)))
    _draw_legend(image, legend, legend_top)
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((gap, gap + i * line_h), line, fill=TEXT_INDEX, font=bitmap_font())
    return image


def _draw_legend(image: Image.Image, legend: tuple[str, str], legend_top: int) -> None:
    """The colour bar (every colour-map index, low to high) between its two end values."""
    gap, line_h = _GAP, line_height()
    bar_left = gap + text_width(legend[0]) + gap
    bar_top = legend_top + max(0, (line_h - _LEGEND_H) // 2)
    ramp = np.repeat(np.arange(N_COLOURS, dtype=np.uint8)[None, :], _LEGEND_H, axis=0)
    image.paste(Image.fromarray(ramp), (bar_left, bar_top))
    draw = ImageDraw.Draw(image)
    draw.text((gap, legend_top), legend[0], fill=TEXT_INDEX, font=bitmap_font())
    draw.text(
        (bar_left + N_COLOURS + gap, legend_top), legend[1], fill=TEXT_INDEX, font=bitmap_font()
    )


def _legend_text(bounds: tuple[float, float] | None) -> tuple[str, str]:
    if bounds is None:
        return ("no finite values", "")
    return (f"{bounds[0]:.3g}", f"{bounds[1]:.3g}")


def _legend_width(legend: tuple[str, str]) -> int:
    return text_width(legend[0]) + N_COLOURS + text_width(legend[1]) + 4 * _GAP
