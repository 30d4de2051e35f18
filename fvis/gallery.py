"""Pictures of captures: rendered as each layer fires, named once the forward is over.

Rendering inside the hook lets the capture drop the activation at once (memory stays flat for
``--all``); file names wait for the end because a shared module's labels (``relu#1``) are only
known once every call has happened.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fvis.report import ImageRef
from fvis.text import unique_filenames

if TYPE_CHECKING:
    from PIL import Image

    from fvis.capture import Capture
    from fvis.output import OutputDir
    from fvis.render import RenderInfo, RenderOptions

    _Ranges = tuple[tuple[int, float | None, float | None], ...]  # (channel, min, max)
    _Picture = tuple[int | None, Image.Image, RenderInfo, _Ranges]


@dataclass
class Gallery:
    options: RenderOptions
    sample_labels: tuple[str, ...] = ()
    all_samples: bool = False
    batch_size: int = 0  # samples per forward pass when inputs ran in several batches
    sample_index: int = 0  # the sample drawn when not all_samples
    tokens: tuple[tuple[str, ...], ...] = ()  # each sample's tokens, for sequence pictures
    # (batch, layer, call, path) -> per drawn sample: (sample, picture, info, channel ranges)
    _pictures: dict[tuple[int | None, str, int, str], list[_Picture]] = field(default_factory=dict)
    _files: list[tuple[str, Image.Image]] = field(default_factory=list)
    _cams: list[tuple[str, str, Image.Image]] = field(default_factory=list)  # label, stem, image
    _input: Image.Image | None = None
    input_file: str | None = None
    encoded: dict[str, bytes] = field(default_factory=dict)  # file name -> PNG bytes

    @classmethod
    def from_options(
        cls,
        options: Any,
        sample_labels: tuple[str, ...],
        tokens: tuple[tuple[str, ...], ...] = (),
    ) -> Gallery:
        from fvis.render import RenderOptions

        render_options = RenderOptions(
            cmap=options.cmap, norm_scope=options.norm_scope, max_channels=options.max_channels
        )
        sample_index = options.sample if isinstance(options.sample, int) else 0
        return cls(
            render_options,
            sample_labels,
            options.sample is None,
            options.batch_size or 0,
            sample_index,
            tokens,
        )

    def add(self, capture: Capture) -> None:
        """Render one capture now (called from the forward hook)."""
        values = capture.values
        if values is None:
            return
        key = _key(capture)
        offset = (capture.batch or 0) * self.batch_size  # sample index across batches
        title = _title(capture, capture.call > 1)  # the first call: see name_files
        if self.all_samples and len(capture.shape) >= 2:
            for index in range(values.shape[0]):
                label = self._sample(offset + index)
                shown, notes = channels_first(values[index], capture)
                tokens = self._tokens(offset + index)
                image, info = self._render(shown, f"{title} @{label}", notes, capture, tokens)
                ranges = _channel_ranges(shown, info)
                self._pictures.setdefault(key, []).append((offset + index, image, info, ranges))
        else:
            shown, notes = channels_first(values, capture)
            tokens = self._tokens(offset + self.sample_index)
            image, info = self._render(shown, title, notes, capture, tokens)
            ranges = _channel_ranges(shown, info)
            self._pictures.setdefault(key, []).append((None, image, info, ranges))

    def _render(
        self,
        shown: Any,
        title: str,
        notes: tuple[str, ...],
        capture: Capture,
        tokens: tuple[str, ...] | None,
    ) -> tuple[Image.Image, RenderInfo]:
        """A sequence picture for tokens and attention, else the grid/heatmap/strip."""
        from fvis.render import render
        from fvis.sequences import render_attention, render_tokens

        if is_token_sequence(shown, capture):
            return render_tokens(shown, title, tokens, self.options, notes)
        if tokens and is_attention(shown, capture, len(tokens)):
            return render_attention(shown, title, tokens, self.options, notes)
        return render(shown, title, self.options, notes)

    def _tokens(self, index: int) -> tuple[str, ...] | None:
        return self.tokens[index] if index < len(self.tokens) else None

    def add_input(self, display: Any) -> None:
        """The input image as the model saw it (after resize; normalisation undone)."""
        from PIL import Image

        array = display if display.shape[2] in (1, 3) else display[..., :3]
        mode = "L" if array.shape[2] == 1 else "RGB"
        self._input = Image.fromarray(array[..., 0] if mode == "L" else array, mode=mode)
        self.input_file = "input.png"

    def add_gradcams(
        self, captures: Sequence[Capture], grads: Mapping[str, Any], displays: Sequence[Any]
    ) -> None:
        """Grad-CAM overlays for captures with a ``(C, H, W)`` activation and its gradient,
        one per drawn sample, each over that sample's own input image (when it has one)."""
        from fvis.backward import gradcam
        from fvis.overlay import overlay

        for capture in captures:
            grad = grads.get(capture.label)
            if capture.values is None or grad is None:
                continue
            offset = (capture.batch or 0) * self.batch_size
            if self.all_samples and capture.values.ndim == 4:
                pairs = [
                    (offset + i, capture.values[i], grad[i]) for i in range(capture.values.shape[0])
                ]
            else:
                pairs = [(offset + self.sample_index, capture.values, grad)]
            for index, values, sample_grad in pairs:
                # an (N, H, W, C) map and its gradient: channels first, as gradcam expects
                values, sample_grad = (channels_first(v, capture)[0] for v in (values, sample_grad))
                cam = gradcam(values, sample_grad)
                if cam is None:
                    continue
                display = displays[index] if index < len(displays) else None
                sample = f"@{Path(self._sample(index)).stem}" if self.all_samples else ""
                image = overlay(cam, display, f"Grad-CAM {capture.label} {sample}".rstrip())
                self._cams.append((capture.label, f"{capture.label}{sample}", image))

    def _sample(self, index: int) -> str:
        return self.sample_labels[index] if index < len(self.sample_labels) else str(index)

    def name_files(self, captures: Sequence[Capture]) -> dict[str, list[ImageRef]]:
        """Give every picture a safe, unique file name; returns refs by capture label."""
        from fvis.render import retitle

        entries = []
        for capture in captures:
            for sample, image, info, ranges in self._pictures.get(_key(capture), []):
                if capture.call == 1 and capture.calls_total > 1:  # relu -> relu#1
                    image = retitle(image, info, _title(capture, False), _title(capture, True))
                stem = (
                    capture.label
                    if sample is None
                    else (f"{capture.label}@{Path(self._sample(sample)).stem}")
                )
                entries.append((capture.label, stem, sample, image, info, ranges))
        stems = [stem for _, stem, *_ in entries] + [f"gradcam_{stem}" for _, stem, _ in self._cams]
        reserved = ["input"] if self._input is not None else []  # input.png is taken
        names = unique_filenames([*reserved, *stems], ".png")[len(reserved) :]
        refs: dict[str, list[ImageRef]] = {}
        self._files = []
        for (label, _, sample, image, info, ranges), name in zip(entries, names, strict=False):
            refs.setdefault(label, []).append(
                ImageRef(
                    name,
                    sample,
                    str(info.layout),
                    len(info.shown_channels),
                    info.total_channels,
                    info.note,
                    ranges,
                )
            )
            self._files.append((name, image))
        for (label, _, image), name in zip(self._cams, names[len(entries) :], strict=True):
            refs.setdefault(label, []).append(ImageRef(name, None, "gradcam", 0, 0, "Grad-CAM"))
            self._files.append((name, image))
        return refs

    def file_names(self) -> list[str]:
        return [name for name, _ in self._files] + (["input.png"] if self._input else [])

    def write(self, folder: OutputDir) -> None:
        """Encode every picture (kept in ``encoded`` for the HTML page) and stage it."""
        from fvis.render import encode_png

        pictures = [*self._files, *([("input.png", self._input)] if self._input else [])]
        for name, image in pictures:
            self.encoded[name] = encode_png(image)
            folder.write_bytes(name, self.encoded[name])


