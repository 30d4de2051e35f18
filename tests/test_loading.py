"""fvis.loading: every zoo sample in every format, listed without running and loaded safely."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import fvis.loading as loading
from fvis.errors import BadFileError, ExitStatus, FvisError, ModelInputError, UsageError
from fvis.loading import LoadOptions, inspect_model, load_model
from fvis.sample import build_sample
from sample_models.zoo import SAMPLES, build, example_input

NAMES = tuple(SAMPLES)
MODEL_FORMATS = ("module.pt", "torchscript.pt", "pt2")
STATE_FORMATS = ("state_dict.pt", "training.pt", "safetensors")
ALLOW = ("sample_models.zoo", "fvis.sample")  # inner_outer's classes live in fvis.sample
ARCH_FORMATS = ("state_dict.pt", "training.pt", "safetensors", "torchscript.pt", "module.pt")

# Known bugs, keyed by (sample, format): see the xfail reasons. None open at present.
INSPECT_XFAILS: dict[tuple[str, str], Any] = {}


def arch_of(name: str) -> str:
    return f"sample_models.zoo:{type(build(name)).__name__}"


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def outputs(result: Tensor | dict[str, Tensor]) -> dict[str, Tensor]:
    return dict(result) if isinstance(result, dict) else {"": result}


def run(model: nn.Module, name: str) -> dict[str, Tensor]:
    with torch.no_grad():
        return outputs(model(example_input(name)))


def cases(formats: tuple[str, ...], xfails: dict[tuple[str, str], Any]) -> list[Any]:
    return [
        pytest.param(name, fmt, id=f"{name}-{fmt}", marks=[xfails[(name, fmt)]])
        if (name, fmt) in xfails
        else pytest.param(name, fmt, id=f"{name}-{fmt}")
        for name in NAMES
        for fmt in formats
    ]


# --------------------------------------------------------------------------- inspect_model


@pytest.mark.parametrize(("name", "fmt"), cases(MODEL_FORMATS, INSPECT_XFAILS))
def test_inspect_model_formats_show_the_tree(zoo: Path, name: str, fmt: str) -> None:
    tree = inspect_model(zoo / f"{name}.{fmt}")
    model = build(name)
    assert SAMPLES[name].layer in tree.names()
    assert tree.layers[0].params == n_params(model)
    expected = {n for n, _ in model.named_modules(remove_duplicate=False) if n}
    assert set(tree.names()) == expected
    if fmt != "pt2":  # a program only knows the classes of modules that ran during export
        classes = {info.name: info.short_class for info in tree.layers}
        wanted = SAMPLES[name].layer
        assert classes[wanted] == type(model.get_submodule(wanted)).__name__


def layer_rows(path: Path, with_class: bool = True) -> dict[str, tuple[Any, ...]]:
    return {
        info.name: (info.params, info.trainable, info.buffers, info.aliases)
        + ((info.short_class,) if with_class else ())
        for info in inspect_model(path).layers
    }


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        pytest.param(name, fmt, id=f"{name}-{fmt}", marks=[mark] if mark else [])
        for name in NAMES
        for fmt in ("torchscript.pt", "pt2")
        for mark in [INSPECT_XFAILS.get((name, fmt))]
    ],
)
def test_model_formats_agree_with_the_pickled_module(zoo: Path, name: str, fmt: str) -> None:
    """Per layer: params, trainable, buffers, aliases (and class, except for .pt2)."""
    with_class = fmt != "pt2"
    expected = layer_rows(zoo / f"{name}.module.pt", with_class)
    assert layer_rows(zoo / f"{name}.{fmt}", with_class) == expected


BUFFER_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)
            self.norm = nn.BatchNorm1d(2)
            self.register_buffer("scale", torch.ones(2))  # a float buffer with a plain name

        def forward(self, x):
            return self.norm(self.fc(x)) * self.scale
    """
)


