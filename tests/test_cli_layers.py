"""``fvis layers`` through the CLI: a table of (args, exit code, expected output), the error
boundary's contract, ``[tool.fvis]`` config, ``--json`` and a golden text tree."""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from fvis.sample import build_sample

RunCli = Callable[..., tuple[int, str, str]]  # the `cli` fixture: (exit code, stdout, stderr)

GOLDEN = Path(__file__).parent / "golden"
CLASSIFIER = "sample_models.zoo:Classifier"


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    code: int
    stdout: tuple[str, ...] = ()  # substrings that must appear
    stderr: tuple[str, ...] = ()
    not_stdout: tuple[str, ...] = ()


@pytest.fixture
def files(zoo: Path, chdir: Path) -> dict[str, str]:
    """Placeholders for the table: the zoo, and bad files built in the (empty) cwd."""
    Image.new("RGB", (8, 8)).save(chdir / "cat.png")
    (chdir / "empty.pt").write_bytes(b"")
    (chdir / "folder").mkdir()
    data = (zoo / "nested_cnn.state_dict.pt").read_bytes()
    (chdir / "cut.pt").write_bytes(data[: len(data) // 2])
    state = build_sample().state_dict()
    del state["inner.linear.bias"]
    state["linear_out.weight"] = torch.zeros(7, 5)
    torch.save(state, chdir / "mismatched.pt")
    torch.save({"weight": torch.zeros(2), "x": _SystemPayload(chdir / "MARKER")}, chdir / "evil.pt")
    with zipfile.ZipFile(chdir / "notes.zip", "w") as archive:
        archive.writestr("notes/a.txt", "hi")
    return {"zoo": str(zoo), "cwd": str(chdir)}


class _SystemPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch '{self.marker}'",))


def expand(args: tuple[str, ...], files: dict[str, str]) -> list[str]:
    return [a.format(**files) for a in args]


OK_CASES = {
    "bundled-default": Case(
        (), 0, ("inner.relu", "OuterModel", "5 modules, 67 parameters"), ("bundled sample",)
    ),
    "depth-1": Case(("--depth", "1"), 0, ("inner  InnerModel", "linear_out"), (), ("inner.relu",)),
    "filter-glob": Case(
        ("--filter", "inner.*"), 0, ("inner.linear", "inner.relu"), (), ("linear_out  Linear",)
    ),
    "shape-runs-forward": Case(
        ("--shape", "1,10"), 0, ("-> (1, 5)", "-> (1, 2)", "input: random normal (1, 10)")
    ),
    "nested-cnn-input": Case(
        (
            "{zoo}/nested_cnn.state_dict.pt",
            "--input",
            "{zoo}/nested_cnn.input.pt",
            "--arch",
            CLASSIFIER,
        ),
        0,
        ("backbone.layer1.0.relu", "2 calls", "nested_cnn.input.pt"),
    ),
    "never-runs": Case(
        (
            "{zoo}/never_runs.state_dict.pt",
            "--arch",
            "sample_models.zoo:NeverRuns",
            "--shape",
            "1,10",
        ),
        0,
        ("never ran: skipped, direct",),
    ),
    "pt2-listed": Case(
        ("{zoo}/nested_cnn.pt2",), 0, ("backbone.layer1.0.relu", "torch.export program")
    ),
    "pickled-module-listed": Case(
        ("{zoo}/nested_cnn.module.pt",), 0, ("backbone.layer1.0.relu", "read without running")
    ),
    "state-dict-listed": Case(
        ("{zoo}/nested_cnn.safetensors",), 0, ("backbone.layer1.0.conv1", "state dict only")
    ),
}


@pytest.mark.parametrize("case", OK_CASES.values(), ids=OK_CASES.keys())
def test_layers_ok(cli: RunCli, files: dict[str, str], case: Case) -> None:
    code, out, err = cli("layers", *expand(case.args, files))
    assert code == case.code, err
    for text in case.stdout:
        assert text in out, text
    for text in case.not_stdout:
        assert text not in out, text
    for text in case.stderr:
        assert text in err, text
    assert "error" not in err


def test_nested_cnn_relu_line_has_two_calls(cli: RunCli, zoo: Path) -> None:
    code, out, _ = cli(
        "layers",
        zoo / "nested_cnn.state_dict.pt",
        "--input",
        zoo / "nested_cnn.input.pt",
        "--arch",
        CLASSIFIER,
    )
    assert code == 0
    [line] = [ln for ln in out.splitlines() if ln.rstrip().endswith("backbone.layer1.0.relu")]
    assert "2 calls" in line
    [stem] = [ln for ln in out.splitlines() if ln.rstrip().endswith("backbone.relu")]
    assert "calls" not in stem  # ran once


def test_bundled_default_note_is_one_line(cli: RunCli, chdir: Path) -> None:
    code, out, err = cli("layers")
    assert code == 0
    assert err.count("\n") == 1 and err.startswith("fvis: ") and "bundled sample" in err
    assert "inner.relu" in out


ERROR_CASES = {
    "png-as-model": Case(("{cwd}/cat.png",), 3, (), ("is a PNG image", "hint: ", "--input")),
    "missing-file": Case(("{cwd}/nope.pt",), 2, (), ("no such file",)),
    "folder": Case(("{cwd}/folder",), 2, (), ("is a folder",)),
    "empty-file": Case(("{cwd}/empty.pt",), 3, (), ("empty (0 bytes)",)),
    "truncated-zip": Case(("{cwd}/cut.pt",), 3, (), ("truncated",)),
    "plain-zip": Case(("{cwd}/notes.zip",), 3, (), ("not a PyTorch checkpoint",)),
    "pickled-module-run": Case(
        ("{zoo}/nested_cnn.module.pt", "--shape", "1,3,32,32"),
        4,
        (),
        ("sample_models.zoo.Classifier", "--allow-module sample_models.zoo"),
    ),
    "payload-run": Case(
        ("{cwd}/evil.pt", "--arch", "fvis.sample:OuterModel", "--shape", "1,10"),
        4,
        (),
        ("system", "dangerous"),
    ),
    "trust-wrong-hash": Case(
        (
            "{cwd}/evil.pt",
            "--arch",
            "fvis.sample:OuterModel",
            "--shape",
            "1,10",
            "--trust-sha256",
            "sha256:" + "0" * 64,
        ),
        4,
        (),
        ("SHA-256",),
    ),
    "trust-not-a-hash": Case(
        ("{zoo}/inner_outer.module.pt", "--trust-sha256", "model.pt"), 2, (), ("'model.pt'",)
    ),
    "trust-takes-no-value": Case(("--trust", "model.pt"), 2, (), ("model.pt",)),
    "arch-mismatch": Case(
        ("{cwd}/mismatched.pt", "--arch", "fvis.sample:OuterModel"),
        5,
        (),
        ("1 missing", "1 shape mismatch", "hint: "),
    ),
    "forward-fails": Case(("--shape", "1,7"), 5, (), ("forward failed",)),
    "arch-bad-spec": Case(("{zoo}/inner_outer.state_dict.pt", "--arch", "nocolon"), 2),
    "arch-kwargs-not-json": Case(
        ("{zoo}/inner_outer.state_dict.pt", "--arch", CLASSIFIER, "--arch-kwargs", "width=8"), 2
    ),
    "bad-shape": Case(("--shape", "a,b"), 2, (), ("--shape",)),
}


def _check_error_output(code: int, out: str, err: str, case: Case) -> None:
    assert code == case.code, err
    assert out == ""
    lines = err.splitlines()
    assert sum(ln.startswith("fvis: error: ") for ln in lines) == 1, err
    assert sum(ln.startswith("hint: ") for ln in lines) <= 1, err
    for text in case.stderr:
        assert text in err, text
    if case.code == 3:  # a wrong or damaged file is never "fixed" by trusting it
        assert "--trust" not in err and "weights_only" not in err


@pytest.mark.parametrize("case", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_layers_errors_one_line_no_traceback(
    cli: RunCli, files: dict[str, str], case: Case
) -> None:
    code, out, err = cli("layers", *expand(case.args, files))
    _check_error_output(code, out, err, case)
    assert "Traceback" not in err
    assert all(ln.startswith(("fvis: ", "hint: ")) for ln in err.splitlines()), err
    assert not Path(files["cwd"], "MARKER").exists()


@pytest.mark.parametrize("case", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_layers_errors_with_debug_show_traceback(
    cli: RunCli, files: dict[str, str], case: Case
) -> None:
    code, out, err = cli("--debug", "layers", *expand(case.args, files))
    assert "Traceback (most recent call last)" in err
    _check_error_output(code, out, err, case)


def test_fvis_debug_env_shows_traceback(cli: RunCli, files: dict[str, str]) -> None:
    code, _, err = cli("layers", f"{files['cwd']}/cat.png", env={"FVIS_DEBUG": "1"})
    assert code == 3
    assert "Traceback" in err and "BadFileError" in err


@pytest.mark.parametrize("module", ["os", "builtins", "*"])
def test_dangerous_allow_module_is_a_usage_error(cli: RunCli, zoo: Path, module: str) -> None:
    code, _, err = cli(
        "layers",
        zoo / "inner_outer.state_dict.pt",
        "--arch",
        "fvis.sample:OuterModel",
        "--allow-module",
        module,
        "--shape",
        "1,10",
    )
    assert code == 2
    assert module in err


def test_trust_bound_to_the_right_hash_runs_a_pickled_module(cli: RunCli, zoo: Path) -> None:
    model = zoo / "inner_outer.module.pt"
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    code, out, err = cli("layers", model, "--shape", "1,10", "--trust-sha256", digest)
    assert code == 0, err
    assert "-> (1, 5)" in out
    [warning] = [ln for ln in err.splitlines() if "because of --trust" in ln]
    assert warning.startswith("fvis: warning: running code from") and digest in warning


@pytest.mark.parametrize("where", ["last", "before-option"])
def test_bare_trust_flag_runs_a_pickled_module(cli: RunCli, zoo: Path, where: str) -> None:
    model = str(zoo / "inner_outer.module.pt")
    if where == "last":
        args = [model, "--shape", "1,10", "--trust"]
    else:
        args = [model, "--trust", "--shape", "1,10"]
    code, out, err = cli("layers", *args)
    assert code == 0, err
    assert "-> (1, 5)" in out
    assert err.count("because of --trust") == 1


def test_without_trust_the_same_module_is_refused(cli: RunCli, zoo: Path) -> None:
    code, _, err = cli("layers", zoo / "inner_outer.module.pt", "--shape", "1,10")
    assert code == 4
    assert "fvis.sample.OuterModel" in err and "--trust" in err  # a user class: offered


# --------------------------------------------------------------------------- [tool.fvis]


def test_pyproject_model_and_arch_are_used(cli: RunCli, zoo: Path, chdir: Path) -> None:
    (chdir / "pyproject.toml").write_text(
        f'[tool.fvis]\nmodel = "{zoo / "nested_cnn.state_dict.pt"}"\narch = "{CLASSIFIER}"\n'
    )
    code, out, err = cli("layers")
    assert code == 0, err
    assert "backbone.layer1.0.relu" in out  # ReLUs only exist through the arch
    assert "[tool.fvis]" in err and "bundled" not in err


def test_pyproject_relative_model_and_shape(cli: RunCli, zoo: Path, chdir: Path) -> None:
    (chdir / "models").mkdir()
    (chdir / "models" / "m.pt").write_bytes((zoo / "inner_outer.state_dict.pt").read_bytes())
    (chdir / "pyproject.toml").write_text(
        '[project]\nname = "x"\n\n[tool.fvis]\nmodel = "models/m.pt"\n'
        'arch = "fvis.sample:OuterModel"\nshape = "1,10"\n'
    )
    code, out, err = cli("layers")
    assert code == 0, err
    assert "-> (1, 5)" in out and "inner.relu" in out


def test_argument_overrides_pyproject_model(cli: RunCli, zoo: Path, chdir: Path) -> None:
    (chdir / "pyproject.toml").write_text(
        f'[tool.fvis]\nmodel = "{zoo / "nested_cnn.state_dict.pt"}"\narch = "{CLASSIFIER}"\n'
    )
    code, out, _ = cli("layers", zoo / "inner_outer.pt2")
    assert code == 0
    assert "inner.relu" in out and "backbone" not in out


def test_pyproject_unknown_key_is_usage_error(cli: RunCli, chdir: Path) -> None:
    (chdir / "pyproject.toml").write_text('[tool.fvis]\nmodle = "model.pt"\n')
    code, out, err = cli("layers")
    assert code == 2
    assert out == ""
    assert "fvis: error:" in err and "'modle'" in err
    assert "hint: known keys:" in err and "model" in err


def test_pyproject_invalid_toml_is_usage_error(cli: RunCli, chdir: Path) -> None:
    (chdir / "pyproject.toml").write_text("[tool.fvis\nmodel = \n")
    code, _, err = cli("layers")
    assert code == 2
    assert "not valid TOML" in err and "Traceback" not in err


def test_pyproject_without_fvis_table_uses_bundled(cli: RunCli, chdir: Path) -> None:
    (chdir / "pyproject.toml").write_text('[project]\nname = "x"\n')
    code, out, err = cli("layers")
    assert code == 0 and "inner.relu" in out and "bundled sample" in err


# --------------------------------------------------------------------------- --json

TOP_KEYS = {"schema", "model", "input", "totals", "layers", "never_ran"}
LAYER_KEYS = {
    "name",
    "class",
    "depth",
    "leaf",
    "nested_model",
    "params",
    "trainable",
    "frozen",
    "buffers",
    "shared_with",
    "calls",
    "output_shapes",
}


def test_json_schema_and_stable_keys(cli: RunCli, chdir: Path) -> None:
    code, out, _ = cli("layers", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["schema"] == "fvis.layers/1"
    assert set(doc) == TOP_KEYS
    assert set(doc["model"]) == {"file", "format", "note"}
    assert set(doc["totals"]) == {"modules", "params", "trainable", "frozen"}
    assert doc["totals"] == {"modules": 5, "params": 67, "trainable": 67, "frozen": 0}
    assert all(set(layer) == LAYER_KEYS for layer in doc["layers"])
    assert [layer["name"] for layer in doc["layers"]] == [
        "",
        "inner",
        "inner.linear",
        "inner.relu",
        "linear_out",
    ]
    assert doc["input"] is None and doc["never_ran"] is None
    assert all(layer["calls"] is None for layer in doc["layers"])


def test_json_with_shape_adds_calls_and_output_shapes(cli: RunCli, chdir: Path) -> None:
    code, out, _ = cli("layers", "--json", "--shape", "1,10")
    assert code == 0
    doc = json.loads(out)
    layers = {layer["name"]: layer for layer in doc["layers"]}
    assert layers["inner.relu"]["calls"] == 1
    assert layers["inner.relu"]["output_shapes"] == [[1, 5]]
    assert layers[""]["output_shapes"] == [[1, 2]]
    assert doc["never_ran"] == []
    assert "random normal (1, 10)" in doc["input"]


def test_json_nested_cnn_and_never_runs(cli: RunCli, zoo: Path) -> None:
    code, out, _ = cli(
        "layers",
        "--json",
        zoo / "nested_cnn.state_dict.pt",
        "--arch",
        CLASSIFIER,
        "--input",
        zoo / "nested_cnn.input.pt",
    )
    assert code == 0
    layers = {layer["name"]: layer for layer in json.loads(out)["layers"]}
    assert layers["backbone.layer1.0.relu"]["calls"] == 2
    assert layers["backbone.layer1.0.relu"]["output_shapes"] == [[1, 8, 16, 16]]
    code, out, _ = cli(
        "layers",
        "--json",
        zoo / "never_runs.safetensors",
        "--arch",
        "sample_models.zoo:NeverRuns",
        "--shape",
        "1,10",
    )
    assert code == 0
    doc = json.loads(out)
    assert doc["never_ran"] == ["skipped", "direct"]
    assert {layer["name"]: layer["calls"] for layer in doc["layers"]}["skipped"] == 0


def test_json_depth_and_filter_select_layers_not_totals(cli: RunCli, chdir: Path) -> None:
    code, out, _ = cli("layers", "--json", "--depth", "1")
    doc = json.loads(out)
    assert code == 0 and [layer["name"] for layer in doc["layers"]] == ["", "inner", "linear_out"]
    assert doc["totals"]["modules"] == 5
    code, out, _ = cli("layers", "--json", "--filter", "inner.*")
    names = [layer["name"] for layer in json.loads(out)["layers"]]
    assert code == 0 and names == ["", "inner.linear", "inner.relu"]


def test_json_errors_keep_stdout_empty(cli: RunCli, files: dict[str, str]) -> None:
    code, out, err = cli("layers", "--json", f"{files['cwd']}/cat.png")
    assert code == 3 and out == "" and "PNG" in err


# --------------------------------------------------------------------------- golden text tree


def test_golden_text_tree_of_bundled_sample(cli: RunCli, chdir: Path) -> None:
    """The whole stdout of ``fvis layers`` for the bundled sample, colourless.

    Regenerate with ``FVIS_REGEN_GOLDEN=1 pytest tests/test_cli_layers.py``.
    """
    from rich.console import Console

    from fvis.api import list_layers, resolve_model
    from fvis.listing import to_rich
    from fvis.loading import LoadOptions

    code, out, _ = cli("layers", env={"COLUMNS": "100", "NO_COLOR": "1", "TERM": "dumb"})
    assert code == 0
    golden = GOLDEN / "layers_inner_outer.txt"
    if os.environ.get("FVIS_REGEN_GOLDEN") == "1":
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(out, encoding="utf-8")
    assert out == golden.read_text(encoding="utf-8")
    # The library renderer at a fixed width draws the same tree the CLI printed.
    console = Console(file=io.StringIO(), width=100, color_system=None, highlight=False)
    console.print(to_rich(list_layers(resolve_model(None, LoadOptions(), cwd=chdir)[0])))
    assert out.startswith(console.file.getvalue())  # type: ignore[attr-defined]