def channels_first(values: Any, capture: Capture) -> tuple[Any, tuple[str, ...]]:
    """One sample's values with its channels on dim 0 for a grid of tiles, and a note when
    they were moved there: an ``(N, H, W, C)`` map is drawn as C tiles of H x W, not H tiles
    of W x C (``fvis.axes`` says which dim holds the channels)."""
    import numpy as np

    full = len(capture.shape)
    axis = capture.stats.channel_axis
    if capture.token_grid is not None and values.ndim == 2 and values.ndim == full - 1:
        return _on_patch_grid(values, capture.token_grid)
    if axis is None or axis != full - 1 or values.ndim < 3 or values.ndim != full - 1:
        return values, ()
    return np.moveaxis(values, -1, 0), (f"channels: last dim ({capture.shape[-1]})",)


def is_token_sequence(shown: Any, capture: Capture) -> bool:
    """One sample of ``(N, T, D)`` tokens with features last (not put on a patch grid)."""
    return (
        shown.ndim == 2
        and len(capture.shape) == 3
        and capture.token_grid is None
        and capture.stats.channel_axis == 2
    )


def is_attention(shown: Any, capture: Capture, tokens: int) -> bool:
    """One sample of ``(N, H, T, T)`` attention over the ``tokens`` of the input."""
    return shown.ndim == 3 and len(capture.shape) == 4 and shown.shape[1:] == (tokens, tokens)


