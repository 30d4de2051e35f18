"""Activation array -> palette image (pure, numpy only) and image -> PNG file (I/O).

``render`` takes one sample's activation as a numpy array and returns a Pillow ``P``
(palette) image plus a ``RenderInfo`` record saying what is shown. ``save_png`` writes it.
No torch here: rendering in numpy never competes with torch's intra-op threads.

Layout by ``values.ndim`` (batch already removed):

- 0 or 1, and ``(C, 1, 1)`` maps: a strip, one cell per value, wrapped into rows past 256.
- 2 ``(T, D)``: a heatmap, one pixel per value; an axis shorter than 8 is stretched.
- 3 ``(C, H, W)``: a near-square grid of unscaled tiles, each labelled with its channel.
- 4 ``(C, D, H, W)``: the middle frame along D, as a grid; more dims: leading dims are
  flattened into channels first.

Grids keep the ``max_channels`` channels with the most energy (mean square over finite
values), in their original order. Normalisation uses robust order-statistic percentiles
over finite values, per channel or over all shown channels (``NormScope``; strips and
heatmaps are always normalised as a whole). A body larger than 2048 x 2048 pixels is
downsampled by blocks, each drawn as its value of largest magnitude (so extremes stay
visible), and the note says so.

Colour table (256 entries): indices ``0..250`` are the colour map (low -> high), then

=====  ==========  ================  ====================================
index  meaning     RGB               why this colour
=====  ==========  ================  ====================================
251    NaN         (255, 0, 255)     magenta: in none of the colour maps
252    +Inf        (0, 255, 0)       pure green: in none of the colour maps
253    -Inf        (0, 255, 255)     cyan: in none of the colour maps
254    background  (22, 60, 70)      dark teal-grey: gaps between tiles
255    text        (250, 250, 250)   near-white: titles and labels
=====  ==========  ================  ====================================

None of the three non-finite colours occurs in any colour map's table (a test checks it).
A map whose robust range is a single value is drawn in the middle colour (values below
and above it, if any, at the two ends). NaN and +/-Inf are excluded from every statistic.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

import numpy as np
from numpy.typing import ArrayLike, NDArray
from PIL import Image, ImageDraw

from fvis.choices import Cmap, NormScope
from fvis.errors import OutputError, UsageError
from fvis.palette import (
    BACKGROUND_INDEX,
    MID_INDEX,
    N_COLOURS,
    NAN_INDEX,
    NEGINF_INDEX,
    POSINF_INDEX,
    RESERVED_COLOURS,
    TEXT_INDEX,
    bitmap_font,
    cmap_table,
    digit_glyphs,
    line_height,
    palette,
    safe_text,
    text_width,
)

__all__ = [
    "DEFAULT_OPTIONS",
    "RESERVED_COLOURS",
    "Cmap",
    "Layout",
    "NormScope",
    "RenderInfo",
    "RenderOptions",
    "cmap_table",
    "render",
    "save_png",
]

_GAP = 2  # px between grid cells, and the margin around everything
_MAX_BODY_PIXELS = 1 << 22  # 2048 x 2048: beyond this, subsample rather than write a huge PNG
_STRIP_WRAP = 256
_MIN_AXIS_PX = 8

_E = TypeVar("_E", bound=StrEnum)


class Layout(StrEnum):
    """How the values were laid out in the image."""

    GRID = "grid"
    HEATMAP = "heatmap"
    STRIP = "strip"
    TOKENS = "tokens"  # (T, D) rows of tokens, labelled (fvis.sequences)
    EMPTY = "empty"


def _choice(enum: type[_E], value: str, name: str) -> _E:
    """Coerce a string to a StrEnum member, or raise a UsageError listing the choices."""
    try:
        return enum(value)
    except ValueError:
        choices = ", ".join(member.value for member in enum)
        raise UsageError(f"unknown {name} {value!r}; choose one of: {choices}") from None


@dataclass(frozen=True)
class RenderOptions:
    """How to draw an activation; validated on construction."""

    cmap: Cmap = Cmap.VIRIDIS
    norm_scope: NormScope = NormScope.CHANNEL
    max_channels: int = 64
    low_pct: float = 1.0
    high_pct: float = 99.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "cmap", _choice(Cmap, self.cmap, "cmap"))
        object.__setattr__(self, "norm_scope", _choice(NormScope, self.norm_scope, "norm_scope"))
        if self.max_channels < 1:
            raise UsageError(f"max_channels must be at least 1, got {self.max_channels}")
        if not 0.0 <= self.low_pct < self.high_pct <= 100.0:
            raise UsageError(
                f"percentiles need 0 <= low < high <= 100, got low={self.low_pct} "
                f"high={self.high_pct}"
            )


DEFAULT_OPTIONS = RenderOptions()


@dataclass(frozen=True)
class RenderInfo:
    """What an image shows. Counts and ``value_range`` cover the whole array."""

    layout: Layout
    shown_channels: tuple[int, ...]
    total_channels: int
    value_range: tuple[float, float] | None
    nan_count: int
    posinf_count: int
    neginf_count: int
    note: str
    header: tuple[str, ...] = ()  # the text lines of the title strip, as drawn


@dataclass(frozen=True)
class _View:
    """The part of the array that gets drawn, and how."""

    layout: Layout
    data: NDArray[np.floating]
    shown: tuple[int, ...]
    total: int
    notes: tuple[str, ...]


def render(
    values: ArrayLike,
    title: str,
    options: RenderOptions = DEFAULT_OPTIONS,
    notes: tuple[str, ...] = (),
) -> tuple[Image.Image, RenderInfo]:
    """Draw one sample's activation as a palette image with a title strip.

    >>> image, info = render(np.arange(12.0).reshape(3, 2, 2), "inner.relu #1")
    >>> image.mode, info.layout, info.shown_channels, info.value_range
    ('P', <Layout.GRID: 'grid'>, (0, 1, 2), (0.0, 11.0))

    ``notes`` (what the caller did to the values, e.g. moved channels first) lead the notes.
    """
    arr = _as_real(values)
    value_range, nan_count, posinf_count, neginf_count = _stats(arr)
    if arr.size == 0:
        view = _View(Layout.EMPTY, arr, (), 0, ("empty: no values to draw",))
        body = np.zeros((0, 0), np.uint8)
    else:
        view = _subsample(_select_view(arr, options.max_channels))
        body = _draw_body(view, options)
    if notes:
        view = _View(view.layout, view.data, view.shown, view.total, (*notes, *view.notes))
    counts = (nan_count, posinf_count, neginf_count)
    lines = _header_lines(title, arr.shape, value_range, view.notes, counts)
    image = _compose(lines, body, options.cmap)
    info = RenderInfo(
        layout=view.layout,
        shown_channels=view.shown,
        total_channels=view.total,
        value_range=value_range,
        nan_count=nan_count,
        posinf_count=posinf_count,
        neginf_count=neginf_count,
        note="; ".join(view.notes),
        header=tuple(lines),
    )
    return image, info


def retitle(image: Image.Image, info: RenderInfo, old: str, new: str) -> Image.Image:
    """The same picture with ``old`` (the title it was drawn with) replaced by ``new`` in its
    title line: a shared module's first call is only known to be ``relu#1`` once a second
    call happened, after its picture was drawn (and its values dropped)."""
    if not info.header or old == new:
        return image
    first = info.header[0]
    drawn = safe_text(old)
    lines = [safe_text(new) + first[len(drawn) :] if first.startswith(drawn) else first]
    lines += info.header[1:]
    top = _GAP * 2 + len(info.header) * line_height()
    body = np.asarray(image)[top : image.height - _GAP, _GAP:]
    width = max(text_width(line) for line in lines) + 2 * _GAP
    canvas = np.full((image.height, max(image.width, width)), BACKGROUND_INDEX, np.uint8)
    canvas[top : image.height - _GAP, _GAP : _GAP + body.shape[1]] = body
    out = Image.fromarray(canvas)
    out.putpalette(image.getpalette() or [])
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((_GAP, _GAP + i * line_height()), line, fill=TEXT_INDEX, font=bitmap_font())
    return out


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes; ``compress_level=1`` is several times faster than the default for files only
    a little larger."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def save_png(image: Image.Image, path: Path) -> None:
    """Write ``image`` as PNG at ``path`` (fast compression; the caller handles atomicity).

    >>> image, _ = render(np.eye(3), "eye")
    >>> save_png(image, Path(tmp) / "eye.png")  # doctest: +SKIP
    """
    try:
        path.write_bytes(encode_png(image))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise OutputError(
            f"cannot write PNG '{path}': {reason}",
            hint="check that the output folder exists, is writable and has free space",
        ) from exc


# --- choosing what to draw -------------------------------------------------------------


def _as_real(values: ArrayLike) -> NDArray[np.floating]:
    """The values as a float32/float64 array; other real dtypes are converted to float32."""
    arr = np.asarray(values)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"render needs a real numeric array, got dtype {arr.dtype}")
    if arr.dtype in (np.float32, np.float64):
        return arr
    return arr.astype(np.float32)


def _stats(arr: NDArray[np.floating]) -> tuple[tuple[float, float] | None, int, int, int]:
    """Finite min/max (None if no finite value) and the NaN, +Inf, -Inf counts."""
    finite = np.isfinite(arr)
    nan_count = int(np.count_nonzero(np.isnan(arr)))
    posinf_count = int(np.count_nonzero(np.isposinf(arr)))
    neginf_count = arr.size - nan_count - posinf_count - int(np.count_nonzero(finite))
    if not finite.any():
        return None, nan_count, posinf_count, neginf_count
    low = float(np.min(arr, where=finite, initial=np.inf))
    high = float(np.max(arr, where=finite, initial=-np.inf))
    return (low, high), nan_count, posinf_count, neginf_count


def _select_view(arr: NDArray[np.floating], max_channels: int) -> _View:
    """Pick the layout for a non-empty array and the channels to show."""
    if arr.ndim <= 1:
        return _View(Layout.STRIP, arr.reshape(-1), (0,), 1, ())
    if arr.ndim == 2:
        return _View(Layout.HEATMAP, arr, (0,), 1, ())
    maps, notes = _as_channels(arr)
    total = maps.shape[0]
    if maps.shape[1:] == (1, 1):
        # Per-channel normalisation of 1x1 maps would be all mid-colour: show one strip.
        notes += (f"{total} channels of 1x1 shown as a strip",)
        return _View(Layout.STRIP, maps.reshape(-1), tuple(range(total)), total, notes)
    shown = tuple(range(total))
    if total > max_channels:
        shown = _top_by_energy(maps, max_channels)
        maps = maps[list(shown)]
        notes += (f"{len(shown)} of {total} channels shown (top by energy)",)
    return _View(Layout.GRID, maps, shown, total, notes)


def _as_channels(arr: NDArray[np.floating]) -> tuple[NDArray[np.floating], tuple[str, ...]]:
    """A (C, H, W) view of a 3-D or larger array, with notes on what was merged or dropped."""
    notes: tuple[str, ...] = ()
    if arr.ndim >= 5:
        lead = tuple(arr.shape[:-3])
        arr = arr.reshape(-1, *arr.shape[-3:])
        notes += (f"leading dims {lead} flattened to {arr.shape[0]} channels",)
    if arr.ndim == 4:
        depth = arr.shape[1]
        middle = (depth - 1) // 2
        arr = arr[:, middle]
        notes += (f"middle frame {middle} of {depth} (0-based, along dim 1)",)
    return arr, notes


def _top_by_energy(maps: NDArray[np.floating], k: int) -> tuple[int, ...]:
    """Indices of the k channels with the largest mean square over finite values, in order."""
    flat = maps.reshape(maps.shape[0], -1)
    finite = np.isfinite(flat)
    clean = np.where(finite, flat, 0.0)
    # Scaled by the largest magnitude so that squares of huge values cannot overflow and tie.
    peak = float(np.max(np.abs(clean)))
    squares = np.square(clean / (peak or 1.0), dtype=np.float64)
    energy = squares.sum(axis=1) / np.maximum(finite.sum(axis=1), 1)
    top = np.argsort(-energy, kind="stable")[:k]
    return tuple(int(i) for i in np.sort(top))


def _subsample(view: _View) -> _View:
    """Shrink a huge body by blocks, keeping each block's value of largest magnitude (its
    sign too; NaN first, then +/-Inf), so a single outlier row, column or value stays
    visible: a stride would drop it."""
    step = math.ceil(math.sqrt(view.data.size / _MAX_BODY_PIXELS))
    if step <= 1:
        return view
    if view.data.ndim == 1:
        step = math.ceil(view.data.size / _MAX_BODY_PIXELS)
        data, what = _block_extremes(view.data[None, :], 1, step)[0], f"run of {step} values"
    else:
        data, what = _block_extremes(view.data, step, step), f"{step}x{step} block"
    note = f"downsampled: each {what} drawn as its value of largest magnitude"
    return _View(view.layout, data, view.shown, view.total, (*view.notes, note))


def _block_extremes(data: NDArray[np.floating], sy: int, sx: int) -> NDArray[np.floating]:
    """The last two axes reduced by (sy, sx) blocks to the entry of largest magnitude."""
    *lead, h, w = data.shape
    rows, cols = -(-h // sy), -(-w // sx)
    # Zero padding never wins: a block of zeros and padding is zero anyway.
    padded = np.zeros((*lead, rows * sy, cols * sx), data.dtype)
    padded[..., :h, :w] = data
    blocks = padded.reshape(*lead, rows, sy, cols, sx)
    blocks = np.moveaxis(blocks, -3, -2).reshape(*lead, rows, cols, sy * sx)
    with np.errstate(invalid="ignore"):
        pick = np.argmax(np.abs(blocks), axis=-1)  # argmax returns the first NaN if any
    return np.take_along_axis(blocks, pick[..., None], axis=-1)[..., 0]


# --- values to palette indices ---------------------------------------------------------


def _draw_body(view: _View, options: RenderOptions) -> NDArray[np.uint8]:
    """Palette indices for the body of the image (everything below the title strip)."""
    data = view.data
    if view.layout is Layout.STRIP:
        return _strip_body(_to_indices(data.reshape(1, -1), options).reshape(-1))
    if view.layout is Layout.HEATMAP:
        return _heatmap_body(_to_indices(data.reshape(1, -1), options).reshape(data.shape))
    per_channel = options.norm_scope is NormScope.CHANNEL
    rows = data.reshape(data.shape[0], -1) if per_channel else data.reshape(1, -1)
    tiles = _to_indices(rows, options).reshape(data.shape)
    return _grid_body(tiles, view.shown)


def _to_indices(rows: NDArray[np.floating], options: RenderOptions) -> NDArray[np.uint8]:
    """Map each row to colour-map indices over its own robust range; mark non-finite values."""
    low, high = _robust_bounds(rows, options.low_pct, options.high_pct)
    finite = np.isfinite(rows)
    span = high - low
    ok = span > 0
    scale = np.where(ok, (N_COLOURS - 1) / np.where(ok, span, 1.0), 0.0)
    with np.errstate(invalid="ignore", over="ignore"):
        shifted = rows - low[:, None]
        levels = shifted * scale[:, None]
        if not ok.all():
            # A single-value range: that value mid-colour, anything below/above at the ends.
            levels[~ok] = MID_INDEX + np.sign(shifted[~ok]) * MID_INDEX
    np.copyto(levels, 0.0, where=~finite)
    np.clip(levels, 0, N_COLOURS - 1, out=levels)
    indices = np.rint(levels).astype(np.uint8)
    np.copyto(indices, NAN_INDEX, where=np.isnan(rows))
    np.copyto(indices, POSINF_INDEX, where=np.isposinf(rows))
    np.copyto(indices, NEGINF_INDEX, where=np.isneginf(rows))
    return indices


def _robust_bounds(
    rows: NDArray[np.floating], low_pct: float, high_pct: float
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per-row order-statistic percentiles over finite values (0, 0 for rows with none).

    Same as ``np.percentile`` with ``method="higher"`` for the low bound and ``"lower"``
    for the high one, so a single outlier never becomes the bound of a small map.
    """
    finite = np.isfinite(rows)
    counts = finite.sum(axis=1)
    clean = rows if finite.all() else np.where(finite, rows, np.inf)  # non-finite sort last
    low = np.zeros(rows.shape[0])
    high = np.zeros(rows.shape[0])
    for n in np.unique(counts[counts > 0]):
        members = counts == n
        k_low, k_high = _order_ranks(int(n), low_pct, high_pct)
        part = np.partition(clean[members], (k_low, k_high), axis=1)
        low[members] = part[:, k_low]
        high[members] = part[:, k_high]
    return low, high


