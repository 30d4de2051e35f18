"""The trust boundary: nothing from a file runs unless the user said --trust.

Every payload here would create a marker file in the test's temp dir. A control test proves
each payload is live (plain unpickling does create the marker), so "marker absent" means
fvis really did not run it.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
import textwrap
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from payloads import ExecPayload, SubprocessPayload, SystemPayload

from fvis.errors import ExitStatus, FvisError, MaliciousFileError, RefusedError, UsageError
from fvis.loading import LoadOptions, Trust, TrustWarning, inspect_model, load_model

# --------------------------------------------------------------------------- payloads


PAYLOADS: dict[str, tuple[type, str]] = {
    # name: (payload class, a word the refusal must name)
    "os.system": (SystemPayload, "system"),
    "builtins.exec": (ExecPayload, "exec"),
    "subprocess.call": (SubprocessPayload, "call"),
}
LAYOUTS = ("zip", "legacy")
EFFECTS = {  # what fvis says each payload's global would do
    "system": "would run a shell command",
    "exec": "would execute Python code",
    "call": "would run a shell command",
}


@dataclass(frozen=True)
class Evil:
    path: Path
    marker: Path
    word: str


def make_payload(folder: Path, payload: str, layout: str) -> Evil:
    """A state-dict-looking checkpoint with one entry that runs the payload when unpickled."""
    cls, word = PAYLOADS[payload]
    marker = folder / "MARKER"
    path = folder / f"evil.{layout}.pt"
    obj = {"weight": torch.zeros(2, 3), "bias": torch.zeros(2), "extra": cls(marker)}
    torch.save(obj, path, _use_new_zipfile_serialization=(layout == "zip"))
    assert not marker.exists()
    return Evil(path, marker, word)


DANGEROUS_CASES = [
    pytest.param((payload, layout), id=f"{payload}-{layout}")
    for payload in PAYLOADS
    for layout in LAYOUTS
]


@pytest.fixture(params=DANGEROUS_CASES)
def evil(request: pytest.FixtureRequest, tmp_path: Path) -> Evil:
    payload, layout = request.param
    return make_payload(tmp_path, payload, layout)


def test_payloads_are_live(evil: Evil) -> None:
    """Control: unsafe unpickling really runs the payload, so the tests below mean something."""
    torch.load(evil.path, weights_only=False)
    assert evil.marker.exists()


def test_inspect_refuses_payload_as_malicious(evil: Evil) -> None:
    """Listing tells the user the file is malicious (a scanner's verdict), naming the global
    and what it would do, instead of listing it as a normal checkpoint."""
    with pytest.raises(MaliciousFileError) as info:
        inspect_model(evil.path)
    assert not evil.marker.exists()
    assert info.value.exit_status == ExitStatus.REFUSED
    assert evil.word in info.value.message
    assert [f.effect for f in info.value.findings] == [EFFECTS[evil.word]]
    assert "--trust" not in f"{info.value.message} {info.value.hint}"


def test_inspect_with_trust_warns_and_lists(evil: Evil) -> None:
    with pytest.warns(TrustWarning, match=evil.word):
        tree = inspect_model(evil.path, LoadOptions(trust=Trust()))
    assert not evil.marker.exists()  # listing runs nothing, trusted or not
    assert tree.layers[0].params == 2 * 3 + 2  # the real tensors are still listed


def test_load_refuses_and_names_the_global(evil: Evil) -> None:
    for options in (LoadOptions(), LoadOptions(arch="fvis.sample:OuterModel")):
        with pytest.raises(RefusedError) as info:
            load_model(evil.path, options)
        assert info.value.exit_status == ExitStatus.REFUSED == 4
        assert str(evil.path) in info.value.message
        assert evil.word in info.value.message
    assert not evil.marker.exists()


DANGEROUS_HINT_CASES = [
    pytest.param(
        payload,
        layout,
        id=f"{payload}-{layout}",
    )
    for payload in PAYLOADS
    for layout in LAYOUTS
]


@pytest.mark.parametrize(("payload", "layout"), DANGEROUS_HINT_CASES)
def test_refusal_never_suggests_trust_for_dangerous_globals(
    tmp_path: Path, payload: str, layout: str
) -> None:
    evil = make_payload(tmp_path, payload, layout)
    with pytest.raises(RefusedError) as info:
        load_model(evil.path, LoadOptions(arch="fvis.sample:OuterModel"))
    text = f"{info.value.message}\n{info.value.hint or ''}"
    assert "--trust" not in text
    assert "weights_only=False" not in text
    assert "--allow-module" not in text
    assert "dangerous" in (info.value.hint or "")


ALLOW_ATTEMPTS = [
    ("os",),
    ("posix",),
    ("builtins",),
    ("__builtin__",),
    ("subprocess",),
    ("commands",),
    ("os", "posix", "builtins", "__builtin__", "subprocess", "commands"),
]


@pytest.mark.parametrize("allow", ALLOW_ATTEMPTS, ids="+".join)
def test_allow_module_never_allows_dangerous_globals(evil: Evil, allow: tuple[str, ...]) -> None:
    options = LoadOptions(arch="fvis.sample:OuterModel", allow_modules=allow)
    with pytest.raises((RefusedError, UsageError)):
        load_model(evil.path, options)
    assert not evil.marker.exists()


def test_env_force_no_weights_only_does_not_unlock_payloads(
    evil: Evil, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(RefusedError):
        inspect_model(evil.path)
    with pytest.raises(RefusedError):
        load_model(evil.path, LoadOptions(arch="fvis.sample:OuterModel"))
    assert not evil.marker.exists()


# --------------------------------------------------------------------------- --trust binding


def test_trust_bound_to_wrong_hash_refuses_before_loading(tmp_path: Path) -> None:
    evil = make_payload(tmp_path, "os.system", "zip")
    trust = Trust.parse("sha256:" + "0" * 64)
    with pytest.raises(RefusedError) as info:
        load_model(evil.path, LoadOptions(arch="fvis.sample:OuterModel", trust=trust))
    assert info.value.exit_status == 4
    assert hashlib.sha256(evil.path.read_bytes()).hexdigest() in info.value.message
    assert not evil.marker.exists()


def test_trust_bound_to_right_hash_runs_the_file(tmp_path: Path) -> None:
    """The binding is real: the right hash (upper-case accepted) does unpickle in full."""
    evil = make_payload(tmp_path, "builtins.exec", "zip")
    digest = hashlib.sha256(evil.path.read_bytes()).hexdigest()
    trust = Trust.parse(f"sha256:{digest.upper()}")
    assert trust == Trust(digest)
    warned = pytest.warns(TrustWarning, match="dangerous globals")
    with warned, pytest.warns(TrustWarning, match=digest), pytest.raises(UsageError):
        load_model(evil.path, LoadOptions(trust=trust))  # runs, then: no --arch given
    assert evil.marker.exists()


@pytest.mark.parametrize("value", ["model.pt", "sha256:abc", "sha256:" + "g" * 64, "yes", ""])
def test_trust_parse_rejects_non_hash_values(value: str) -> None:
    with pytest.raises(UsageError) as info:
        Trust.parse(value)
    assert info.value.exit_status == ExitStatus.USAGE == 2
    assert repr(value) in info.value.message


def test_trust_parse_and_flags() -> None:
    digest = "ab" * 32
    assert Trust.parse(None) is None
    assert Trust.parse("any") == Trust(None)
    assert Trust.parse(digest) == Trust.parse(f"sha256:{digest.upper()}") == Trust(digest)
    assert Trust.from_flags(False, None) is None
    assert Trust.from_flags(True, None) == Trust(None)
    assert Trust.from_flags(False, digest) == Trust(digest)  # --trust-sha256 implies --trust


# --------------------------------------------------------------------------- pickled user classes

USER_MODULE = textwrap.dedent(
    """
    import os
    import pathlib

    from torch import nn

    _marker = os.environ.get("FVIS_EVIL_MARKER")
    if _marker:  # import-time code: runs whenever this module is imported
        pathlib.Path(_marker + ".import").touch()


    class EvilNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.fc(x))

        def __setstate__(self, state):
            marker = os.environ.get("FVIS_EVIL_MARKER")
            if marker:
                pathlib.Path(marker + ".setstate").touch()
            super().__setstate__(state)
    """
)


@dataclass(frozen=True)
class UserModule:
    name: str
    zip_path: Path
    legacy_path: Path
    marker: Path

    def markers(self) -> list[str]:
        return sorted(p.name for p in self.marker.parent.glob(self.marker.name + ".*"))


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[UserModule]:
    """A pickled ``EvilNet`` from an importable temp module whose import and ``__setstate__``
    each create a marker once ``FVIS_EVIL_MARKER`` is set (it is not set while saving)."""
    name = f"fvis_evil_{uuid.uuid4().hex[:10]}"
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    (code_dir / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(code_dir))
    monkeypatch.delenv("FVIS_EVIL_MARKER", raising=False)
    module = __import__(name)
    net = module.EvilNet()
    zip_path, legacy_path = tmp_path / "net.pt", tmp_path / "net_legacy.pt"
    torch.save(net, zip_path)
    torch.save(net, legacy_path, _use_new_zipfile_serialization=False)
    del sys.modules[name]
    marker = tmp_path / "MARKER"
    monkeypatch.setenv("FVIS_EVIL_MARKER", str(marker))
    yield UserModule(name, zip_path, legacy_path, marker)
    sys.modules.pop(name, None)


def test_pickled_user_module_lists_without_import(user_module: UserModule) -> None:
    tree = inspect_model(user_module.zip_path)
    assert tree.names() == ["fc", "act"]
    assert tree.layers[0].class_name == f"{user_module.name}.EvilNet"
    assert tree.layers[0].params == 3 * 2 + 2
    assert user_module.name not in sys.modules
    assert user_module.markers() == []


def test_pickled_user_module_refused_without_allowlist(user_module: UserModule) -> None:
    with pytest.raises(RefusedError) as info:
        load_model(user_module.zip_path)
    assert f"{user_module.name}.EvilNet" in info.value.message
    # A user class (not a dangerous global): the ways forward may be offered.
    assert f"--allow-module {user_module.name}" in (info.value.hint or "")
    assert user_module.name not in sys.modules
    assert user_module.markers() == []


def test_pickled_user_module_with_arch_reads_weights_as_data(
    user_module: UserModule, tmp_path: Path
) -> None:
    """--arch takes the tensors only: the user's class is neither imported nor unpickled."""
    arch = tmp_path / "plain_arch.py"
    arch.write_text(
        "from torch import nn\n\n\n"
        "class Plain(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(3, 2)\n"
        "        self.act = nn.ReLU()\n"
    )
    loaded = load_model(user_module.zip_path, LoadOptions(arch=f"{arch}:Plain"))
    assert type(loaded.module).__name__ == "Plain"
    assert "read the pickled module's weights as data" in loaded.source.notes
    assert user_module.name not in sys.modules
    assert user_module.markers() == []


