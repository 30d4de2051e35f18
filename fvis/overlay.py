"""A Grad-CAM style overlay: a ``[0, 1]`` heatmap in a colour map, blended onto the input
picture, with its title in a strip above. Pure, numpy and Pillow only (no torch)."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw

from fvis.choices import Cmap
from fvis.palette import (
    BACKGROUND_INDEX,
    RESERVED_COLOURS,
    TEXT_INDEX,
    bitmap_font,
    cmap_table,
    safe_text,
)

_MIN_OVERLAY_WIDTH = 192


def overlay(
    heat: NDArray[np.floating],
    base: NDArray[np.uint8] | None,
    title: str,
    cmap: Cmap = Cmap.MAGMA,
    alpha: float = 0.5,
) -> Image.Image:
    """A ``[0, 1]`` heatmap (Grad-CAM) resized onto ``base`` (HxWx3 uint8), as an RGB image.

    >>> overlay(np.eye(4), None, "cam").mode
    'RGB'
    """
    table = cmap_table(cmap).astype(np.float32)
    if base is not None and base.shape[1] < _MIN_OVERLAY_WIDTH:
        # A 32x32 input would give an unreadable overlay: repeat pixels (no new detail).
        factor = -(-_MIN_OVERLAY_WIDTH // base.shape[1])
        base = np.repeat(np.repeat(base, factor, axis=0), factor, axis=1)
    size = (
        (base.shape[1], base.shape[0])
        if base is not None
        else (heat.shape[1] * 8, heat.shape[0] * 8)
    )
    small = Image.fromarray(np.clip(heat, 0.0, 1.0).astype(np.float32), mode="F")
    big = np.asarray(small.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    colours = table[np.clip((big * (len(table) - 1)).round().astype(int), 0, len(table) - 1)]
    if base is not None:
        rgb = base[..., :3] if base.shape[2] >= 3 else np.repeat(base[..., :1], 3, axis=2)
        colours = (1 - alpha) * rgb.astype(np.float32) + alpha * colours
    picture = Image.fromarray(colours.clip(0, 255).astype(np.uint8), mode="RGB")
    strip = Image.new("RGB", (picture.width, 14), RESERVED_COLOURS[BACKGROUND_INDEX])
    ImageDraw.Draw(strip).text(
        (2, 1), safe_text(title), fill=RESERVED_COLOURS[TEXT_INDEX], font=bitmap_font()
    )
    out = Image.new("RGB", (picture.width, picture.height + strip.height))
    out.paste(strip, (0, 0))
    out.paste(picture, (0, strip.height))
    return out