def _on_patch_grid(values: Any, grid: tuple[int, int, int]) -> tuple[Any, tuple[str, ...]]:
    """``(T, D)`` ViT tokens as D tiles on their H x W patch grid (row-major, as patch
    embeddings flatten them); the prefix (class) tokens are summarised in the note."""
    import numpy as np

    prefix, height, width = grid
    patches = np.moveaxis(values[prefix:].reshape(height, width, values.shape[-1]), -1, 0)
    notes = [f"channels: last dim ({values.shape[-1]}); tokens on their {height}x{width} grid"]
    if prefix:
        head = values[:prefix]
        finite = head[np.isfinite(head)]
        shown = f"[{finite.min():.3g}, {finite.max():.3g}]" if finite.size else "no finite values"
        notes.append(f"{prefix} class token{'s' if prefix > 1 else ''} not drawn: {shown}")
    return patches, tuple(notes)


def _title(capture: Capture, numbered: bool) -> str:
    """``relu#2.out``: the label without the batch (pictures say their sample apart)."""
    return f"{capture.layer}{f'#{capture.call}' if numbered else ''}{capture.path}"


def _key(capture: Capture) -> tuple[int | None, str, int, str]:
    return (capture.batch, capture.layer, capture.call, capture.path)


def render_capture(capture: Capture, options: RenderOptions | None = None) -> Image.Image:
    """The picture of one capture, titled with its label (``fvis.render``).

    >>> image = render_capture(result.captures[0])        # doctest: +SKIP
    >>> image.mode
    'P'
    """
    from fvis.render import RenderOptions, render

    if capture.values is None:
        raise ValueError(f"{capture.label}: no values kept (capture with keep_values=True)")
    image, _ = render(capture.values, capture.label, options or RenderOptions())
    return image


def _channel_ranges(values: Any, info: RenderInfo) -> _Ranges:
    """Per shown channel of a grid picture: (index, min, max) over its finite values."""
    if str(info.layout) != "grid" or getattr(values, "ndim", 0) != 3:
        return ()
    return tuple(_channel_range(values, c) for c in info.shown_channels)


def _channel_range(values: Any, channel: int) -> tuple[int, float | None, float | None]:
    import numpy as np

    plane = values[channel]
    finite = plane[np.isfinite(plane)]
    if finite.size == 0:
        return (channel, None, None)
    return (channel, float(finite.min()), float(finite.max()))


def tensors_file(captures: Sequence[Capture]) -> bytes:
    """The captured tensors as safetensors bytes, named by capture label.

    Each is the whole captured batch in its own dtype (``Capture.tensor``; a float32 sample
    copy only where the whole tensor was not kept). The header's metadata says, per label, the
    layer, call, path, batch, shape and dtype (``fvis.activations/1``), so what was captured
    can be reloaded exactly: ``safetensors.safe_open(path, "pt").metadata()``.
    """
    import json

    import torch
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    metadata = {"format": "pt", "fvis.schema": "fvis.activations/1"}
    for c in captures:
        if c.tensor is not None:
            tensor, whole = c.tensor.contiguous(), True
        elif c.values is not None:
            tensor, whole = torch.from_numpy(c.values.copy()), False
        else:
            continue
        tensors[c.label] = tensor
        metadata[c.label] = json.dumps(
            {
                "layer": c.layer,
                "call": c.call,
                "path": c.path,
                "batch": c.batch,
                "shape": list(c.shape),
                "dtype": c.dtype,
                "whole_batch": whole,
            }
        )
    return save(tensors, metadata=metadata)
