"""``.pt2`` programs that torch.export.load would run code from, allocate gigabytes for, or
choke on: fvis refuses them before torch reads the file, for ``layers`` as for ``dump``.

Every fixture is the sample ``inner_outer.pt2`` rewritten in ``tmp_path``; payloads create a
marker file there, which must never appear.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import resource
import shutil
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from payloads import SystemPayload

from fvis.errors import BadFileError, ExitStatus, RefusedError
from fvis.loading import LoadOptions, load_model

Entries = list[tuple[str, bytes]]
PREFIX = "archive/"
WEIGHTS = f"{PREFIX}data/weights/model_weights_config.json"
CONSTANTS = f"{PREFIX}data/constants/model_constants_config.json"
PROGRAM = f"{PREFIX}models/model.json"
SAMPLE_INPUTS = f"{PREFIX}data/sample_inputs/model.pt"
# "weights_only=False", or torch's own prose: "with `weights_only` set to `False`"
UNSAFE_ADVICE = ("weights_only", "Weights only load failed")

CONSTRUCTOR_C = r"""
#include <stdio.h>
__attribute__((constructor)) static void fvis_marker(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) fclose(f);
}
"""


# --------------------------------------------------------------------------- building files


def _entries(zoo: Path) -> Entries:
    with zipfile.ZipFile(zoo / "inner_outer.pt2") as archive:
        return [(info.filename, archive.read(info)) for info in archive.infolist()]


def _write(path: Path, entries: Entries) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are written as given
        for name, data in entries:
            archive.writestr(name, data)
    return path


def _replace(entries: Entries, name: str, data: bytes) -> Entries:
    assert name in dict(entries), name
    return [(n, data if n == name else d) for n, d in entries]


def _edit_json(entries: Entries, name: str, edit: Callable[[Any], Any]) -> Entries:
    return _replace(entries, name, json.dumps(edit(json.loads(dict(entries)[name]))).encode())


def _cli_clean(code: int, stderr: str, expected: int, *says: str) -> str:
    """The contract for a refused file: the code, one error line naming the problem, at most
    one hint, no traceback, never torch's "weights_only=False" advice."""
    assert code == expected, stderr
    lines = stderr.strip().splitlines()
    assert lines[0].startswith("fvis: error: "), stderr
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("hint: ")), stderr
    assert "Traceback" not in stderr
    assert not any(advice in stderr for advice in UNSAFE_ADVICE), stderr
    for text in says:
        assert text in lines[0], stderr
    return lines[0]


COMMANDS = {
    "layers": lambda model: ("layers", model),
    "layers-json": lambda model: ("layers", model, "--json"),
    "dump": lambda model: ("dump", model, "--out", "out"),
    "check": lambda model: ("check", model),
}


def _run_all(cli: Any, model: Path, expected: int, *says: str) -> None:
    for name, argv in COMMANDS.items():
        code, _, stderr = cli(*argv(model))
        _cli_clean(code, stderr, expected, str(model), *says)
        assert not Path("out").exists(), name


# --------------------------------------------------------------------------- 1. AOTInductor


@pytest.fixture
def aoti_program(zoo: Path, tmp_path: Path) -> tuple[Path, Path]:
    """inner_outer.pt2 plus an AOTInductor model whose library's constructor writes a marker."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the shared library")
    marker = tmp_path / "so-constructor-ran"
    source = tmp_path / "ctor.c"
    source.write_text(CONSTRUCTOR_C)
    library = tmp_path / "ctor.so"
    subprocess.run(
        ["gcc", "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", library, source], check=True
    )
    folder = f"{PREFIX}data/aotinductor/model/"
    extra = [
        (folder + "model.wrapper.so", library.read_bytes()),
        (folder + "model.wrapper_metadata.json", b'{"AOTI_DEVICE_KEY": "cpu"}'),
    ]
    return _write(tmp_path / "aoti.pt2", [*_entries(zoo), *extra]), marker


def test_aoti_library_is_live(aoti_program: tuple[Path, Path]) -> None:
    """Control: torch's own loader dlopens the library, and its constructor runs."""
    path, marker = aoti_program
    script = "import sys\nfrom torch.export.pt2_archive._package import load_pt2\n"
    script += "try:\n    load_pt2(sys.argv[1])\nexcept Exception:\n    pass\n"
    env = {**os.environ, "TMPDIR": str(path.parent)}  # torch unpacks the package there
    subprocess.run(
        [sys.executable, "-c", script, str(path)], check=True, capture_output=True, env=env
    )
    assert marker.exists()