@pytest.fixture
def scripted_with_buffer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """The same module as TorchScript and as a pickled module (scripting needs a source file)."""
    name = f"fvis_buffers_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(BUFFER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = __import__(name).Scaled().eval()
    script, pickled = tmp_path / "scaled.ts.pt", tmp_path / "scaled.module.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(model), script)
    torch.save(model, pickled)
    sys.modules.pop(name, None)
    return script, pickled


def test_torchscript_batchnorm_buffers_are_not_parameters(zoo: Path) -> None:
    layers = {info.name: info for info in inspect_model(zoo / "nested_cnn.torchscript.pt").layers}
    bn = layers["backbone.bn1"]
    assert (bn.params, bn.buffers) == (8 + 8, 8 + 8 + 1)


def test_torchscript_custom_float_buffer_is_a_buffer(
    scripted_with_buffer: tuple[Path, Path],
) -> None:
    script, pickled = scripted_with_buffer
    assert layer_rows(script) == layer_rows(pickled)


@pytest.mark.parametrize(("name", "fmt"), cases(STATE_FORMATS, {}))
def test_inspect_state_dicts_list_parameter_owners(zoo: Path, name: str, fmt: str) -> None:
    tree = inspect_model(zoo / f"{name}.{fmt}")
    model = build(name)
    owners = {key.rpartition(".")[0] for key in model.state_dict()}
    assert owners <= set(tree.names())
    assert tree.layers[0].params == n_params(model)
    assert "state dict only" in tree.source_note
    if fmt == "training.pt":
        assert "'model'" in tree.source_note and "'module.'" in tree.source_note


@pytest.mark.parametrize(("name", "fmt"), cases((*STATE_FORMATS, *MODEL_FORMATS), {}))
def test_inspect_with_arch_shows_the_python_tree(zoo: Path, name: str, fmt: str) -> None:
    tree = inspect_model(zoo / f"{name}.{fmt}", LoadOptions(arch=arch_of(name)))
    model = build(name)
    assert SAMPLES[name].layer in tree.names()
    root = tree.layers[0]
    assert root.params == n_params(model)
    assert root.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_inspect_frozen_counts_come_from_arch(zoo: Path) -> None:
    tree = inspect_model(
        zoo / "frozen_nograd.state_dict.pt", LoadOptions(arch=arch_of("frozen_nograd"))
    )
    by_name = {info.name: info for info in tree.layers}
    assert by_name["backbone"].frozen == by_name["backbone"].params == 10 * 8 + 8
    assert by_name["head"].trainable == 8 * 2 + 2 and by_name["head"].frozen == 0


# --------------------------------------------------------------------------- load_model


@pytest.mark.parametrize(("name", "fmt"), cases(ARCH_FORMATS, {}))
def test_load_with_arch_gives_identical_outputs(zoo: Path, name: str, fmt: str) -> None:
    loaded = load_model(zoo / f"{name}.{fmt}", LoadOptions(arch=arch_of(name)))
    # The built model is in eval mode; --arch builds a fresh (training-mode) module, see
    # test_loaded_module_is_in_eval_mode. Compare weights, not BatchNorm's batch statistics.
    loaded.module.eval()
    expected, got = run(build(name), name), run(loaded.module, name)
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert loaded.source.kind in ("torch-zip", "safetensors", "torchscript")
    assert len(loaded.source.sha256) == 64


def test_training_checkpoint_notes_say_what_was_unwrapped(zoo: Path) -> None:
    loaded = load_model(zoo / "nested_cnn.training.pt", LoadOptions(arch=arch_of("nested_cnn")))
    notes = " ".join(loaded.source.notes)
    assert "took the state dict under key 'model'" in notes
    assert "stripped prefix 'module.'" in notes


