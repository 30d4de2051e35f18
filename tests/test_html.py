"""report.html: escaping (pure) and a real headless-Chromium check of what a person sees."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from fvis.api import DumpOptions, ModelRef, dump, resolve_model
from fvis.html import to_html
from fvis.inputs import InputOptions
from fvis.loading import LoadOptions

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class Hostile(nn.Module):
    """A model whose layer names try to become markup."""

    def __init__(self) -> None:
        super().__init__()
        self.add_module("<script>alert(1)</script>", nn.Linear(4, 4))
        self.add_module("x\"onmouseover='1'", nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.children():
            x = module(x)
        return x


def _hostile_report(tmp_path: Path) -> dict:
    model_path = tmp_path / "hostile.pt"
    torch.save(Hostile().state_dict(), model_path)
    arch = tmp_path / "arch.py"
    arch.write_text("from tests.test_html import Hostile\n")
    ref = ModelRef(model_path, LoadOptions(arch=f"{arch}:Hostile"))
    return dump(ref, InputOptions(shape=(1, 4)), DumpOptions(all_leaves=True), None).report


def test_names_from_the_model_are_escaped(tmp_path: Path) -> None:
    page = to_html(_hostile_report(tmp_path))
    island = re.search(r'<script id="fvis-data" type="application/json">(.*?)</script>', page, re.S)
    # The JSON island cannot close its own <script> element...
    assert island is not None and "<" not in island.group(1)
    markup = page.replace(island.group(0), "")
    # ...and outside it every name is escaped text, never markup or an attribute.
    assert "<script>alert(1)</script>" not in markup
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in markup
    assert 'x"onmouseover' not in markup and "onmouseover='1'" not in markup
    assert "x&#34;onmouseover=&#39;1&#39;" in markup


def test_page_has_no_external_resources(tmp_path: Path) -> None:
    page = to_html(_hostile_report(tmp_path))
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert "@import" not in page and "url(http" not in page


@pytest.fixture(scope="module")
def sample_report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("html") / "out"
    ref, _ = resolve_model(None, LoadOptions(), cwd=out.parent)
    dump(ref, InputOptions(shape=(2, 10)), DumpOptions(all_leaves=True, backward=True), out)
    return out


def test_page_lists_every_capture_with_a_badge(sample_report_dir: Path) -> None:
    page = (sample_report_dir / "report.html").read_text()
    for label in ("inner.linear", "inner.relu", "linear_out"):
        assert re.search(rf'<h3 class="mono">{re.escape(label)} <span class="badge ok">', page)
    assert page.count("data:image/png;base64,") == 3  # small pictures are embedded


def _dom(url: str, tmp_path: Path) -> str:
    assert CHROMIUM is not None
    proc = subprocess.run(
        [
            CHROMIUM,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=3000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return proc.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs it)")
def test_page_renders_in_chromium(sample_report_dir: Path, tmp_path: Path) -> None:
    url = (sample_report_dir / "report.html").as_uri()
    dom = _dom(url, tmp_path)
    body = re.search(r"<body([^>]*)>", dom)
    assert body is not None
    attrs = body.group(1)
    assert 'data-ready="yes"' in attrs, "the page script did not finish"
    assert "data-errors" not in attrs, f"script errors: {attrs}"
    assert 'data-captures="3"' in attrs
    assert 'data-images="3/3"' in attrs, "every picture must load"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs it)")
def test_filter_hides_other_layers(sample_report_dir: Path, tmp_path: Path) -> None:
    url = (sample_report_dir / "report.html").as_uri() + "#filter=inner.relu"
    dom = _dom(url, tmp_path)
    articles = re.findall(r'<article class="capture( hidden)?"[^>]*data-name="([^"]*)"', dom)
    shown = [name for hidden, name in articles if not hidden]
    assert shown == ["inner.relu"]
    assert {name for hidden, name in articles if hidden} == {"inner.linear", "linear_out"}
