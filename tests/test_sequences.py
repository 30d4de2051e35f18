"""Token sequences and attention drawn so they can be read, checked by raw pixels: the
token label strip, the colour-scale legend, and the top-k dims kept in their order."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from fvis.render import RenderOptions
from fvis.sequences import render_attention, render_tokens, token_label

TOKENS = ["Ġhello", "Ġworld", "the", "cat", "sat", "on", "mat"]
BACKGROUND, TEXT, COLOURS = 254, 255, 251


def _pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "P"
    return np.asarray(image)


def _legend_row(pixels: np.ndarray) -> int:
    """The first row holding every colour-map index 0..250 in increasing order."""
    ramp = np.arange(COLOURS, dtype=np.uint8)
    for y, row in enumerate(pixels):
        for x in np.flatnonzero(row == 0):
            if np.array_equal(row[x : x + COLOURS], ramp):
                return y
    raise AssertionError("no colour-scale legend in the picture")


def _body_box(pixels: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the coloured cells above the legend."""
    above = pixels[: _legend_row(pixels)]
    ys, xs = np.nonzero(above < COLOURS)
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def _text_mask(text: str) -> np.ndarray:
    font = ImageFont.load_default_imagefont()
    image = Image.new("1", (200, 20), 0)
    ImageDraw.Draw(image).text((0, 0), text, fill=1, font=font)
    mask = np.asarray(image)
    return mask[:, : np.flatnonzero(mask.any(axis=0)).max() + 1]


def test_the_legend_spans_the_colour_scale_between_its_end_values() -> None:
    values = np.linspace(-2.0, 3.0, 7 * 5).reshape(7, 5)
    image, info = render_tokens(values, "h", TOKENS)
    pixels = _pixels(image)
    y = _legend_row(pixels)
    assert y > _body_box(pixels)[1]  # under the body
    assert info.layout == "tokens"


def test_each_token_labels_its_own_row() -> None:
    values = np.random.default_rng(0).normal(size=(len(TOKENS), 6))
    pixels = _pixels(render_tokens(values, "h", TOKENS)[0])
    top, bottom, left, _ = _body_box(pixels)
    row_h = (bottom - top) // len(TOKENS)
    assert row_h >= 10  # a readable row per token
    for i, token in enumerate(TOKENS):
        strip = pixels[top + i * row_h : top + (i + 1) * row_h, :left] == TEXT
        expected = _text_mask(token_label(token))
        ys, xs = np.nonzero(strip)
        drawn = strip[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        trimmed = expected[np.flatnonzero(expected.any(axis=1))[0] :]
        trimmed = trimmed[: np.flatnonzero(trimmed.any(axis=1))[-1] + 1]
        assert np.array_equal(drawn, trimmed), token


def test_without_tokens_rows_are_labelled_by_position() -> None:
    values = np.random.default_rng(0).normal(size=(3, 4))
    image, info = render_tokens(values, "h", None)
    assert "rows: token positions" in info.note
    with_tokens = render_tokens(values, "h", ["a", "b", "c"])[0]
    assert not np.array_equal(_pixels(image), _pixels(with_tokens))


def test_the_top_k_dims_by_energy_are_kept_in_their_order() -> None:
    values = np.full((len(TOKENS), 100), 0.01)
    values[:, 3], values[:, 50], values[:, 97] = 5.0, -5.0, 0.5  # the three with energy
    image, info = render_tokens(values, "h", TOKENS, RenderOptions(max_channels=3))
    assert info.shown_channels == (3, 50, 97)
    assert "3 of 100 dims shown (top by energy)" in info.note
    pixels = _pixels(image)
    top, _, left, right = _body_box(pixels)
    row = pixels[top, left:right]
    runs = [int(v) for i, v in enumerate(row) if i == 0 or row[i - 1] != v]
    assert len(runs) == 3 and runs[0] == COLOURS - 1 and runs[1] == 0
    assert 0 < runs[2] < COLOURS - 1  # 0.5 lies between -5 and 5


def test_dim_labels_name_the_shown_dims() -> None:
    values = np.full((2, 20), 0.01)
    values[:, 7] = 1.0
    values[:, 13] = -1.0
    image, _ = render_tokens(values, "h", ["a", "b"], RenderOptions(max_channels=2))
    pixels = _pixels(image)
    top, _, left, right = _body_box(pixels)
    column_w = (right - left) // 2
    glyph_h = ImageFont.load_default_imagefont().getbbox("0Ag|_")[3]
    digits = pixels[top - 2 * glyph_h - 1 : top]  # two stacked digits per column: 7, 13
    first = digits[:, left : left + column_w] == TEXT
    second = digits[:, left + column_w : right] == TEXT
    assert first.any() and second.any()
    seven = _text_mask("7")
    ys, xs = np.nonzero(first)
    assert np.array_equal(first[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1], _trim(seven))
    assert first[: first.shape[0] // 2].sum() == 0  # one digit: on the bottom row, units aligned
    assert second[: second.shape[0] // 2].any()  # 13: its tens digit above


def _trim(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


@pytest.mark.parametrize("heads", [1, 4])
def test_attention_is_one_labelled_tile_per_head(heads: int) -> None:
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(heads, 3, 3))
    probs = np.exp(raw) / np.exp(raw).sum(-1, keepdims=True)
    image, info = render_attention(probs, "attn", ["a", "bb", "ccc"])
    assert info.shown_channels == tuple(range(heads))
    pixels = _pixels(image)
    _legend_row(pixels)
    cells = pixels[: _legend_row(pixels)] < COLOURS
    # every head's 3x3 cells are drawn: count the coloured connected blocks by rows/cols
    assert cells.sum() >= heads * 9
    assert "rows: queries, columns: keys" in info.note
