"""The sample zoo: every sample builds, runs, is deterministic, and shows its case."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from fvis.sample import SAMPLE_INPUT_SHAPE, OuterModel, build_sample
from sample_models.build import build_all, main
from sample_models.zoo import SAMPLES, build, example_input

EXPECTED_OUTPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "inner_outer": (1, 2),
    "nested_cnn": (1, 3),
    "detach_inner": (1, 2),
    "frozen_nograd": (1, 2),
    "dead_branch": (1, 2),
    "never_runs": (1, 2),
    "chunk_unused": (1, 2),
    "shared_mixed": (1, 2),
    "stores_inplace": (1, 2),
}
FORMATS = (
    "state_dict.pt",
    "training.pt",
    "module.pt",
    "torchscript.pt",
    "pt2",
    "safetensors",
    "input.pt",
)


def _outputs(result: Tensor | dict[str, Tensor]) -> dict[str, Tensor]:
    """A model's output as a name -> tensor dict (plain tensors become ``{"out": t}``)."""
    return dict(result) if isinstance(result, dict) else {"out": result}


def _run(model: nn.Module, name: str) -> dict[str, Tensor]:
    return _outputs(model(example_input(name)))


def _assert_same(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def _pair(output: object) -> tuple[Tensor, Tensor]:
    """A module output that must be a 2-tuple of tensors."""
    assert isinstance(output, tuple) and len(output) == 2
    first, second = output
    assert isinstance(first, Tensor) and isinstance(second, Tensor)
    return first, second


@contextmanager
def _record_calls(module: nn.Module) -> Iterator[list[tuple[tuple[object, ...], object]]]:
    """Record (inputs, output) of every call of ``module``; the hook is always removed."""
    calls: list[tuple[tuple[object, ...], object]] = []
    handle = module.register_forward_hook(lambda _m, args, out: calls.append((args, out)))
    try:
        yield calls
    finally:
        handle.remove()


# --- every sample -----------------------------------------------------------------------------


def test_registry_covers_every_case() -> None:
    assert set(SAMPLES) == {*EXPECTED_OUTPUT_SHAPES, "tiny_transformer"}
    for name, spec in SAMPLES.items():
        assert spec.name == name
        assert spec.about and "\n" not in spec.about


@pytest.mark.parametrize("name", list(SAMPLES))
def test_sample_builds_runs_and_names_its_layer(name: str) -> None:
    spec = SAMPLES[name]
    model = build(name)
    assert not model.training
    assert example_input(name).shape == spec.input_shape
    assert spec.layer in dict(model.named_modules())
    outputs = _run(model, name)
    for tensor in outputs.values():
        assert torch.isfinite(tensor).all()
    if name in EXPECTED_OUTPUT_SHAPES:
        assert outputs["out"].shape == EXPECTED_OUTPUT_SHAPES[name]


@pytest.mark.parametrize("name", list(SAMPLES))
def test_sample_is_deterministic_and_leaves_global_rng_alone(name: str) -> None:
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    first, second = _run(build(name), name), _run(build(name), name)
    assert torch.equal(torch.get_rng_state(), before)
    _assert_same(first, second)
    assert not torch.equal(example_input(name, seed=0), example_input(name, seed=1))


def test_unknown_sample_lists_the_choices() -> None:
    with pytest.raises(ValueError, match=r"no sample 'nope'; choose from: inner_outer, "):
        build("nope")


def test_fvis_sample_is_the_inner_outer_sample() -> None:
    model = build("inner_outer")
    assert type(model) is OuterModel
    assert SAMPLES["inner_outer"].input_shape == SAMPLE_INPUT_SHAPE
    assert isinstance(model.get_submodule("inner.relu"), nn.ReLU)
    _assert_same(_run(model, "inner_outer"), _run(build_sample(0), "inner_outer"))
    assert not torch.equal(build_sample(0).linear_out.weight, build_sample(1).linear_out.weight)


def test_every_sample_scripts() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in SAMPLES:
            scripted = torch.jit.script(build(name))
            _assert_same(_run(scripted, name), _run(build(name), name))


# --- the case each sample shows ---------------------------------------------------------------


def test_nested_cnn_inplace_relu_rewrites_bn_output_and_block_relu_fires_twice() -> None:
    model = build("nested_cnn")
    backbone_bn = model.get_submodule("backbone.bn1")
    block_relu = model.get_submodule("backbone.layer1.0.relu")
    versions: list[int] = []
    negatives: list[int] = []

    def snapshot(_m: nn.Module, _args: tuple[object, ...], out: Tensor) -> None:
        versions.append(out._version)
        negatives.append(int((out < 0).sum()))

    with _record_calls(backbone_bn) as bn_calls, _record_calls(block_relu) as relu_calls:
        handle = backbone_bn.register_forward_hook(snapshot)
        try:
            _run(model, "nested_cnn")
        finally:
            handle.remove()
    assert len(relu_calls) == 2  # one nn.ReLU module, called twice per forward
    bn_out = bn_calls[0][1]
    assert isinstance(bn_out, Tensor)
    assert versions == [0] and negatives[0] > 0  # at hook time: the real BN output
    assert bn_out._version > 0 and not (bn_out < 0).any()  # afterwards: rewritten by ReLU_
    assert isinstance(model.get_submodule("backbone.layer1"), nn.Sequential)


def test_detach_inner_cuts_the_graph_inside_inner() -> None:
    model = build("detach_inner")
    with (
        _record_calls(model.get_submodule("inner")) as inner_calls,
        _record_calls(model.get_submodule("inner.relu")) as relu_calls,
    ):
        out = _run(model, "detach_inner")["out"]
    inner_out, relu_out = inner_calls[0][1], relu_calls[0][1]
    assert isinstance(inner_out, Tensor) and isinstance(relu_out, Tensor)
    assert inner_out.grad_fn is None and not inner_out.requires_grad
    assert relu_out.grad_fn is not None  # alive inside, cut on the way out
    assert out.requires_grad  # the head still trains


def test_frozen_nograd_output_does_not_depend_on_backbone_grad() -> None:
    model = build("frozen_nograd")
    backbone_params = list(model.get_submodule("backbone").parameters())
    assert backbone_params and not any(p.requires_grad for p in backbone_params)
    model.get_submodule("backbone").requires_grad_(True)  # even unfrozen, no_grad cuts it
    with _record_calls(model.get_submodule("backbone.relu")) as calls:
        out = _run(model, "frozen_nograd")["out"]
    feats = calls[0][1]
    assert isinstance(feats, Tensor) and not feats.requires_grad
    grads = torch.autograd.grad(out.sum(), backbone_params, allow_unused=True)
    assert all(g is None for g in grads)


def test_dead_branch_output_is_not_connected() -> None:
    model = build("dead_branch")
    with _record_calls(model.get_submodule("aux")) as calls:
        out = _run(model, "dead_branch")["out"]
    aux_out = calls[0][1]
    assert isinstance(aux_out, Tensor) and aux_out.requires_grad
    (grad,) = torch.autograd.grad(out.sum(), [aux_out], allow_unused=True)
    assert grad is None


def test_never_runs_hooks_never_fire() -> None:
    model = build("never_runs")
    with (
        _record_calls(model.get_submodule("skipped")) as skipped,
        _record_calls(model.get_submodule("direct")) as direct,
        _record_calls(model.get_submodule("trunk")) as trunk,
    ):
        out = _run(model, "never_runs")["out"]
    assert (len(skipped), len(direct), len(trunk)) == (0, 0, 1)
    assert out.shape == (1, 2)  # direct did run: it produced the output


def test_chunk_unused_splitter_returns_tuple_with_one_unused_element() -> None:
    model = build("chunk_unused")
    with _record_calls(model.get_submodule("splitter")) as calls:
        out = _run(model, "chunk_unused")["out"]
    left, right = _pair(calls[0][1])
    edges = [torch.autograd.graph.get_gradient_edge(t) for t in (left, right)]
    assert edges[0].node is edges[1].node  # one SplitBackward node ...
    assert edges[0].output_nr != edges[1].output_nr  # ... told apart by output_nr
    grad_left, grad_right = torch.autograd.grad(out.sum(), [left, right], allow_unused=True)
    assert grad_left is not None and grad_right is None


def test_shared_mixed_two_calls_two_grad_verdicts() -> None:
    model = build("shared_mixed")
    modes: list[bool] = []
    shared = model.get_submodule("shared")
    handle = shared.register_forward_hook(lambda *_: modes.append(torch.is_grad_enabled()))
    try:
        with _record_calls(shared) as calls:
            _run(model, "shared_mixed")
    finally:
        handle.remove()
    outs = [out for _args, out in calls]
    assert [isinstance(o, Tensor) and o.requires_grad for o in outs] == [True, False]
    assert modes == [True, False]


def test_stores_inplace_stored_tensor_is_the_inner_output_edited_in_place() -> None:
    model = build("stores_inplace")
    versions: list[int] = []
    inner = model.get_submodule("inner")
    handle = inner.register_forward_hook(lambda _m, _a, out: versions.append(out._version))
    try:
        with _record_calls(inner) as calls:
            out = _run(model, "stores_inplace")["out"]
    finally:
        handle.remove()
    inner_out = calls[0][1]
    assert model.intermediate_output is inner_out
    assert isinstance(inner_out, Tensor) and inner_out._version > versions[0]
    out.sum().backward()  # GELU saves its input, so the in-place edit keeps backward valid


def test_tiny_transformer_attention_tuple_and_dict_output() -> None:
    model = build("tiny_transformer")
    with _record_calls(model.get_submodule("encoder.layers.0.attn")) as calls:
        outputs = _run(model, "tiny_transformer")
    assert outputs.keys() == {"logits", "hidden"}
    assert outputs["logits"].shape == (1, 4) and outputs["hidden"].shape == (1, 6, 16)
    attended, weights = _pair(calls[0][1])
    assert attended.shape == (1, 6, 16) and weights.shape == (1, 2, 6, 6)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 2, 6))
    assert isinstance(model.get_submodule("encoder.layers"), nn.ModuleList)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())


