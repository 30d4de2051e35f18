"""Read an image file into a float HxWxC array in [0, 1], saying every conversion made."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from fvis.errors import BadFileError


def read_image(
    path: Path, channels: int | None, size: tuple[int, int] | None, max_pixels: int
) -> tuple[np.ndarray, list[str]]:
    """Decode, apply EXIF orientation, convert to ``channels`` and resize to ``size`` (H, W).

    >>> array, notes = read_image(Path("cat.png"), 3, (224, 224), 64_000_000)  # doctest: +SKIP
    >>> array.shape
    (224, 224, 3)

    Truncated images are refused (Pillow's ``LOAD_TRUNCATED_IMAGES`` stays off) and
    decompression bombs stay refused by Pillow's own limit.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                if opened.width * opened.height > max_pixels:  # from the header: no decoding
                    raise BadFileError(
                        f"{path} is {opened.width}x{opened.height} pixels, "
                        f"more than fvis decodes ({max_pixels:,})",
                        hint="resize the image, or raise the cap with --max-input-pixels",
                    )
                image = ImageOps.exif_transpose(opened)
                image.load()
    except UnidentifiedImageError:
        raise BadFileError(f"{path} is not an image or tensor file fvis can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadFileError(f"{path} is too large to decode safely ({exc})") from None
    except OSError as exc:
        raise BadFileError(f"{path} is a truncated or damaged image ({exc})") from None
    notes.append(f"{image.width}x{image.height} {image.mode}")
    array = _to_float(image, notes)
    array = _to_channels(array, channels, notes)
    if size is not None and array.shape[:2] != size:
        array = _resize(array, size)
        notes.append(f"resized to {size[0]}x{size[1]}")
    return array, notes


def _to_float(image: object, notes: list[str]) -> np.ndarray:
    from PIL import Image

    assert isinstance(image, Image.Image)
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        wide = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or wide.max(initial=0) > 255 else 255.0
        notes.append(f"{'16' if peak > 255 else '8'}-bit values scaled to [0, 1]")
        return (np.clip(wide, 0, peak) / peak).astype(np.float32)[..., None]
    if mode == "F":
        array = np.asarray(image, dtype=np.float32)
        lo, hi = float(np.nanmin(array)), float(np.nanmax(array))
        notes.append("float image rescaled to [0, 1]")
        return ((array - lo) / (hi - lo or 1.0))[..., None]
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        notes.append("alpha composited on black")
        image = image.convert("RGBA")
        rgba = np.asarray(image, dtype=np.float32) / 255.0
        return np.asarray(rgba[..., :3] * rgba[..., 3:4], dtype=np.float32)
    if mode not in ("L", "RGB"):
        notes.append(f"{mode} converted to RGB")
        image = image.convert("RGB")
    array = np.asarray(image, dtype=np.float32) / 255.0
    return array[..., None] if array.ndim == 2 else array


def _to_channels(array: np.ndarray, channels: int | None, notes: list[str]) -> np.ndarray:
    have = array.shape[2]
    if channels is None or channels == have:
        return array
    if channels == 1:
        notes.append("converted to 1 channel (luminance)")
        weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)[:have]
        return (array @ (weights / weights.sum()))[..., None].astype(np.float32)
    if have == 1:
        notes.append(f"grey repeated to {channels} channels")
        return np.repeat(array, channels, axis=2)
    if channels > have:
        notes.append(f"padded from {have} to {channels} channels with zeros")
        pad = np.zeros((*array.shape[:2], channels - have), dtype=np.float32)
        return np.concatenate([array, pad], axis=2)
    notes.append(f"kept the first {channels} of {have} channels")
    return array[..., :channels]


def _resize(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    planes = [
        np.asarray(
            Image.fromarray(array[..., c]).resize((size[1], size[0]), Image.Resampling.BILINEAR)
        )
        for c in range(array.shape[2])
    ]
    return np.stack(planes, axis=2).astype(np.float32)
