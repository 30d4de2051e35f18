"""Pictures of a shared module's calls: linked by percent-encoded names (``relu#1.png`` is a
file, not a fragment) and titled with their call number, the first one included."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fvis import html as html_module
from fvis.api import DumpOptions, ModelRef, dump
from fvis.capture import capture
from fvis.gallery import Gallery
from fvis.inputs import InputOptions
from fvis.loading import LoadedModel, LoadOptions, ModelSource
from fvis.render import render


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv(self.act(x)))


def _dump(tmp_path: Path, monkeypatch: Any) -> Path:
    from fvis import api

    loaded = LoadedModel(_Shared(), ModelSource(None, "test", "", ()))
    monkeypatch.setattr(api, "open_model", lambda ref: loaded)
    monkeypatch.setattr(html_module, "EMBED_LIMIT", 0)  # link every picture, as above 8 MB
    out = tmp_path / "out"
    ref = ModelRef(tmp_path / "m.pt", LoadOptions())
    dump(ref, InputOptions(shape=(1, 1, 4, 4)), DumpOptions(layers=("act",)), out)
    return out


def test_links_to_pictures_are_percent_encoded(tmp_path: Path, monkeypatch: Any) -> None:
    out = _dump(tmp_path, monkeypatch)
    assert (out / "act#1.png").is_file() and (out / "act#2.png").is_file()
    page = (out / "report.html").read_text()
    assert 'src="act%231.png"' in page and 'src="act%232.png"' in page
    assert 'src="act#1.png"' not in page
    markdown = (out / "report.md").read_text()
    assert "(<act%231.png>)" in markdown and "(<act#1.png>)" not in markdown


def test_the_first_call_of_a_shared_module_is_titled_with_its_number() -> None:
    torch.manual_seed(0)
    result = capture(_Shared(), [torch.randn(1, 1, 4, 4)], ["act"])
    gallery = Gallery.from_options(DumpOptions(), ())
    for item in result.captures:
        gallery.add(item)
    gallery.name_files(result.captures)
    drawn = dict(gallery._files)
    first, second = result.captures
    want_first, _ = render(first.values, "act#1", gallery.options)
    want_second, _ = render(second.values, "act#2", gallery.options)
    assert np.array_equal(np.asarray(drawn["act#1.png"]), np.asarray(want_first))
    assert np.array_equal(np.asarray(drawn["act#2.png"]), np.asarray(want_second))
    untitled, _ = render(first.values, "act", gallery.options)
    assert not np.array_equal(np.asarray(drawn["act#1.png"])[:12], np.asarray(untitled)[:12])
