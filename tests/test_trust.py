"""The trust policy (fvis/trust.py): the allowlist never reaches the standard library, files
that name dangerous globals are called malicious everywhere, torch's unsafe advice never
reaches the user, and code a checkout's pyproject names is announced when it is imported.

Payloads create a marker file or truncate a victim file; tests assert neither happened.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import functools
import io
import json
import pathlib
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import RunCli
from payloads import (
    ExecPayload,
    OpenForWritingPayload,
    SystemPayload,
    duplicate_pickle,
    file_openers,
    module_holding,
    swap_pickle,
)

from fvis.errors import ExitStatus, MaliciousFileError, RefusedError, UsageError
from fvis.formats import sniff
from fvis.loading import LoadOptions, Trust, TrustWarning, inspect_model, load_model, read_inert
from fvis.trust import check_allow_modules, effect_of, findings, torch_reason

VICTIM_TEXT = b"precious results, do not truncate\n"
OPENERS = sorted(file_openers())
IO_ARCH = "fvis.sample:OuterModel"
CNN_ARCH = "sample_models.zoo:Classifier"


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim.txt"
    path.write_bytes(VICTIM_TEXT)
    return path


def _opener_module(tmp_path: Path, module: str, victim: Path) -> Path:
    path = tmp_path / f"opener-{module}.pt"
    torch.save(module_holding(OpenForWritingPayload(file_openers()[module], victim)), path)
    assert victim.read_bytes() == VICTIM_TEXT
    return path


# --------------------------------------------------------------------------- 1. the allowlist


@pytest.mark.parametrize("module", OPENERS)
def test_opener_payloads_are_live(tmp_path: Path, victim: Path, module: str) -> None:
    """Control: full unpickling does truncate the victim, so 'byte-identical' means something."""
    path = _opener_module(tmp_path, module, victim)
    torch.load(path, weights_only=False)
    assert victim.read_bytes() != VICTIM_TEXT  # truncated (gzip then writes its header)


@pytest.mark.parametrize("module", OPENERS)
def test_following_the_old_allow_module_hint_is_a_usage_error(
    cli: RunCli, tmp_path: Path, victim: Path, module: str
) -> None:
    """fvis used to hint '--allow-module _io' for such a file; following it truncated the
    victim with exit 0. The standard library is never allowable."""
    path = _opener_module(tmp_path, module, victim)
    out = tmp_path / "out"
    code, _, err = cli("dump", path, "--allow-module", module, "--shape", "1,2", "-o", out)
    assert code == ExitStatus.USAGE, err
    assert f"--allow-module {module}" in err and "standard-library" in err
    assert victim.read_bytes() == VICTIM_TEXT
    assert not out.exists()
    with pytest.raises(UsageError):
        load_model(path, LoadOptions(allow_modules=(module,)))
    assert victim.read_bytes() == VICTIM_TEXT


@pytest.mark.parametrize("module", OPENERS)
def test_refusal_of_a_file_opener_never_suggests_a_stdlib_allow_module(
    cli: RunCli, tmp_path: Path, victim: Path, module: str
) -> None:
    path = _opener_module(tmp_path, module, victim)
    for argv in (("dump", path, "--shape", "1,2", "-o", tmp_path / "out"), ("layers", path)):
        code, _, err = cli(*argv)
        assert code == ExitStatus.REFUSED, err
        assert "--allow-module" not in err and "--trust" not in err
        assert "would open, write or delete files" in err
    assert victim.read_bytes() == VICTIM_TEXT


def test_a_harmless_stdlib_class_is_no_finding_and_never_an_allow_module_hint(
    tmp_path: Path,
) -> None:
    """argparse.Namespace in a training checkpoint is common and harmless: listable, and the
    refusal on loading offers --arch and --trust but not '--allow-module argparse'."""
    path = tmp_path / "training.pt"
    state = {"fc.weight": torch.zeros(2, 2)}
    torch.save({"model": state, "args": argparse.Namespace(lr=0.1)}, path)
    assert inspect_model(path).layers[0].params == 4
    with pytest.raises(RefusedError) as info:
        load_model(path, LoadOptions(arch=IO_ARCH))
    assert not isinstance(info.value, MaliciousFileError)
    assert "argparse.Namespace" in info.value.message
    assert "--allow-module" not in (info.value.hint or "")
    assert "--trust" in (info.value.hint or "")


@pytest.mark.parametrize(
    "module", ["_io", "_pyio", "io", "zipfile", "logging", "gzip", "collections", "_thread"]
)
def test_stdlib_modules_and_their_private_twins_are_never_allowable(module: str) -> None:
    with pytest.raises(UsageError):
        check_allow_modules((module,))


@pytest.mark.parametrize("module", ["dill", "cloudpickle", "joblib", "numpy.core", "pandas"])
def test_known_code_runners_are_never_allowable(module: str) -> None:
    with pytest.raises(UsageError):
        check_allow_modules((module,))


def test_user_packages_stay_allowable() -> None:
    check_allow_modules(("mypkg", "mypkg.models", "sample_models.zoo", "fvis.sample"))


def test_config_allow_modules_with_a_stdlib_module_is_refused(
    cli: RunCli, chdir: Path, victim: Path
) -> None:
    path = _opener_module(chdir, "_io", victim)
    pyproject = chdir / "pyproject.toml"
    pyproject.write_text(f'[tool.fvis]\nmodel = "{path.name}"\nallow-modules = ["_io"]\n')
    for argv in (("layers",), ("dump", "--shape", "1,2", "-o", chdir / "out")):
        code, _, err = cli(*argv)
        assert code == ExitStatus.USAGE, err
        assert f"{pyproject}: [tool.fvis] allow-modules _io" in err
    assert victim.read_bytes() == VICTIM_TEXT


# --------------------------------------------------------------------------- 2. findings


@pytest.mark.parametrize(
    ("qualname", "effect"),
    [
        ("posix.system", "would run a shell command"),
        ("os.system", "would run a shell command"),
        ("nt.system", "would run a shell command"),
        ("os.execv", "would run a shell command"),
        ("subprocess.Popen", "would run a shell command"),
        ("pty.spawn", "would run a shell command"),
        ("builtins.exec", "would execute Python code"),
        ("__builtin__.eval", "would execute Python code"),
        ("builtins.compile", "would execute Python code"),
        ("runpy._run_code", "would execute Python code"),
        ("torch.fx.graph_module._exec_with_source", "would execute Python code"),
        ("builtins.__import__", "would import a module"),
        ("importlib.import_module", "would import a module"),
        ("importlib.util.spec_from_file_location", "would import a module"),
        ("builtins.getattr", "would reach any attribute of any object"),
        ("builtins.open", "would open, write or delete files"),
        ("_io.FileIO", "would open, write or delete files"),
        ("shutil.rmtree", "would open, write or delete files"),
        ("socket.create_connection", "would open a network connection"),
        ("pickle.loads", "would unpickle more data"),
        ("ctypes.CDLL", "would call native code"),
    ],
)
def test_dangerous_globals_say_what_they_would_do(qualname: str, effect: str) -> None:
    assert (effect_of(qualname) or "").startswith(effect)


@pytest.mark.parametrize(
    "qualname",
    [
        "collections.OrderedDict",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_parameter",
        "torch.FloatStorage",
        "torch.nn.modules.linear.Linear",
        "builtins.set",
        "__builtin__.set",
        "copyreg._reconstructor",
        "_codecs.encode",
        "argparse.Namespace",
        "pathlib.PosixPath",
        "datetime.datetime",
        "numpy.core.multiarray._reconstruct",
        "numpy.dtype",
        "functools.partial",
        "mypkg.models.Net",
        "io.BytesIO",
        "posixpath.join",
    ],
)
def test_harmless_globals_are_no_finding(qualname: str) -> None:
    assert effect_of(qualname) is None


def test_no_false_alarm_on_a_rich_training_checkpoint(cli: RunCli, tmp_path: Path) -> None:
    """The objects real training scripts save next to the weights are not malicious."""
    path = tmp_path / "training.pt"
    torch.save(
        {
            "model": collections.OrderedDict(fc=torch.zeros(2, 2)),
            "args": argparse.Namespace(lr=0.1, out=pathlib.Path("runs/1")),
            "when": datetime.datetime(2024, 1, 2),
            "history": np.arange(3.0),
            "counts": collections.defaultdict(int, a=1),
            "sched": functools.partial(max, 1),
        },
        path,
    )
    code, out, err = cli("layers", path)
    assert code == 0, err
    assert "dangerous" not in err and "4 params" in out


def test_every_zoo_checkpoint_is_clean(zoo: Path) -> None:
    """No sample checkpoint, in any pickle format, names a dangerous global."""
    checked = 0
    for path in sorted(zoo.iterdir()):
        sniffed = sniff(path)
        if sniffed.kind.value in ("torch-zip", "torch-legacy", "torchscript"):
            assert findings(read_inert(sniffed).globals_seen) == (), path.name
            checked += 1
    assert checked >= 5


def _payload_files(folder: Path, zoo: Path) -> dict[str, Path]:
    """One file per format that carries an os.system payload; each would touch a marker."""
    marker = folder / "MARKER"
    state = {"fc.weight": torch.zeros(2, 2), "extra": SystemPayload(marker)}
    files = {"zip": folder / "evil.zip.pt", "legacy": folder / "evil.legacy.pt"}
    torch.save(state, files["zip"])
    torch.save(state, files["legacy"], _use_new_zipfile_serialization=False)
    files["module"] = folder / "evil.module.pt"
    torch.save(module_holding(SystemPayload(marker)), files["module"])
    files["torchscript"] = swap_pickle(
        zoo / "nested_cnn.torchscript.pt",
        folder / "evil.torchscript.pt",
        pickle.dumps(SystemPayload(marker), protocol=2),
    )
    files["exec-dict"] = folder / "evil-exec.pt"  # no tensors at all: not "a dict without"
    torch.save({"config": ExecPayload(marker)}, files["exec-dict"])
    return files


@pytest.fixture
def payload_files(tmp_path: Path, zoo: Path) -> dict[str, Path]:
    return _payload_files(tmp_path, zoo)


PAYLOAD_KINDS = ["zip", "legacy", "module", "torchscript", "exec-dict"]


@pytest.mark.parametrize("kind", PAYLOAD_KINDS)
def test_layers_says_the_file_is_malicious(
    cli: RunCli, payload_files: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    path = payload_files[kind]
    code, out, err = cli("layers", path)
    assert code == ExitStatus.REFUSED, err
    lines = err.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"fvis: error: {path} names dangerous globals")
    effect = "would execute Python code" if kind == "exec-dict" else "would run a shell command"
    assert effect in lines[0] and "dangerous" in lines[1]
    assert "dict without tensors" not in err and "--trust" not in err
    assert out == ""
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.parametrize("kind", PAYLOAD_KINDS)
def test_layers_json_carries_the_finding(
    cli: RunCli, payload_files: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    path = payload_files[kind]
    code, out, err = cli("layers", path, "--json")
    assert code == ExitStatus.REFUSED, err
    answer = json.loads(out)
    assert answer["schema"] == "fvis.layers/1"
    assert answer["model"]["file"] == str(path) and answer["model"]["format"]
    refused = answer["refused"]
    assert refused["exit_code"] == 4 and refused["reason"] == "dangerous-globals"
    qualnames = [f["global"] for f in refused["findings"]]
    assert qualnames and set(qualnames) <= {"posix.system", "__builtin__.exec", "builtins.exec"}
    assert all(f["effect"].startswith("would ") for f in refused["findings"])
    assert "layers" not in answer
    assert err.startswith("fvis: error: ")
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.parametrize(
    ("kind", "args"),
    [
        ("module", ("--arch", "{tmp}/net.py:Net")),  # weights read as data, nothing imported
        ("torchscript", ("--arch", CNN_ARCH)),
        ("zip", ("--arch", "{tmp}/net.py:Net")),
    ],
)
@pytest.mark.parametrize("command", ["dump", "check", "layers"])
def test_arch_runs_refuse_files_that_carry_payloads(
    cli: RunCli,
    payload_files: dict[str, Path],
    tmp_path: Path,
    kind: str,
    args: tuple[str, ...],
    command: str,
) -> None:
    """--arch reads the tensors as data, so the payload never runs, but the user is told."""
    (tmp_path / "net.py").write_text(
        "from torch import nn\n\ndef Net():\n    return nn.Sequential(nn.Linear(2, 2), nn.ReLU())\n"
    )
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    extra = ["--shape", "1,3,32,32" if kind == "torchscript" else "1,2"]
    if command == "dump":
        extra += ["-o", str(tmp_path / "out")]
    code, _, err = cli(command, payload_files[kind], *argv, *extra)
    assert code == ExitStatus.REFUSED, err
    assert "posix.system (would run a shell command)" in err
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "MARKER").exists()


def test_input_file_with_a_payload_is_called_malicious(
    cli: RunCli, zoo: Path, tmp_path: Path
) -> None:
    path = tmp_path / "input.pt"
    torch.save({"x": torch.zeros(1, 3, 8, 8), "y": SystemPayload(tmp_path / "MARKER")}, path)
    argv = ("dump", zoo / "nested_cnn.state_dict.pt", "--arch", CNN_ARCH, "--input", path)
    code, _, err = cli(*argv, "-o", tmp_path / "out")
    assert code == ExitStatus.REFUSED, err
    assert f"{path} names dangerous globals: posix.system (would run a shell command)" in err
    assert not (tmp_path / "MARKER").exists()


def test_trust_warns_naming_the_globals_and_goes_on(
    cli: RunCli, payload_files: dict[str, Path], tmp_path: Path
) -> None:
    code, out, err = cli("layers", payload_files["zip"], "--trust")
    assert code == 0, err
    assert err.splitlines() == [
        f"fvis: warning: {payload_files['zip']} names dangerous globals: posix.system "
        "(would run a shell command); going on because of --trust"
    ]
    assert "4 params" in out
    assert not (tmp_path / "MARKER").exists()  # listing runs nothing, trusted or not


def test_api_refusal_carries_findings(payload_files: dict[str, Path]) -> None:
    for call in (inspect_model, load_model):
        with pytest.raises(MaliciousFileError) as info:
            call(payload_files["legacy"])
        assert [f.qualname for f in info.value.findings] == ["posix.system"]
        assert info.value.kind == "torch-legacy"
    with pytest.warns(TrustWarning, match="posix.system"):
        inspect_model(payload_files["legacy"], LoadOptions(trust=Trust()))


# --------------------------------------------------------------------------- 3. torch's advice


@pytest.fixture
def duplicated(tmp_path: Path) -> Path:
    clean = tmp_path / "clean.pt"
    torch.save({"w": torch.zeros(2)}, clean)
    evil = io.BytesIO()
    torch.save({"w": torch.zeros(2), "x": SystemPayload(tmp_path / "MARKER")}, evil)
    with zipfile.ZipFile(evil) as archive:
        payload = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    return duplicate_pickle(clean, tmp_path / "twice.pt", payload)


def test_duplicate_pickle_control_readers_disagree(duplicated: Path) -> None:
    """Control: zipfile reads the clean copy while torch reads the payload."""
    with zipfile.ZipFile(duplicated) as archive:
        name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        assert b"posix" not in archive.read(name)
    with pytest.raises(pickle.UnpicklingError, match="posix"):
        torch.load(duplicated, weights_only=True)


@pytest.mark.parametrize(
    "argv",
    [("layers",), ("layers", "--arch", IO_ARCH), ("dump", "--arch", IO_ARCH, "-o", "{tmp}/out")],
)
def test_duplicate_data_pkl_is_refused_in_fvis_words(
    cli: RunCli, duplicated: Path, tmp_path: Path, argv: tuple[str, ...]
) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, out, err = cli(args[0], duplicated, *args[1:])
    assert code == ExitStatus.REFUSED, err
    assert f"{duplicated} holds more than one zip entry named clean/data.pkl" in err
    assert "weights_only" not in err + out and "--trust" not in err
    assert not (tmp_path / "MARKER").exists()


def _torch_refusal(tmp_path: Path) -> Exception:
    path = tmp_path / "refused.pt"
    torch.save({"x": SystemPayload(tmp_path / "MARKER")}, path)
    try:
        torch.load(path, weights_only=True)
    except Exception as exc:
        return exc
    raise AssertionError("torch loaded a payload with weights_only=True")


def test_torch_reason_drops_torch_advice(tmp_path: Path) -> None:
    exc = _torch_refusal(tmp_path)
    assert "weights_only" in str(exc)  # control: torch's text does carry the advice
    reason = torch_reason(exc)
    assert "posix.system" in reason
    assert "weights_only" not in reason and "trust" not in reason.lower()


def test_a_safe_loader_refusal_never_relays_torch_advice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever torch's weights_only loader refuses, fvis says it in its own words."""
    refusal = _torch_refusal(tmp_path)
    path = tmp_path / "clean.pt"
    torch.save({"inner.linear.weight": torch.zeros(4, 10)}, path)

    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise pickle.UnpicklingError(str(refusal).replace("unsupported GLOBAL", "odd opcode"))

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(RefusedError) as info:
        load_model(path, LoadOptions(arch=IO_ARCH))
    text = f"{info.value.message} {info.value.hint}"
    assert "weights_only" not in text and "trust" not in text.lower()
    assert "safe loader refused" in info.value.message


