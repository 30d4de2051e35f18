"""Pixel tests for fvis.render: raw palette indices and RGB values, never PNG bytes."""

from __future__ import annotations

import ast
import importlib
import warnings
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from fvis.errors import OutputError, UsageError
from fvis.render import (
    BACKGROUND_INDEX,
    MID_INDEX,
    N_COLOURS,
    NAN_INDEX,
    NEGINF_INDEX,
    POSINF_INDEX,
    RESERVED_COLOURS,
    TEXT_INDEX,
    Cmap,
    Layout,
    NormScope,
    RenderOptions,
    cmap_table,
    render,
    save_png,
)

render_module = importlib.import_module("fvis.render")  # `fvis.render` is the public function
palette_module = importlib.import_module("fvis.palette")

LAST = N_COLOURS - 1
PATTERN = np.arange(16.0).reshape(4, 4)


def indices(image: Image.Image) -> np.ndarray:
    """The raw palette indices of a P image."""
    assert image.mode == "P"
    return np.asarray(image)


def bands(mask_1d: npt.ArrayLike) -> list[tuple[int, int]]:
    """Runs of True as (start, stop) pairs."""
    padded = np.concatenate([[False], mask_1d, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def tiles(image: Image.Image) -> list[tuple[int, int, np.ndarray]]:
    """(y, x, pixels) of each block of data pixels (colour map or non-finite), row-major."""
    idx = indices(image)
    data = idx <= NEGINF_INDEX
    found = []
    for y0, y1 in bands(data.any(axis=1)):
        for x0, x1 in bands(data[y0:y1].any(axis=0)):
            found.append((y0, x0, idx[y0:y1, x0:x1]))
    return found


def expected_levels(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Independent reference for the linear map from [low, high] to colour indices."""
    return np.clip(np.rint((values - low) * LAST / (high - low)), 0, LAST).astype(np.uint8)


def label_width() -> int:
    return int(palette_module.digit_glyphs().shape[2])


# --- grid geometry and colour order --------------------------------------------------


def test_grid_tiles_have_ordered_colours_at_their_offsets() -> None:
    values = np.stack([PATTERN, 15 - PATTERN]).astype(np.float32)
    image, info = render(values, "conv")
    (y0, x0, tile0), (y1, x1, tile1) = tiles(image)
    assert tile0.shape == tile1.shape == (4, 4)  # not upscaled
    assert y0 == y1
    assert x1 - x0 == max(4, label_width()) + render_module._GAP
    # 16 values: the 1st/99th percentiles are the 2nd smallest and 2nd largest (1 and 14).
    np.testing.assert_array_equal(tile0, expected_levels(PATTERN, 1, 14))
    np.testing.assert_array_equal(tile1, expected_levels(15 - PATTERN, 1, 14))
    assert (tile0[0, 0], tile0[-1, -1], tile1[0, 0], tile1[-1, -1]) == (0, LAST, LAST, 0)
    rgb = np.asarray(image.convert("RGB"))
    table = cmap_table(Cmap.VIRIDIS)
    assert tuple(rgb[y0, x0]) == tuple(table[0])
    assert tuple(rgb[y0 + 3, x0 + 3]) == tuple(table[-1])
    assert info.layout == Layout.GRID
    assert (info.shown_channels, info.total_channels, info.note) == ((0, 1), 2, "")
    assert info.value_range == (0.0, 15.0)


def test_grid_labels_sit_above_their_tiles() -> None:
    image, _ = render(np.stack([PATTERN] * 3), "conv")
    idx = indices(image)
    masks = render_module._label_masks((0, 1, 2))
    label_h = masks.shape[1] + 1
    for channel, (y, x, tile) in enumerate(tiles(image)):
        assert not (tile == TEXT_INDEX).any()
        strip = idx[y - label_h : y - 1, x : x + masks.shape[2]]
        np.testing.assert_array_equal(strip == TEXT_INDEX, masks[channel])


# --- non-finite values, constants, outliers -----------------------------------------


def test_non_finite_values_get_reserved_colours_and_are_counted() -> None:
    values = PATTERN.copy()
    values[0, 1] = values[3, 3] = np.nan
    values[1, 1] = np.inf
    values[2, 2] = -np.inf
    image, info = render(values[None], "x")
    ((y, x, tile),) = tiles(image)
    assert (tile[0, 1], tile[3, 3], tile[1, 1], tile[2, 2]) == (
        NAN_INDEX,
        NAN_INDEX,
        POSINF_INDEX,
        NEGINF_INDEX,
    )
    assert (info.nan_count, info.posinf_count, info.neginf_count) == (2, 1, 1)
    assert info.value_range == (0.0, 14.0)
    rgb = np.asarray(image.convert("RGB"))
    assert tuple(rgb[y, x + 1]) == RESERVED_COLOURS[NAN_INDEX]
    assert tuple(rgb[y + 1, x + 1]) == RESERVED_COLOURS[POSINF_INDEX]
    assert tuple(rgb[y + 2, x + 2]) == RESERVED_COLOURS[NEGINF_INDEX]


@pytest.mark.parametrize("cmap", list(Cmap))
def test_reserved_colours_are_not_in_any_colour_map(cmap: Cmap) -> None:
    table = {tuple(int(c) for c in rgb) for rgb in cmap_table(cmap)}
    for index in (NAN_INDEX, POSINF_INDEX, NEGINF_INDEX, BACKGROUND_INDEX):
        assert RESERVED_COLOURS[index] not in table
    palette = render(np.zeros(3), "x", RenderOptions(cmap=cmap))[0].getpalette()
    assert palette is not None and len(palette) == 256 * 3


def test_constant_and_all_nan_maps_draw_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image, info = render(np.full((2, 4, 4), 3.0, np.float32), "flat")
        nan_image, nan_info = render(np.full((3, 3), np.nan), "nan")
        inf_image, _ = render(np.array([np.inf, -np.inf, np.nan]), "inf")
    assert all((tile == MID_INDEX).all() for _, _, tile in tiles(image))
    assert info.value_range == (3.0, 3.0)
    assert nan_info.value_range is None and nan_info.nan_count == 9
    ((_, _, nan_pixels),) = tiles(nan_image)
    assert (nan_pixels == NAN_INDEX).all()
    ((_, _, cells),) = tiles(inf_image)
    assert {POSINF_INDEX, NEGINF_INDEX, NAN_INDEX} <= set(cells.ravel().tolist())


def test_single_value_range_puts_rare_values_at_the_ends() -> None:
    values = np.zeros((1, 10, 10))
    values[0, 0, 0], values[0, 9, 9] = 5.0, -5.0
    ((_, _, tile),) = tiles(render(values, "mostly flat")[0])
    assert (tile[0, 0], tile[9, 9], tile[5, 5]) == (LAST, 0, MID_INDEX)


def test_one_outlier_does_not_flatten_a_small_map() -> None:
    values = PATTERN.copy()
    values[3, 3] = 1e6
    ((_, _, tile),) = tiles(render(values[None], "spike")[0])
    assert len(np.unique(tile)) >= 12
    assert tile[3, 3] == LAST


def test_robust_bounds_match_numpy_percentiles() -> None:
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((6, 50)).astype(np.float32)
    rows[1, :7] = np.nan
    rows[2, 3:5] = [np.inf, -np.inf]
    low, high = render_module._robust_bounds(rows, 1.0, 99.0)
    for row, lo, hi in zip(rows, low, high, strict=True):
        finite = row[np.isfinite(row)]
        assert lo == np.percentile(finite, 1.0, method="higher")
        assert hi == np.percentile(finite, 99.0, method="lower")


# --- channel selection and scope -----------------------------------------------------


def test_top_k_by_energy_keeps_high_energy_channels_in_original_order() -> None:
    scales = np.array([1.0, 100.0, 2.0, 50.0, 3.0, 80.0])
    values = scales[:, None, None] * (PATTERN + 1)
    image, info = render(values, "many", RenderOptions(max_channels=3))
    assert info.shown_channels == (1, 3, 5)
    assert info.total_channels == 6
    assert info.note == "3 of 6 channels shown (top by energy)"
    assert len(tiles(image)) == 3
    masks = render_module._label_masks((1, 3, 5))
    label_h = masks.shape[1] + 1
    idx = indices(image)
    for mask, (y, x, _) in zip(masks, tiles(image), strict=True):
        strip = idx[y - label_h : y - 1, x : x + mask.shape[1]]
        np.testing.assert_array_equal(strip == TEXT_INDEX, mask)


def test_top_k_ranks_huge_values_without_overflow() -> None:
    values = np.stack([np.full((2, 2), s) for s in (1e200, 1e300, 1.0, 1e250)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info = render(values, "huge", RenderOptions(max_channels=2))
    assert info.shown_channels == (1, 3)


def test_global_scope_shares_one_range_and_channel_scope_does_not() -> None:
    values = np.stack([PATTERN, 10 * PATTERN])
    (_, _, a), (_, _, b) = tiles(render(values, "c")[0])
    np.testing.assert_array_equal(a, b)
    options = RenderOptions(norm_scope=NormScope.GLOBAL)
    (_, _, small), (_, _, big) = tiles(render(values, "g", options)[0])
    assert small.max() < LAST // 4
    assert big.min() == 0 and big.max() == LAST


# --- layouts by ndim --------------------------------------------------------------------


def test_scalar_is_one_readable_cell() -> None:
    image, info = render(np.float32(2.5), "scalar")
    ((_, _, cell),) = tiles(image)
    assert info.layout == Layout.STRIP and info.value_range == (2.5, 2.5)
    assert cell.shape[0] >= 8 and cell.shape[1] >= 8
    assert (cell == MID_INDEX).all()


def test_vector_is_one_row_of_cells_and_wraps_when_long() -> None:
    image, info = render(np.arange(5.0), "vec")
    ((_, _, row),) = tiles(image)
    assert info.layout == Layout.STRIP
    assert row.shape[1] == 5 * (row.shape[1] // 5) and row.shape[1] // 5 >= 8
    long_image, _ = render(np.arange(1000.0), "long")
    ((_, _, block),) = tiles(long_image)
    assert block.shape[1] <= 512 and block.shape[0] > 1
    assert (block == BACKGROUND_INDEX).any()  # the last row is padded with background


def test_tiny_heatmap_is_scaled_up_by_an_integer_factor() -> None:
    values = np.arange(15.0).reshape(3, 5)
    image, info = render(values, "tiny")
    ((_, _, block),) = tiles(image)
    factor = block.shape[1] // 5
    assert info.layout == Layout.HEATMAP and factor > 1 and block.shape == (3 * factor, 5 * factor)
    # 15 values: the robust bounds are the 2nd smallest and 2nd largest (1 and 13).
    np.testing.assert_array_equal(block[::factor, ::factor], expected_levels(values, 1, 13))


def test_reasonable_heatmap_is_one_pixel_per_value() -> None:
    values = np.random.default_rng(1).standard_normal((40, 60))
    ((_, _, block),) = tiles(render(values, "attn")[0])
    assert block.shape == (40, 60)


def test_five_d_activation_shows_the_middle_frame() -> None:
    values = np.full((2, 8, 4, 4), np.nan)
    values[:, 3] = PATTERN
    image, info = render(values, "video")
    assert info.layout == Layout.GRID and info.note == "middle frame 3 of 8 (0-based, along dim 1)"
    assert info.nan_count == 2 * 7 * 16
    assert not any((tile == NAN_INDEX).any() for _, _, tile in tiles(image))


def test_more_dims_are_flattened_into_channels() -> None:
    image, info = render(np.ones((2, 3, 2, 4, 4)), "6d")
    assert info.total_channels == 6 and info.shown_channels == tuple(range(6))
    assert info.note.startswith("leading dims (2, 3) flattened to 6 channels")
    assert len(tiles(image)) == 6


def test_one_by_one_maps_become_a_strip_of_channels() -> None:
    _, info = render(np.arange(2048.0).reshape(2048, 1, 1), "pooled")
    assert info.layout == Layout.STRIP and info.total_channels == 2048
    assert len(info.shown_channels) == 2048


@pytest.mark.parametrize("shape", [(0,), (0, 3), (2, 0, 5), (3, 2, 0, 4)])
def test_empty_arrays_give_a_small_empty_image(shape: tuple[int, ...]) -> None:
    image, info = render(np.zeros(shape, np.float32), "nothing")
    assert info.layout == Layout.EMPTY and info.value_range is None
    assert info.shown_channels == () and "empty" in info.note
    assert tiles(image) == [] and image.size[0] < 400 and image.size[1] < 60


def test_huge_bodies_are_downsampled_by_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(render_module, "_MAX_BODY_PIXELS", 100)
    _, info = render(np.zeros((40, 40)), "big")
    assert info.note == "downsampled: each 4x4 block drawn as its value of largest magnitude"


def test_one_outlier_column_survives_downsampling() -> None:
    # (2048, 4096) is twice the pixel budget: a stride of 2 dropped every odd column.
    values = np.zeros((2048, 4096), np.float32)
    values[:, 1001] = -50.0  # an outlier hidden dim, negative: its sign must survive too
    values[7, 3] = np.nan
    image, info = render(values, "heat", RenderOptions(cmap="gray"))
    assert info.note == "downsampled: each 2x2 block drawn as its value of largest magnitude"
    gap = render_module._GAP
    body = indices(image)[-1024 - gap : -gap, gap : gap + 2048]
    dark = np.flatnonzero((body == 0).all(axis=0))  # gray: index 0 is the lowest value
    assert dark.tolist() == [1001 // 2]
    assert body[3, 1] == NAN_INDEX and (body == NAN_INDEX).sum() == 1


def test_integer_input_is_accepted_and_complex_is_refused() -> None:
    _, info = render(np.arange(6, dtype=np.int64).reshape(2, 3), "ints")
    assert info.value_range == (0.0, 5.0)
    with pytest.raises(TypeError, match="complex"):
        render(np.zeros(3, np.complex64), "c")


# --- text ------------------------------------------------------------------------------


def test_hostile_titles_render_safely() -> None:
    hostile = "[red]x[/red]\x1b[2J../../etc 特征图 🔥"
    assert palette_module.safe_text(hostile) == "[red]x[/red]?[2J../../etc ??? ?"
    image, _ = render(np.ones((2, 3, 3)), hostile * 20)
    assert image.size[0] < 130 * 8
    capped = palette_module.safe_text("a" * 500)
    assert len(capped) == 120 and capped.endswith("...")


def test_title_line_has_shape_and_range() -> None:
    lines = render_module._header_lines("inner.relu #1", (1, 5), (0.0, 1.7320508), (), (0, 0, 0))
    assert lines == ["inner.relu #1  (1, 5)  [0, 1.73]"]


# --- options and I/O ---------------------------------------------------------------------


def test_options_are_validated_and_strings_coerced() -> None:
    assert RenderOptions(cmap="magma").cmap is Cmap.MAGMA  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="choose one of: gray, viridis"):
        RenderOptions(cmap="jet")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="max_channels"):
        RenderOptions(max_channels=0)
    with pytest.raises(UsageError, match="low=50"):
        RenderOptions(low_pct=50, high_pct=50)


def test_save_png_round_trips_pixels_and_palette(tmp_path: Path) -> None:
    image, _ = render(np.random.default_rng(2).standard_normal((5, 6, 7)), "round trip")
    path = tmp_path / "out.png"
    save_png(image, path)
    with Image.open(path) as reloaded:
        assert reloaded.mode == "P"
        np.testing.assert_array_equal(np.asarray(reloaded), indices(image))
        assert reloaded.getpalette() == image.getpalette()


def test_save_png_to_a_missing_folder_is_an_output_error(tmp_path: Path) -> None:
    image, _ = render(np.zeros(2), "x")
    with pytest.raises(OutputError, match="missing"):
        save_png(image, tmp_path / "missing" / "out.png")


def test_render_module_does_not_import_torch() -> None:
    tree = ast.parse(Path(render_module.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (
            node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")]
        )
    }
    assert "torch" not in imported