def test_aoti_library_is_refused_everywhere(
    cli: Any, chdir: Path, aoti_program: tuple[Path, Path]
) -> None:
    path, marker = aoti_program
    _run_all(cli, path, ExitStatus.REFUSED, "data/aotinductor/model/", "native code")
    assert not marker.exists()


def test_aoti_program_lists_with_trust(
    cli: Any, chdir: Path, aoti_program: tuple[Path, Path]
) -> None:
    """--trust is the user's decision: the listing (which runs nothing) goes ahead."""
    path, marker = aoti_program
    code, stdout, stderr = cli("layers", path, "--trust")
    assert code == 0, stderr
    assert "linear_out" in stdout
    assert not marker.exists()


# --------------------------------------------------------------------------- 2. objects


def _with_object_constant(entries: Entries, path_name: str, data: bytes) -> Entries:
    def add(config: Any) -> Any:
        entry = {"path_name": path_name, "is_param": False, "use_pickle": False}
        config["config"]["evil_obj"] = {**entry, "tensor_meta": None}
        return config

    member = f"{PREFIX}data/constants/{path_name}"
    return [*_edit_json(entries, CONSTANTS, add), (member, data)]


@pytest.mark.parametrize("path_name", ["opaque_obj_0", "custom_obj_0"])
def test_object_constant_is_refused_whatever_use_pickle_says(
    cli: Any, chdir: Path, zoo: Path, tmp_path: Path, path_name: str
) -> None:
    """torch picks the reader by the name's prefix (opaque_obj_ -> pickle.loads), not by
    ``use_pickle``, and the forced weights_only setting does not reach pickle.loads."""
    marker = tmp_path / "opaque-object-ran"
    payload = pickle.dumps(SystemPayload(marker))
    path = _write(tmp_path / "object.pt2", _with_object_constant(_entries(zoo), path_name, payload))
    _run_all(cli, path, ExitStatus.REFUSED, "'evil_obj'", path_name)
    assert not marker.exists()


# --------------------------------------------------------------------------- 3. duplicates


@pytest.mark.parametrize("evil_first", [True, False], ids=["evil-first", "evil-last"])
def test_duplicate_entries_are_refused_with_fvis_own_words(
    cli: Any, chdir: Path, zoo: Path, tmp_path: Path, evil_first: bool
) -> None:
    """zipfile reads the last copy of a name, torch the first: whichever is the payload,
    fvis refuses (exit 4) and never relays torch's "weights_only=False" advice."""
    marker = tmp_path / "shadowed-sample-inputs-ran"
    evil = io.BytesIO()
    torch.save(((SystemPayload(marker),), {}), evil)
    entries = _entries(zoo)
    shadow = [(SAMPLE_INPUTS, evil.getvalue())]
    path = _write(tmp_path / "dup.pt2", shadow + entries if evil_first else entries + shadow)
    _run_all(cli, path, ExitStatus.REFUSED, "data/sample_inputs/model.pt")
    assert not marker.exists()


# --------------------------------------------------------------------------- 4. bombs


def _huge_weight(entries: Entries) -> Entries:
    """linear_out.bias declares 65536x65536 float32 (16 GiB) over an empty record: torch
    turns an empty record into torch.zeros(declared shape)."""
    config = json.loads(dict(entries)[WEIGHTS])
    entry = config["config"]["linear_out.bias"]
    entry["tensor_meta"]["sizes"] = [{"as_int": 65536}, {"as_int": 65536}]
    entry["tensor_meta"]["strides"] = [{"as_int": 65536}, {"as_int": 1}]
    record = f"{PREFIX}data/weights/{entry['path_name']}"
    return _replace(_replace(entries, WEIGHTS, json.dumps(config).encode()), record, b"")