# --- build script -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], list[str]]:
    out_dir = tmp_path_factory.mktemp("zoo")
    lines: list[str] = []
    paths = build_all(out_dir, ["inner_outer", "nested_cnn"], echo=lines.append)
    return out_dir, paths, lines


def test_build_all_writes_every_format_atomically(
    built: tuple[Path, list[Path], list[str]],
) -> None:
    out_dir, paths, lines = built
    expected = {f"{name}.{fmt}" for name in ("inner_outer", "nested_cnn") for fmt in FORMATS}
    assert {p.name for p in paths} == expected
    assert {p.name for p in out_dir.iterdir()} == expected  # no temporary files left behind
    assert [line for line in lines if line.startswith("wrote ")] == [
        f"wrote {p} ({p.stat().st_size:,} bytes)" for p in paths
    ]


@pytest.mark.parametrize("name", ["inner_outer", "nested_cnn"])
def test_built_files_reload_to_identical_outputs(
    built: tuple[Path, list[Path], list[str]], name: str
) -> None:
    out_dir = built[0]
    x = torch.load(out_dir / f"{name}.input.pt", weights_only=True)
    assert torch.equal(x, example_input(name))
    expected = build(name)(x)

    state = torch.load(out_dir / f"{name}.state_dict.pt", weights_only=True)
    training = torch.load(out_dir / f"{name}.training.pt", weights_only=True)
    assert training["epoch"] == 3 and training["optimizer"] == {"lr": 0.1}
    assert training["model"].keys() == {f"module.{k}" for k in state}
    from safetensors.torch import load_file

    safetensors_state = load_file(out_dir / f"{name}.safetensors")
    for weights in (state, safetensors_state):
        fresh = _fresh_model(name)
        fresh.load_state_dict(weights)
        torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)

    # Our own files, written a moment ago: trusted, so the code-running loaders are fine here.
    module = torch.load(out_dir / f"{name}.module.pt", weights_only=False)
    assert type(module).__module__ in {"fvis.sample", "sample_models.zoo"}
    torch.testing.assert_close(module(x), expected, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.load(out_dir / f"{name}.torchscript.pt")
    torch.testing.assert_close(scripted(x), expected, rtol=0, atol=0)
    program = torch.export.load(out_dir / f"{name}.pt2")
    torch.testing.assert_close(program.module()(x), expected, rtol=0, atol=0)


def _fresh_model(name: str) -> nn.Module:
    """A sample with different weights from the built one, so a no-op load would show."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(99)
        model = type(build(name))()
    return model.eval()


def test_build_cli_rejects_unknown_names_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "out"), "--only", "nope"])
    assert exit_info.value.code == 2
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="no sample 'nope'"):
        build_all(tmp_path / "out2", ["nope"])
    assert not (tmp_path / "out2").exists()


def test_build_cli_only_prints_one_line_per_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(tmp_path), "--only", "dead_branch"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(FORMATS) and all(line.startswith("wrote ") for line in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"dead_branch.{fmt}" for fmt in FORMATS
    )