# --------------------------------------------------------------------------- 4. config code


def _write_config(folder: Path, lines: str) -> Path:
    path = folder / "pyproject.toml"
    path.write_text("[tool.fvis]\n" + lines)
    return path


def test_config_arch_import_is_announced(cli: RunCli, zoo: Path, chdir: Path) -> None:
    model = zoo / "nested_cnn.state_dict.pt"
    config = _write_config(chdir, f'model = "{model}"\narch = "{CNN_ARCH}"\n')
    code, _, err = cli("layers")
    assert code == 0, err
    announced = [line for line in err.splitlines() if "[tool.fvis] arch" in line]
    assert announced == [
        f"fvis: warning: importing {CNN_ARCH} because [tool.fvis] arch in {config} says so "
        "(code from this checkout runs)"
    ]


def test_an_arch_flag_is_not_announced_as_config_code(cli: RunCli, zoo: Path, chdir: Path) -> None:
    _write_config(chdir, f'model = "{zoo / "nested_cnn.state_dict.pt"}"\narch = "{CNN_ARCH}"\n')
    code, _, err = cli("layers", "--arch", CNN_ARCH)
    assert code == 0, err
    assert "[tool.fvis] arch" not in err


def test_config_allow_modules_import_is_announced_only_when_it_happens(
    cli: RunCli, zoo: Path, chdir: Path
) -> None:
    model = zoo / "nested_cnn.module.pt"
    config = _write_config(chdir, f'model = "{model}"\nallow-modules = ["sample_models.zoo"]\n')
    code, _, err = cli("layers")  # listing imports nothing
    assert code == 0, err
    assert "allow-modules" not in err
    code, _, err = cli("layers", "--shape", "1,3,32,32")  # running imports the file's classes
    assert code == 0, err
    assert (
        f"fvis: warning: imported sample_models.zoo for the file's classes because "
        f"[tool.fvis] allow-modules in {config} says so (code from this checkout runs)"
    ) in err.splitlines()