def test_weight_bigger_than_its_bytes_is_refused_before_torch_loads(
    cli: Any, chdir: Path, zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path / "bomb.pt2", _huge_weight(_entries(zoo)))
    assert path.stat().st_size < 20_000

    def forbidden(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("torch.export.load must not see this file")

    monkeypatch.setattr(torch.export, "load", forbidden)
    _run_all(cli, path, ExitStatus.BAD_FILE, "linear_out.bias", "17,179,869,184 bytes")


def _run_capped(
    args: list[str], cwd: Path, limit: int = 3 << 30
) -> subprocess.CompletedProcess[str]:
    """``python -m fvis ARGS`` with its address space capped (so a bomb fails fast, not the
    machine)."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = {k: v for k, v in os.environ.items() if k != "FVIS_DEBUG"}
    return subprocess.run(
        [sys.executable, "-m", "fvis", *args],
        cwd=cwd,
        env=env,
        preexec_fn=cap,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_huge_example_input_is_not_synthesized(zoo: Path, tmp_path: Path) -> None:
    """The program says it was traced on a [2**31, 10] input: synthesizing it would take
    80 GB. fvis applies its --shape element cap and says so (exit 5)."""

    def widen(program: Any) -> Any:
        program["graph_module"]["graph"]["tensor_values"]["x"]["sizes"][0] = {"as_int": 1 << 31}
        return program

    path = _write(tmp_path / "wide.pt2", _edit_json(_entries(zoo), PROGRAM, widen))
    result = _run_capped(["dump", str(path), "--out", "out"], tmp_path)
    line = _cli_clean(result.returncode, result.stderr, ExitStatus.MODEL_INPUT, str(path))
    assert "21,474,836,480 elements" in line
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- 5. bad JSON


def _set_first_size(raw: str) -> Callable[[Entries], Entries]:
    def edit(entries: Entries) -> Entries:
        text = dict(entries)[WEIGHTS].decode()
        text = text.replace('"sizes": [{"as_int": 5}', f'"sizes": [{{"as_int": {raw}}}', 1)
        return _replace(entries, WEIGHTS, text.encode())

    return edit


def _set_entry(value: Any) -> Callable[[Entries], Entries]:
    def edit(entries: Entries) -> Entries:
        def put(config: Any) -> Any:
            config["config"]["linear_out.bias"] = value
            return config

        return _edit_json(entries, WEIGHTS, put)

    return edit


def _set_meta(key: str, value: Any) -> Callable[[Entries], Entries]:
    def edit(entries: Entries) -> Entries:
        def put(config: Any) -> Any:
            config["config"]["linear_out.bias"]["tensor_meta"][key] = value
            return config

        return _edit_json(entries, WEIGHTS, put)

    return edit


BAD_CONFIGS: dict[str, Callable[[Entries], Entries]] = {
    "size-infinity": _set_first_size("Infinity"),
    "size-nan": _set_first_size("NaN"),
    "size-string": _set_first_size('"abc"'),
    "size-10e400": _set_first_size("1" + "0" * 400),
    "size-negative": _set_first_size("-5"),
    "size-float": _set_first_size("5.0"),
    "entry-list": _set_entry([1, 2]),
    "entry-number": _set_entry(3),
    "meta-list": _set_entry({"path_name": "weight_3", "use_pickle": False, "tensor_meta": [1]}),
    "sizes-dict": _set_meta("sizes", {"as_int": 2}),
    "sizes-list-of-lists": _set_meta("sizes", [[2]]),
    "dtype-string": _set_meta("dtype", "float"),
    "config-list": lambda entries: _replace(entries, WEIGHTS, b'{"config": [1, 2]}'),
    "not-json": lambda entries: _replace(entries, WEIGHTS, b"{not json"),
    "deep-json": lambda entries: _replace(entries, WEIGHTS, b"[" * 200_000 + b"]" * 200_000),
}


@pytest.mark.parametrize("case", BAD_CONFIGS, ids=list(BAD_CONFIGS))
def test_malformed_weights_config_is_one_line_exit_3(
    cli: Any, chdir: Path, zoo: Path, tmp_path: Path, case: str
) -> None:
    path = _write(tmp_path / f"{case}.pt2", BAD_CONFIGS[case](_entries(zoo)))
    _run_all(cli, path, ExitStatus.BAD_FILE, "model_weights_config.json")


# --------------------------------------------------------------------------- 6. logging


def _failing_decomposition(zoo: Path, tmp_path: Path) -> Path:
    """x declared [1, 11] against a Linear(10, ...): fake propagation fails in
    run_decompositions, where torch logs a 20-line traceback."""

    def skew(program: Any) -> Any:
        program["graph_module"]["graph"]["tensor_values"]["x"]["sizes"][1] = {"as_int": 11}
        return program

    return _write(tmp_path / "decomp.pt2", _edit_json(_entries(zoo), PROGRAM, skew))


def test_failed_decomposition_prints_one_line(zoo: Path, tmp_path: Path) -> None:
    """torch's logging handlers write to the real stderr, so this runs fvis as a process."""
    path = _failing_decomposition(zoo, tmp_path)
    result = _run_capped(["dump", str(path), "--out", "out"], tmp_path)
    _cli_clean(result.returncode, result.stderr, ExitStatus.BAD_FILE, str(path), "reduction dim")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_callers_logging_level_is_restored(zoo: Path, tmp_path: Path) -> None:
    path = _failing_decomposition(zoo, tmp_path)
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        with pytest.raises(BadFileError):
            load_model(path, LoadOptions())
        assert logging.root.manager.disable == logging.INFO
    finally:
        logging.disable(previous)


# --------------------------------------------------------------------------- sympify


def test_expression_that_is_code_is_refused(
    cli: Any, chdir: Path, zoo: Path, tmp_path: Path
) -> None:
    """torch parses every symbolic size with sympy.sympify, which evals the text."""
    marker = tmp_path / "sympify-ran"

    def inject(program: Any) -> Any:
        size = {"expr_str": f"__import__('os').system('touch {marker}')", "hint": {"as_int": 1}}
        program["graph_module"]["graph"]["tensor_values"]["x"]["sizes"][0] = {"as_expr": size}
        return program

    path = _write(tmp_path / "sympify.pt2", _edit_json(_entries(zoo), PROGRAM, inject))
    _run_all(cli, path, ExitStatus.REFUSED, "__import__", "sympify")
    assert not marker.exists()


def test_dynamic_shapes_program_is_not_a_false_alarm(cli: Any, chdir: Path) -> None:
    """torch writes symbolic sizes as sympy's srepr ("Symbol('s0', positive=True, ...)")."""
    from torch import nn
    from torch.export import Dim

    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU())
    batch = Dim("batch", min=2, max=64)
    program = torch.export.export(model, (torch.randn(4, 8),), dynamic_shapes=({0: batch},))
    torch.export.save(program, chdir / "dynamic.pt2")
    assert b"Symbol(" in (chdir / "dynamic.pt2").read_bytes()
    code, stdout, stderr = cli("layers", chdir / "dynamic.pt2")
    assert code == 0, stderr
    assert "torch.export program" in stdout