def test_allowlisted_user_module_runs_its_code(user_module: UserModule) -> None:
    """Control: --allow-module is the user's decision, and then their code does run."""
    loaded = load_model(user_module.zip_path, LoadOptions(allow_modules=(user_module.name,)))
    assert type(loaded.module).__name__ == "EvilNet"
    assert user_module.markers() == ["MARKER.import", "MARKER.setstate"]


def test_legacy_pickled_user_module_never_runs(user_module: UserModule) -> None:
    for call in (inspect_model, load_model):
        try:
            call(user_module.legacy_path)
        except FvisError as exc:
            assert exc.exit_status in (ExitStatus.BAD_FILE, ExitStatus.REFUSED)
    assert user_module.name not in sys.modules
    assert user_module.markers() == []


def test_legacy_pickled_user_module_is_listed(user_module: UserModule) -> None:
    tree = inspect_model(user_module.legacy_path)
    assert tree.names() == ["fc", "act"]


MIXED_MODULE = textwrap.dedent(
    """
    import os

    from torch import nn


    class Payload:
        def __init__(self, command):
            self.command = command

        def __reduce__(self):
            return (os.system, (self.command,))


    class MixedNet(nn.Module):
        def __init__(self, command):
            super().__init__()
            self.fc = nn.Linear(3, 2)
            self.extra = Payload(command)
    """
)