def _order_ranks(n: int, low_pct: float, high_pct: float) -> tuple[int, int]:
    """Ranks of the low and high bounds among n sorted values; min and max if too few."""
    k_low = math.ceil(low_pct / 100 * (n - 1))
    k_high = math.floor(high_pct / 100 * (n - 1))
    return (k_low, k_high) if k_low < k_high else (0, n - 1)


# --- palette indices to a body ---------------------------------------------------------


def _strip_body(indices: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """One cell per value, wrapped into a near-square block past 256 values."""
    n = indices.size
    cols = n if n <= _STRIP_WRAP else max(_STRIP_WRAP, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    cell_w = min(max(512 // cols, 1), 16)
    cell_h = max(cell_w, math.ceil(2 * _MIN_AXIS_PX / rows))
    padded = np.full(rows * cols, BACKGROUND_INDEX, np.uint8)
    padded[:n] = indices
    return _upscale(padded.reshape(rows, cols), cell_h, cell_w)


def _heatmap_body(indices: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """One pixel per value; tiny maps and thin axes stretched by integer factors."""
    t, d = indices.shape
    both_tiny = max(t, d) < _MIN_AXIS_PX
    base = 64 // max(t, d) if both_tiny else 1
    return _upscale(indices, max(base, -(-_MIN_AXIS_PX // t)), max(base, -(-_MIN_AXIS_PX // d)))


def _upscale(indices: NDArray[np.uint8], fy: int, fx: int) -> NDArray[np.uint8]:
    """Repeat each pixel fy times down and fx times across."""
    if fy > 1:
        indices = np.repeat(indices, fy, axis=0)
    if fx > 1:
        indices = np.repeat(indices, fx, axis=1)
    return indices


def _grid_body(tiles: NDArray[np.uint8], labels: tuple[int, ...]) -> NDArray[np.uint8]:
    """Tiles in a near-square grid, each under its channel label, with background gaps."""
    n, h, w = tiles.shape
    masks = _label_masks(labels)
    label_h = masks.shape[1] + 1
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    cell_h, cell_w = label_h + h + _GAP, max(w, masks.shape[2]) + _GAP
    cells = np.full((rows * cols, cell_h, cell_w), BACKGROUND_INDEX, np.uint8)
    cells[:n, : masks.shape[1], : masks.shape[2]][masks] = TEXT_INDEX
    cells[:n, label_h : label_h + h, :w] = tiles
    body = cells.reshape(rows, cols, cell_h, cell_w).transpose(0, 2, 1, 3)
    return body.reshape(rows * cell_h, cols * cell_w)[:-_GAP, :-_GAP]


def _label_masks(labels: tuple[int, ...]) -> NDArray[np.bool_]:
    """(n, glyph height, width) text masks for the labels, built from cached digit glyphs."""
    glyphs = digit_glyphs()
    width = max(len(str(label)) for label in labels)
    text = "".join(str(label).ljust(width) for label in labels).encode("ascii")
    codes = np.frombuffer(text, np.uint8).reshape(len(labels), width) - ord("0")
    codes = np.where(codes < 10, codes, 10)  # spaces wrap around to >= 10: the blank glyph
    masks = glyphs[codes]  # (n, width, gh, gw)
    n, _, gh, gw = masks.shape
    return masks.transpose(0, 2, 1, 3).reshape(n, gh, width * gw)


# --- title strip and final image -------------------------------------------------------


def _header_lines(
    title: str,
    shape: tuple[int, ...],
    value_range: tuple[float, float] | None,
    notes: tuple[str, ...],
    counts: tuple[int, int, int],
) -> list[str]:
    """The title line (title, shape, range) and, if needed, a line of notes and counts."""
    shown = "[no finite values]" if value_range is None else _format_range(value_range)
    if math.prod(shape) == 0:
        shown = "[empty]"
    lines = [f"{safe_text(title)}  {tuple(shape)}  {shown}"]
    names = ("NaN", "+Inf", "-Inf")
    colours = ("magenta", "green", "cyan")
    found = [f"{k} {c} ({col})" for k, c, col in zip(names, counts, colours, strict=True) if c]
    extra = [*notes, *found]
    if extra:
        lines.append("; ".join(extra))
    return lines


def _format_range(value_range: tuple[float, float]) -> str:
    """``[lo, hi]`` with three significant digits."""
    return f"[{value_range[0]:.3g}, {value_range[1]:.3g}]"


def _compose(lines: list[str], body: NDArray[np.uint8], cmap: Cmap) -> Image.Image:
    """Place the body under the text lines on a background canvas and draw the text."""
    typeface, line_h = bitmap_font(), line_height()
    text_w = max(text_width(line) for line in lines)
    top = _GAP * 2 + len(lines) * line_h
    width = max(body.shape[1], text_w) + 2 * _GAP
    height = top + body.shape[0] + _GAP
    canvas = np.full((height, width), BACKGROUND_INDEX, np.uint8)
    canvas[top : top + body.shape[0], _GAP : _GAP + body.shape[1]] = body
    image = Image.fromarray(canvas)
    image.putpalette(palette(cmap))
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((_GAP, _GAP + i * line_h), line, fill=TEXT_INDEX, font=typeface)
    return image
