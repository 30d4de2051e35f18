"""``fvis dump`` end to end: the bundled default, every runnable checkpoint format, the report
files and how they agree, --json, --sample all, --save-tensors, and hostile layer names."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from fvis.capture import capture
from fvis.sample import build_sample
from sample_models.zoo import build

ARCH = "fvis.sample:OuterModel"  # inner_outer's classes live in fvis.sample
SAFE_NAME = re.compile(r"^[A-Za-z0-9._#~\-\[\]]+$")


@pytest.fixture(scope="session")
def inner_outer_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """inner_outer in every checkpoint format (only this sample: fast)."""
    # Imported here, not at module level: importing the submodule sample_models.build
    # rebinds the package attribute sample_models.build (the function) to the submodule.
    from sample_models.build import build_all

    out = tmp_path_factory.mktemp("inner_outer_zoo")
    build_all(out, ["inner_outer"], echo=lambda _line: None)
    return out


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in an empty folder (no pyproject.toml), so the bundled default is the default."""
    monkeypatch.chdir(tmp_path)


def _report(out: Path) -> dict[str, Any]:
    return json.loads((out / "report.json").read_text())


def _unescape_md(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def _x(seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randn((batch, 10), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- the default


def test_no_arguments_in_empty_folder_uses_bundled_default(cli: Any, tmp_path: Path) -> None:
    code, stdout, stderr = cli("dump")
    assert code == 0, stderr
    out = tmp_path / "fvis-out"
    report = _report(out)
    assert report["schema"] == "fvis.report/1"
    assert report["model"]["format"] == "bundled"
    assert report["model"]["class"].endswith("OuterModel")
    assert [c["label"] for c in report["captures"]] == ["inner.linear", "inner.relu", "linear_out"]
    assert (out / "report.md").is_file() and (out / ".fvis-manifest.json").is_file()
    assert "using the bundled sample inner_outer" in stderr
    assert "no --layer given: capturing every leaf module (3)" in stderr
    assert "inner.relu" in stdout and "wrote" in stdout


def test_report_fields_and_pictures_agree(cli: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, _, stderr = cli("dump", "--all", "--shape", "2,10", "--out", out)
    assert code == 0, stderr
    report = _report(out)
    top = {"schema", "fvis_version", "torch_version", "model", "input", "mode", "train"}
    assert top | {"captures", "never_ran", "warnings", "backward"} <= set(report)
    assert set(report["model"]) >= {"file", "format", "sha256", "class", "params", "trainable"}
    assert report["model"]["params"] == sum(p.numel() for p in build_sample().parameters())
    assert report["input"]["shapes"] == [[2, 10]] and report["input"]["dtypes"] == ["float32"]
    assert report["mode"] == "grad" and report["train"] is False
    assert report["never_ran"] == [] and report["backward"] is None
    manifest = json.loads((out / ".fvis-manifest.json").read_text())
    listed: list[str] = []
    for c in report["captures"]:
        assert set(c) >= {"label", "layer", "call", "calls", "path", "shape", "dtype", "grad"}
        assert c["shape"][0] == 2 and c["dtype"] == "float32"
        assert c["stats"]["numel"] == int(np.prod(c["shape"]))
        assert c["verdict"]["connected"] is True
        assert len(c["images"]) == 1
        for image in c["images"]:
            path = out / image["file"]
            assert path.is_file() and image["file"] in manifest["files"]
            with Image.open(path) as png:
                assert png.format == "PNG"
                assert 8 <= png.width <= 4096 and 8 <= png.height <= 4096
            listed.append(image["file"])
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert sorted(listed) == pngs


def test_report_md_mentions_every_capture(cli: Any, tmp_path: Path) -> None:
    weights = tmp_path / "nested.pt"
    torch.save(build("nested_cnn").state_dict(), weights)
    out = tmp_path / "out"
    code, _, stderr = cli(
        "dump",
        weights,
        "--arch",
        "sample_models.zoo:Classifier",
        "--all",
        "--shape",
        "1,3,16,16",
        "--out",
        out,
    )
    assert code == 0, stderr
    labels = [c["label"] for c in _report(out)["captures"]]
    assert "backbone.layer1.0.relu#2" in labels and "head.2" in labels
    md = _unescape_md((out / "report.md").read_text())
    for label in labels:
        assert f"`{label}`" in md, label
    for c in _report(out)["captures"]:
        for image in c["images"]:
            assert f"(<{quote(image['file'], safe='')}>)" in md  # percent-encoded link


# --------------------------------------------------------------------------- formats


FORMATS = [
    ("state_dict.pt", ["--arch", ARCH]),
    ("training.pt", ["--arch", ARCH]),
    ("safetensors", ["--arch", ARCH]),
    ("torchscript.pt", ["--arch", ARCH]),
    ("pt2", []),
    ("module.pt", ["--allow-module", "fvis.sample"]),
    ("module.pt", ["--arch", ARCH]),
]


@pytest.mark.parametrize(("fmt", "extra"), FORMATS, ids=[f"{f}{len(e)}" for f, e in FORMATS])
def test_every_runnable_format(
    cli: Any, tmp_path: Path, inner_outer_zoo: Path, fmt: str, extra: list[str]
) -> None:
    model_file = inner_outer_zoo / f"inner_outer.{fmt}"
    example = inner_outer_zoo / "inner_outer.input.pt"
    out = tmp_path / "out"
    code, stdout, stderr = cli(
        "dump",
        model_file,
        *extra,
        "--layer",
        "inner.relu",
        "--input",
        example,
        "--save-tensors",
        "--out",
        out,
    )
    assert code == 0, stderr
    report = _report(out)
    assert [c["label"] for c in report["captures"]] == ["inner.relu"]
    assert report["captures"][0]["verdict"]["connected"] is True
    assert report["model"]["file"] == str(model_file)
    with torch.no_grad():
        want = build_sample().inner(torch.load(example, weights_only=True)).numpy()
    np.testing.assert_allclose(
        load_file(str(out / "activations.safetensors"))["inner.relu"], want, rtol=1e-5
    )
    assert "connected to the output" in stdout


def test_pt2_without_input_synthesizes_one(cli: Any, tmp_path: Path, inner_outer_zoo: Path) -> None:
    code, _, stderr = cli(
        "dump", inner_outer_zoo / "inner_outer.pt2", "--layer", "inner.relu", "-o", tmp_path / "o"
    )
    assert code == 0, stderr


def test_state_dict_without_arch_is_usage_error(
    cli: Any, tmp_path: Path, inner_outer_zoo: Path
) -> None:
    code, _, stderr = cli("dump", inner_outer_zoo / "inner_outer.state_dict.pt", "-o", tmp_path)
    assert code == 2 and "--arch" in stderr


def test_pickled_module_without_allowlist_is_refused(
    cli: Any, tmp_path: Path, inner_outer_zoo: Path
) -> None:
    out = tmp_path / "out"
    code, _, stderr = cli("dump", inner_outer_zoo / "inner_outer.module.pt", "-o", out)
    assert code == 4 and "--allow-module fvis.sample" in stderr
    assert not out.exists() or list(out.iterdir()) == []


# --------------------------------------------------------------------------- options


def test_unknown_layer_is_exit_2_with_suggestion(cli: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, stdout, stderr = cli("dump", "--layer", "inner.rleu", "--out", out)
    assert code == 2
    assert "no layer 'inner.rleu'; did you mean 'inner.relu (ReLU)'" in stderr
    assert "fvis layers" in stderr and stdout == ""
    assert not out.exists() or list(out.iterdir()) == []


def test_json_stdout_parses_and_matches_report_file(cli: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, stdout, stderr = cli("dump", "--layer", "inner.relu", "--json", "--out", out)
    assert code == 0, stderr
    printed = json.loads(stdout)
    assert printed["schema"] == "fvis.report/1"
    assert printed == _report(out)


def test_quiet_prints_nothing(cli: Any, tmp_path: Path) -> None:
    code, stdout, _ = cli("dump", "--layer", "inner.relu", "-q", "--out", tmp_path / "out")
    assert code == 0 and stdout == ""


def test_sample_all_writes_one_picture_per_sample(cli: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, _, stderr = cli(
        "dump", "--layer", "inner.relu", "--shape", "2,10", "--sample", "all", "--out", out
    )
    assert code == 0, stderr
    (c,) = _report(out)["captures"]
    assert [i["sample"] for i in c["images"]] == [0, 1]
    files = [i["file"] for i in c["images"]]
    assert len(set(files)) == 2 and all((out / f).is_file() for f in files)
    assert (out / files[0]).read_bytes() != (out / files[1]).read_bytes()


def test_sample_index_picks_the_drawn_sample(cli: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ("--layer", "inner.relu", "--shape", "3,10", "--sample", "2", "--save-tensors")
    code, _, stderr = cli("dump", *args, "--out", out)
    assert code == 0, stderr
    with torch.no_grad():
        want = build_sample().inner(_x(0, 3)).numpy()
    saved = load_file(str(out / "activations.safetensors"))["inner.relu"]
    np.testing.assert_allclose(saved, want, rtol=1e-5)  # the whole batch, not only sample 2


@pytest.mark.parametrize("bad", ["x", "-1", "1.5"])
def test_bad_sample_is_usage_error(cli: Any, tmp_path: Path, bad: str) -> None:
    code, _, stderr = cli("dump", "--sample", bad, "--out", tmp_path / "o")
    assert code == 2 and "--sample" in stderr


def test_save_tensors_equal_captured_values(cli: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, _, stderr = cli(
        "dump", "--all", "--shape", "1,10", "--seed", "3", "--save-tensors", "-o", out
    )
    assert code == 0, stderr
    saved = load_file(str(out / "activations.safetensors"))
    model = build_sample()
    result = capture(model, [_x(3)], ["inner.linear", "inner.relu", "linear_out"])
    assert set(saved) == {c.label for c in result.captures}
    for c in result.captures:
        assert saved[c.label].dtype == np.float32
        assert saved[c.label].shape == c.shape  # the whole batch
        np.testing.assert_allclose(saved[c.label][0], c.values, rtol=1e-6)
    with torch.no_grad():
        np.testing.assert_allclose(saved["linear_out"], model(_x(3)).numpy(), rtol=1e-5)


def test_no_images_writes_only_reports(cli: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, _, stderr = cli("dump", "--layer", "inner.relu", "--no-images", "--out", out)
    assert code == 0, stderr
    assert list(out.glob("*.png")) == []
    assert _report(out)["captures"][0]["images"] == []


def test_never_ran_layer_is_reported(cli: Any, tmp_path: Path) -> None:
    weights = tmp_path / "never.pt"
    torch.save(build("never_runs").state_dict(), weights)
    out = tmp_path / "out"
    code, stdout, stderr = cli(
        "dump", weights, "--arch", "sample_models.zoo:NeverRuns", "--all", "-o", out
    )
    assert code == 0, stderr
    report = _report(out)
    assert sorted(report["never_ran"]) == ["direct", "skipped"]
    assert "skipped: never ran for this input" in stdout
    assert "direct: not called as a module" in stdout
    assert "`skipped`" in (out / "report.md").read_text()


# --------------------------------------------------------------------------- hostile names


HOSTILE_ARCH = """
import torch
from torch import nn

NAMES = [
    "[red]x[/red]",
    "\\x1b[31mred",
    "a/b",
    "a\\\\b",
    "\\u202eevil",
    "new\\nline",
    "CON",
    "x" * 300,
    "\\u00e9\\u540d",
    "[bold]",
]


class Hostile(nn.Module):
    def __init__(self):
        super().__init__()
        for name in NAMES:
            self.add_module(name, nn.Linear(4, 4))

    def forward(self, x):
        for module in self._modules.values():
            x = module(x)
        return x


def build():
    torch.manual_seed(0)
    return Hostile()
"""


def test_hostile_layer_names_give_safe_files_and_terminal_output(cli: Any, tmp_path: Path) -> None:
    arch = tmp_path / "hostile.py"
    arch.write_text(HOSTILE_ARCH)
    namespace: dict[str, Any] = {}
    exec(compile(HOSTILE_ARCH, str(arch), "exec"), namespace)  # the names, as Python sees them
    names: list[str] = namespace["NAMES"]
    weights = tmp_path / "hostile.pt"
    torch.save(namespace["build"]().state_dict(), weights)
    out = tmp_path / "out"
    before = {p for p in tmp_path.rglob("*") if out not in p.parents}

    code, stdout, stderr = cli("dump", weights, "--arch", f"{arch}:build", "--all", "-o", out)
    assert code == 0, stderr

    # Files: all plain, safe, unique names directly inside --out; nothing written elsewhere.
    assert {p for p in tmp_path.rglob("*") if out not in p.parents and p != out} == before
    files = sorted(p.name for p in out.iterdir())
    assert all(p.is_file() for p in out.iterdir())
    pictures = [f for f in files if f.endswith(".png")]
    assert len(pictures) == len(names)
    for name in pictures:
        assert SAFE_NAME.match(name), name
        assert len(name.encode()) <= 255 and not name.startswith(".")
    report = _report(out)
    assert [c["label"] for c in report["captures"]] == names  # the report keeps the real names
    assert sorted(i["file"] for c in report["captures"] for i in c["images"]) == pictures

    # Terminal and report.md: no raw control or bidi characters, no rich markup applied.
    for text in (stdout, stderr, (out / "report.md").read_text()):
        assert "\x1b" not in text and "\u202e" not in text
    assert "\\x1b[31mred" in stdout and "\\u202eevil" in stdout
    assert "[red]x[/red]" in stdout and "[bold]" in stdout  # shown literally, not as markup
    assert "new\\x0aline" in stdout