def test_listing_and_loading_find_the_same_nested_state_dict(tmp_path: Path) -> None:
    """A usual key without weights ('model' holding metadata) comes before the one with them:
    both the inert listing and the real load go on to 'ema' (the load used to stop)."""
    model = build_sample()
    path = tmp_path / "ema.pt"
    torch.save({"model": {"epoch": 1}, "ema": model.state_dict()}, path)
    options = LoadOptions(arch="fvis.sample:OuterModel")
    listed = inspect_model(path, options)
    loaded = load_model(path, options)
    assert "under key 'ema'" in listed.source_note
    assert any("under key 'ema'" in note for note in loaded.source.notes)
    assert torch.equal(run(loaded.module, "inner_outer")[""], run(model, "inner_outer")[""])


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_prefixed_plain_state_dict_is_stripped(tmp_path: Path, prefix: str) -> None:
    model = build_sample()
    path = tmp_path / "prefixed.pt"
    torch.save({prefix + k: v for k, v in model.state_dict().items()}, path)
    loaded = load_model(path, LoadOptions(arch="fvis.sample:OuterModel"))
    assert torch.equal(run(loaded.module, "inner_outer")[""], run(model, "inner_outer")[""])
    # "module." doubles as a nesting key ("took the state dict under key 'module'").
    assert any(f"'{prefix.split('.')[0]}" in note for note in loaded.source.notes)


@pytest.mark.parametrize("name", NAMES)
def test_export_program_loads_without_arch(zoo: Path, name: str) -> None:
    loaded = load_model(zoo / f"{name}.pt2")
    expected, got = run(build(name), name), run(loaded.module, name)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
    assert SAMPLES[name].layer in dict(loaded.module.named_modules())


@pytest.mark.parametrize("name", NAMES)
def test_pickled_module_loads_with_allowlist(zoo: Path, name: str) -> None:
    loaded = load_model(zoo / f"{name}.module.pt", LoadOptions(allow_modules=ALLOW))
    assert type(loaded.module) is type(build(name))
    expected, got = run(build(name), name), run(loaded.module, name)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


@pytest.mark.parametrize(
    ("fmt", "options"),
    [
        ("state_dict.pt", LoadOptions(arch="sample_models.zoo:Classifier")),
        ("pt2", LoadOptions()),
    ],
    ids=["state_dict-arch", "pt2"],
)
def test_loaded_module_is_in_eval_mode(zoo: Path, fmt: str, options: LoadOptions) -> None:
    loaded = load_model(zoo / f"nested_cnn.{fmt}", options)
    assert not loaded.module.training
    assert torch.equal(
        run(loaded.module, "nested_cnn")[""], run(build("nested_cnn"), "nested_cnn")[""]
    )


@pytest.mark.parametrize(
    ("fmt", "phrase"),
    [
        ("state_dict.pt", "--arch"),
        ("safetensors", "--arch"),
        ("torchscript.pt", "--arch"),
    ],
)
def test_weights_without_arch_is_a_usage_error(zoo: Path, fmt: str, phrase: str) -> None:
    with pytest.raises(UsageError) as info:
        load_model(zoo / f"inner_outer.{fmt}")
    assert phrase in (info.value.hint or "")