@pytest.fixture
def mixed_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Evil:
    """A pickled module of a user class that also carries an ``os.system`` payload."""
    name = f"fvis_mixed_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{name}.py").write_text(MIXED_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    marker = tmp_path / "MARKER"
    path = tmp_path / "mixed.pt"
    torch.save(__import__(name).MixedNet(f"touch {shlex.quote(str(marker))}"), path)
    del sys.modules[name]
    return Evil(path, marker, "system")


def test_mixed_module_is_refused_as_malicious(mixed_module: Evil) -> None:
    for call in (inspect_model, load_model):
        with pytest.raises(MaliciousFileError) as info:
            call(mixed_module.path)
        assert "posix.system (would run a shell command)" in info.value.message
    assert not mixed_module.marker.exists()


def test_mixed_module_refusal_never_suggests_trust(mixed_module: Evil) -> None:
    with pytest.raises(RefusedError) as info:
        load_model(mixed_module.path)
    assert "--trust" not in (info.value.hint or "")


# --------------------------------------------------------------------------- torch.export


def test_export_program_with_pickled_payload_is_refused(
    zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A .pt2 whose weights config says ``use_pickle`` would unpickle on load: refused."""
    source = zoo / "inner_outer.pt2"
    path = tmp_path / "pickled.pt2"
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(path, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("data/weights/model_weights_config.json"):
                config = json.loads(data)
                for entry in config["config"].values():
                    entry["use_pickle"] = True
                data = json.dumps(config).encode()
            dst.writestr(item, data)

    def forbidden(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("torch.export.load must not be called on a refused file")

    monkeypatch.setattr(torch.export, "load", forbidden)
    with pytest.raises(RefusedError) as info:
        load_model(path)
    assert info.value.exit_status == 4
    assert "pickled" in info.value.message
    assert "--trust" in (info.value.hint or "")  # a program that does need it: offered


# --------------------------------------------------------------------------- weights_only spy

SPY_CASES = [
    ("nested_cnn.state_dict.pt", LoadOptions(arch="sample_models.zoo:Classifier")),
    ("nested_cnn.training.pt", LoadOptions(arch="sample_models.zoo:Classifier")),
    ("nested_cnn.module.pt", LoadOptions(allow_modules=("sample_models.zoo",))),
    ("nested_cnn.pt2", LoadOptions()),
    ("legacy", LoadOptions(arch="fvis.sample:OuterModel")),
]


@pytest.mark.parametrize("force_env", [False, True], ids=["default-env", "force-no-wo-env"])
def test_every_torch_load_passes_weights_only_true(
    zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, force_env: bool
) -> None:
    from fvis.sample import build_sample

    legacy = tmp_path / "legacy.pt"
    torch.save(build_sample().state_dict(), legacy, _use_new_zipfile_serialization=False)
    if force_env:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    calls: list[dict[str, Any]] = []
    real_load = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    for name, options in SPY_CASES:
        path = legacy if name == "legacy" else zoo / name
        before = len(calls)
        load_model(path, options)
        assert len(calls) > before, f"{name}: expected a torch.load call"
    assert calls
    assert all(call.get("weights_only") is True for call in calls), calls