# --------------------------------------------------------------------------- legit files


def test_legit_program_still_runs_with_and_without_trust(cli: Any, chdir: Path, zoo: Path) -> None:
    for extra in ((), ("--trust",)):
        out = f"out{len(extra)}"
        code, _, stderr = cli("dump", zoo / "nested_cnn.pt2", "--out", out, "-q", *extra)
        assert code == 0, stderr
        assert any(Path(out).glob("**/*.png"))


# --------------------------------------------------------------------------- other pickles


def test_legacy_weights_file_is_checked_like_sample_inputs(
    cli: Any, chdir: Path, zoo: Path, tmp_path: Path
) -> None:
    """torch prefers a legacy ``data/weights/model.pt`` to the weights config and torch.load's
    it: its globals are checked before torch sees it."""
    marker = tmp_path / "legacy-weights-ran"
    evil = io.BytesIO()
    torch.save({"w": SystemPayload(marker)}, evil)
    entries = [*_entries(zoo), (f"{PREFIX}data/weights/model.pt", evil.getvalue())]
    path = _write(tmp_path / "legacy.pt2", entries)
    code, _, stderr = cli("dump", path, "--out", "out")
    _cli_clean(code, stderr, ExitStatus.REFUSED, str(path), "data/weights/model.pt", "posix.system")
    assert not marker.exists()


def test_torch_weights_only_advice_is_never_relayed(
    zoo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should torch meet a pickle fvis's scan did not see, its "re-run with weights_only=False"
    advice becomes fvis's own refusal."""
    advice = "Weights only load failed. Re-running `torch.load` with `weights_only` set to `False`"

    def unsafe(*_args: Any, **_kwargs: Any) -> Any:
        raise pickle.UnpicklingError(advice)

    monkeypatch.setattr(torch.export, "load", unsafe)
    with pytest.raises(RefusedError) as info:
        load_model(zoo / "inner_outer.pt2")
    text = f"{info.value.message} {info.value.hint}"
    assert "weights_only" not in text
    assert "--trust" not in text