def test_safetensors_named_pt_loads(zoo: Path, tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    shutil.copy(zoo / "nested_cnn.safetensors", path)
    loaded = load_model(path, LoadOptions(arch=arch_of("nested_cnn"))).module.eval()
    assert torch.equal(run(loaded, "nested_cnn")[""], run(build("nested_cnn"), "nested_cnn")[""])


def test_torch_checkpoint_named_safetensors_loads(zoo: Path, tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    shutil.copy(zoo / "nested_cnn.state_dict.pt", path)
    loaded = load_model(path, LoadOptions(arch=arch_of("nested_cnn"))).module.eval()
    assert torch.equal(run(loaded, "nested_cnn")[""], run(build("nested_cnn"), "nested_cnn")[""])


def test_legacy_state_dict_loads(tmp_path: Path) -> None:
    model = build_sample()
    path = tmp_path / "legacy.pt"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
    assert inspect_model(path).layers[0].params == n_params(model)
    loaded = load_model(path, LoadOptions(arch="fvis.sample:OuterModel"))
    assert torch.equal(run(loaded.module, "inner_outer")[""], run(model, "inner_outer")[""])


# --------------------------------------------------------------------------- strict mismatches


@pytest.fixture
def mismatched(tmp_path: Path) -> Path:
    """OuterModel's state dict with one key missing, one unexpected and one wrong shape."""
    state = build_sample().state_dict()
    del state["inner.linear.bias"]
    state["extra.weight"] = torch.zeros(3)
    state["linear_out.weight"] = torch.zeros(7, 5)
    path = tmp_path / "mismatched.pt"
    torch.save(state, path)
    return path


@pytest.mark.parametrize("call", [inspect_model, load_model], ids=["inspect", "load"])
def test_strict_mismatch_is_one_error_with_counts(mismatched: Path, call: Any) -> None:
    with pytest.raises(ModelInputError) as info:
        call(mismatched, LoadOptions(arch="fvis.sample:OuterModel"))
    message = info.value.message
    assert info.value.exit_status == ExitStatus.MODEL_INPUT == 5
    assert str(mismatched) in message and "\n" not in message
    assert "1 missing" in message and "inner.linear.bias" in message
    assert "1 unexpected" in message and "extra.weight" in message
    assert "1 shape mismatch" in message and "[7, 5] vs [2, 5]" in message
    assert "--arch" in (info.value.hint or "")


def test_non_strict_still_reports_shape_mismatch(mismatched: Path) -> None:
    with pytest.raises(ModelInputError) as info:
        load_model(mismatched, LoadOptions(arch="fvis.sample:OuterModel", strict=False))
    assert "shape mismatch" in info.value.message
    assert "missing" not in info.value.message


def test_many_missing_keys_are_previewed(zoo: Path) -> None:
    with pytest.raises(ModelInputError) as info:
        load_model(zoo / "inner_outer.state_dict.pt", LoadOptions(arch=arch_of("nested_cnn")))
    message = info.value.message
    assert "missing keys" in message and "unexpected keys" in message
    assert "more)" in message  # long lists are cut, with a count of the rest
    assert len(message) < 600


# --------------------------------------------------------------------------- --arch


@pytest.mark.parametrize(
    ("spec", "exc", "phrase"),
    [
        ("nocolon", UsageError, "must look like"),
        (":Classifier", UsageError, "must look like"),
        ("sample_models.zoo:", UsageError, "must look like"),
        ("sample_models.zoo:NoSuchThing", UsageError, "no callable 'NoSuchThing'"),
        ("sample_models.zoo:SAMPLES", UsageError, "no callable 'SAMPLES'"),
        ("no_such_module_fvis_test:Net", UsageError, "cannot import"),
        ("/no/such/dir/model_def.py:build", UsageError, "no such file"),
        ("sample_models.zoo:build", UsageError, "missing 1 required"),
    ],
)
def test_arch_errors(zoo: Path, spec: str, exc: type[FvisError], phrase: str) -> None:
    with pytest.raises(exc) as info:
        load_model(zoo / "inner_outer.state_dict.pt", LoadOptions(arch=spec))
    assert phrase in info.value.message


def test_arch_returning_non_module_is_usage_error(zoo: Path, tmp_path: Path) -> None:
    arch = tmp_path / "not_a_model.py"
    arch.write_text("def build():\n    return 42\n")
    with pytest.raises(UsageError) as info:
        load_model(zoo / "inner_outer.state_dict.pt", LoadOptions(arch=f"{arch}:build"))
    assert "not an nn.Module" in info.value.message


def test_arch_from_a_file_path(zoo: Path, tmp_path: Path) -> None:
    arch = tmp_path / "my models" / "defs.py"
    arch.parent.mkdir()
    arch.write_text(
        textwrap.dedent(
            """
            from sample_models.zoo import Classifier


            def build(width=8):
                return Classifier(width=width)
            """
        )
    )
    options = LoadOptions(arch=f"{arch}:build", arch_kwargs={"width": 8})
    loaded = load_model(zoo / "nested_cnn.state_dict.pt", options).module.eval()
    assert torch.equal(run(loaded, "nested_cnn")[""], run(build("nested_cnn"), "nested_cnn")[""])
    wrong = LoadOptions(arch=f"{arch}:build", arch_kwargs={"width": 4})
    with pytest.raises(ModelInputError):
        load_model(zoo / "nested_cnn.state_dict.pt", wrong)
    bogus = LoadOptions(arch=f"{arch}:build", arch_kwargs={"bogus": 1})
    with pytest.raises(UsageError) as info:
        load_model(zoo / "nested_cnn.state_dict.pt", bogus)
    assert "--arch-kwargs" in (info.value.hint or "")


@pytest.mark.parametrize("body", ["def build(:\n", "raise RuntimeError('boom')\n"])
def test_arch_file_that_fails_to_import_is_an_fvis_error(
    zoo: Path, tmp_path: Path, body: str
) -> None:
    arch = tmp_path / "broken_arch.py"
    arch.write_text(body)
    with pytest.raises(FvisError) as info:
        load_model(zoo / "inner_outer.state_dict.pt", LoadOptions(arch=f"{arch}:build"))
    assert str(arch) in info.value.message


# --------------------------------------------------------------------------- no data, meta device


@pytest.mark.parametrize("fmt", [*STATE_FORMATS, *MODEL_FORMATS])
def test_inspect_with_arch_builds_on_meta_and_reads_no_data(
    zoo: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[tuple[str, nn.Module]] = []
    real_build = loading.build_arch

    def spy_build(spec: str, kwargs: Any, device: str = "cpu") -> nn.Module:
        model = real_build(spec, kwargs, device=device)
        built.append((device, model))
        return model

    def no_data(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("inspect_model must not read tensor data")

    import safetensors.torch

    import fvis.arch
    import fvis.weights

    monkeypatch.setattr(fvis.arch, "build_arch", spy_build)
    monkeypatch.setattr(torch, "load", no_data)
    monkeypatch.setattr(torch.export, "load", no_data)
    monkeypatch.setattr(safetensors.torch, "load_file", no_data)
    monkeypatch.setattr(fvis.weights, "read_tensors", no_data)
    tree = inspect_model(zoo / f"nested_cnn.{fmt}", LoadOptions(arch=arch_of("nested_cnn")))
    assert tree.layers[0].params == n_params(build("nested_cnn"))
    [(device, model)] = built
    assert device == "meta"
    tensors = [*model.parameters(), *model.buffers()]
    assert tensors and all(t.is_meta for t in tensors)


RSS_PROBE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import torch

    from fvis.loading import LoadOptions, inspect_model


    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024


    path = Path(sys.argv[1])
    options = LoadOptions(arch="torch.nn:Linear", arch_kwargs=json.loads(sys.argv[2]))
    before = hwm()
    tree = inspect_model(path, options)
    after_inspect = hwm()
    torch.load(path, weights_only=True)  # control: a real load does grow by the file size
    after_load = hwm()
    print(json.dumps({"inspect": after_inspect - before, "load": after_load - after_inspect,
                      "params": tree.layers[0].params}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_inspect_big_checkpoint_does_not_read_tensor_data(tmp_path: Path) -> None:
    features = {"in_features": 2048, "out_features": 4096}  # 32 MiB of float32 weights
    path = tmp_path / "big.pt"
    torch.save({"weight": torch.ones(4096, 2048), "bias": torch.ones(4096)}, path)
    size = path.stat().st_size
    probe = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, str(path), json.dumps(features)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    grew = json.loads(probe.stdout.strip().splitlines()[-1])
    assert grew["params"] == 4096 * 2048 + 4096
    assert grew["load"] > size * 0.9, grew  # the measurement can see a real load
    assert grew["inspect"] < size * 0.25, grew


# --------------------------------------------------------------------------- odd contents


def test_lone_tensor_is_not_a_model(zoo: Path) -> None:
    with pytest.raises(BadFileError) as info:
        inspect_model(zoo / "inner_outer.input.pt")
    assert "not a model or state dict" in info.value.message


def test_lone_tensor_message_does_not_leak_stand_in_names(zoo: Path) -> None:
    with pytest.raises(BadFileError) as info:
        inspect_model(zoo / "inner_outer.input.pt")
    assert "FakeTensor" not in info.value.message


def test_dict_without_tensors(tmp_path: Path) -> None:
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(BadFileError) as info:
        inspect_model(path)
    assert "epoch" in info.value.message
