"""fvis.capture: the right captures for each sample, values taken at hook time, hooks always
removed and the model's mode always restored, outputs never altered."""

from __future__ import annotations

import dataclasses
from collections import namedtuple
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from fvis.capture import Capture, CaptureResult, Mode, capture, flatten_tensors
from fvis.errors import ModelInputError
from sample_models.zoo import SAMPLES, build, example_input

# --------------------------------------------------------------------------- helpers


def _labels(result: CaptureResult) -> list[str]:
    return [c.label for c in result.captures]


def _by_label(result: CaptureResult) -> dict[str, Capture]:
    return {c.label: c for c in result.captures}


def _no_hooks_left(model: nn.Module) -> bool:
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        for m in model.modules()
    )


def _independent(name: str, model: Any, x: Tensor) -> dict[str, Tensor]:
    """The sample's chosen layer output, recomputed by hand from its submodules."""
    if name in ("inner_outer", "detach_inner"):
        return {"inner.relu": model.inner.relu(model.inner.linear(x))}
    if name == "nested_cnn":
        b = model.backbone
        stem = torch.relu(b.bn1(b.conv1(x)))
        return {"backbone.layer1.0.conv1": b.layer1[0].conv1(stem)}
    if name == "frozen_nograd":
        return {"backbone.relu": model.backbone.relu(model.backbone.linear(x))}
    if name == "dead_branch":
        return {"aux": model.aux(model.relu(model.trunk(x)))}
    if name == "chunk_unused":
        a = model.proj(x).chunk(2, dim=-1)[0]
        left, right = model.act(model.mid(a)).chunk(2, dim=-1)
        return {"splitter[0]": left, "splitter[1]": right}
    if name == "shared_mixed":
        h = model.stem(x)
        out = model.shared.act(model.shared.linear(h))
        return {"shared#1": out, "shared#2": out}
    if name == "stores_inplace":
        # The value at hook time: before forward's ``mul_(2)``.
        return {"inner": model.inner.act(model.inner.linear(x))}
    if name == "tiny_transformer":
        layer = model.encoder.layers[0]
        out, weights = layer.attn(layer.norm1(model.embed(x)))
        return {"encoder.layers.0.attn[0]": out, "encoder.layers.0.attn[1]": weights}
    if name == "never_runs":
        return {}
    raise AssertionError(f"no independent computation for {name}")


# (labels, shapes) of capturing each sample's layer on its example input
EXPECTED: dict[str, list[tuple[str, tuple[int, ...]]]] = {
    "inner_outer": [("inner.relu", (1, 5))],
    "nested_cnn": [("backbone.layer1.0.conv1", (1, 8, 16, 16))],
    "detach_inner": [("inner.relu", (1, 8))],
    "frozen_nograd": [("backbone.relu", (1, 8))],
    "dead_branch": [("aux", (1, 4))],
    "never_runs": [],
    "chunk_unused": [("splitter[0]", (1, 4)), ("splitter[1]", (1, 4))],
    "shared_mixed": [("shared#1", (1, 8)), ("shared#2", (1, 8))],
    "stores_inplace": [("inner", (1, 8))],
    "tiny_transformer": [
        ("encoder.layers.0.attn[0]", (1, 6, 16)),
        ("encoder.layers.0.attn[1]", (1, 2, 6, 6)),
    ],
}


def test_expected_table_covers_every_sample() -> None:
    assert set(EXPECTED) == set(SAMPLES)


# --------------------------------------------------------------------------- every sample


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_sample_layer_captures_labels_shapes_and_values(name: str) -> None:
    model, x = build(name), example_input(name)
    result = capture(model, [x], [SAMPLES[name].layer])
    assert [(c.label, c.shape) for c in result.captures] == EXPECTED[name]
    with torch.no_grad():
        expected = _independent(name, model, x)
    for c in result.captures:
        assert c.dtype == "float32" and c.device == "cpu"
        assert c.values is not None
        want = expected[c.label][0].numpy()  # sample 0, batch dim removed
        np.testing.assert_allclose(c.values, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_hooks_never_alter_outputs(name: str) -> None:
    model, x = build(name), example_input(name)
    layers = [n for n, _ in model.named_modules()]
    with torch.no_grad():
        plain = dict(flatten_tensors(build(name)(x)))
    result = capture(model, [x], layers)
    hooked = dict(flatten_tensors(result.output))
    assert plain.keys() == hooked.keys()
    for key in plain:
        assert torch.equal(plain[key], hooked[key].detach()), key
    assert _no_hooks_left(model)


def test_never_ran_layers_are_reported() -> None:
    result = capture(build("never_runs"), [example_input("never_runs")], ["skipped", "direct"])
    assert result.captures == ()
    assert set(result.never_ran) == {"skipped", "direct"}


def test_unknown_layer_is_refused_before_running() -> None:
    model = build("inner_outer")
    with pytest.raises(ModelInputError, match=r"inner\.rleu"):
        capture(model, [example_input("inner_outer")], ["inner.rleu"])
    assert _no_hooks_left(model)


# --------------------------------------------------------------------------- nested_cnn


def test_in_place_relu_after_bn_keeps_values_at_capture() -> None:
    model, x = build("nested_cnn"), example_input("nested_cnn")
    result = capture(model, [x], ["backbone.bn1"])
    (bn1,) = result.captures
    with torch.no_grad():
        expected = model.backbone.bn1(model.backbone.conv1(x))[0].numpy()
    assert bn1.values is not None
    assert (bn1.values < 0).sum() > 0, "the picture must show BN's output, before the ReLU_"
    np.testing.assert_allclose(bn1.values, expected, rtol=1e-5, atol=1e-6)
    assert bn1.stats.min is not None and bn1.stats.min < 0
    assert bn1.grad.grad_fn == "NativeBatchNormBackward0"
    assert bn1.grad.grad_fn_after == "ReluBackward0"
    assert bn1.grad.version == 0 and bn1.grad.version_after == 1
    assert bn1.grad.modified_in_place


def test_shared_relu_called_twice_gives_two_numbered_captures() -> None:
    model, x = build("nested_cnn"), example_input("nested_cnn")
    result = capture(model, [x], ["backbone.layer1.0.relu"])
    assert _labels(result) == ["backbone.layer1.0.relu#1", "backbone.layer1.0.relu#2"]
    assert [c.call for c in result.captures] == [1, 2]
    assert all(c.calls_total == 2 for c in result.captures)
    block = model.backbone.layer1[0]
    with torch.no_grad():
        stem = torch.relu(model.backbone.bn1(model.backbone.conv1(x)))
        first = torch.relu(block.bn1(block.conv1(stem)))
        second = torch.relu(block.bn2(block.conv2(first)) + stem)
    one, two = result.captures
    np.testing.assert_allclose(one.values, first[0].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(two.values, second[0].numpy(), rtol=1e-5, atol=1e-6)


def test_trace_counts_every_call_of_every_module() -> None:
    result = capture(build("nested_cnn"), [example_input("nested_cnn")], [])
    calls: dict[str, int] = {}
    for record in result.trace:
        calls[record.name] = max(calls.get(record.name, 0), record.call)
    assert calls["backbone.layer1.0.relu"] == 2
    assert calls["backbone.conv1"] == 1 and calls[""] == 1
    assert result.trace[-1].name == ""  # the root returns last
    assert result.captures == ()


# --------------------------------------------------------------------------- output containers


def test_tiny_transformer_dict_output_paths() -> None:
    model, x = build("tiny_transformer"), example_input("tiny_transformer")
    result = capture(model, [x], [""])
    got = _by_label(result)
    assert set(got) == {"['logits']", "['hidden']"}
    assert got["['logits']"].shape == (1, 4) and got["['hidden']"].shape == (1, 6, 16)
    with torch.no_grad():
        out = build("tiny_transformer")(x)
    np.testing.assert_allclose(got["['logits']"].values, out["logits"][0].numpy(), rtol=1e-5)
    np.testing.assert_allclose(got["['hidden']"].values, out["hidden"][0].numpy(), rtol=1e-5)


def test_module_list_is_a_container_not_a_layer_that_never_ran() -> None:
    # A ModuleList has no forward: it can never be called, so "never ran" would be false.
    model, x = build("tiny_transformer"), example_input("tiny_transformer")
    result = capture(model, [x], ["encoder.layers", "encoder.layers.1"])
    assert result.never_ran == ()
    assert result.not_called["encoder.layers"].container
    assert _labels(result) == ["encoder.layers.1"]


@dataclasses.dataclass
class _Out:
    feat: Tensor
    extra: list[Tensor]
    note: str = "not a tensor"


_Pair = namedtuple("_Pair", ["first", "second"])


class _DataclassOut(nn.Module):
    def forward(self, x: Tensor) -> _Out:
        return _Out(x * 2, [x + 1, x - 1])


class _NamedTupleOut(nn.Module):
    def forward(self, x: Tensor) -> Any:
        return _Pair(x * 3, {"deep": (x * 4,)})


class _Containers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.dc = _DataclassOut()
        self.nt = _NamedTupleOut()

    def forward(self, x: Tensor) -> Tensor:
        h = self.linear(x)
        d = self.dc(h)
        n = self.nt(h)
        return d.feat + d.extra[0] + n.first + n.second["deep"][0]


def test_dataclass_and_namedtuple_outputs_are_flattened_with_paths() -> None:
    torch.manual_seed(0)
    model, x = _Containers(), torch.randn(2, 3)
    result = capture(model, [x], ["dc", "nt"])
    got = _by_label(result)
    assert list(got) == [
        "dc.feat",
        "dc.extra[0]",
        "dc.extra[1]",
        "nt.first",
        "nt.second['deep'][0]",
    ]
    with torch.no_grad():
        h = model.linear(x)
    factors = {"dc.feat": h * 2, "dc.extra[0]": h + 1, "dc.extra[1]": h - 1}
    factors |= {"nt.first": h * 3, "nt.second['deep'][0]": h * 4}
    for label, want in factors.items():
        assert got[label].shape == (2, 3)
        np.testing.assert_allclose(got[label].values, want[0].numpy(), rtol=1e-6)


def test_flatten_tensors_paths() -> None:
    t = torch.zeros(1)
    value = {"a": [t, (t, _Pair(t, None))], "b": _Out(t, []), "c": "text"}
    paths = [p for p, _ in flatten_tensors(value)]
    assert paths == ["['a'][0]", "['a'][1][0]", "['a'][1][1].first", "['b'].feat"]


# --------------------------------------------------------------------------- values and stats


class _NonFinite(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, x / 0.0], dim=-1)


class _Wrap(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Any:
        return self.inner(x)


def test_nan_and_inf_are_counted_apart_from_finite_stats() -> None:
    x = torch.tensor([[1.0, -1.0, 0.0, 2.0]])
    result = capture(_Wrap(_NonFinite()), [x], ["inner"])
    (c,) = result.captures
    s = c.stats
    assert (s.nan, s.posinf, s.neginf) == (1, 2, 1)
    assert s.nonfinite == 4 and s.numel == 8
    assert (s.min, s.max) == (-1.0, 2.0)
    assert s.mean == pytest.approx(0.5)
    assert s.zero_fraction == pytest.approx(1 / 8)
    assert c.values is not None
    assert np.isnan(c.values).sum() == 1 and np.isposinf(c.values).sum() == 2


def test_all_nan_activation_has_no_range() -> None:
    x = torch.zeros(1, 3)
    result = capture(_Wrap(_NonFinite()), [x], ["inner"])
    (c,) = result.captures
    assert c.stats.nan == 3 and c.stats.min == 0.0  # the finite half is all zeros
    only_nan = capture(_Wrap(nn.Identity()), [torch.full((1, 2), float("nan"))], ["inner"])
    s = only_nan.captures[0].stats
    assert s.nan == 2 and s.min is None and s.max is None and s.mean is None


class _ArgMax(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.argmax(dim=-1)


def test_integer_outputs_are_captured() -> None:
    x = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0]])
    result = capture(_Wrap(_ArgMax()), [x], ["inner"])
    (c,) = result.captures
    assert c.dtype == "int64" and c.shape == (2,)
    assert (c.stats.min, c.stats.max) == (0.0, 1.0)
    assert not c.grad.requires_grad and c.grad.grad_fn is None
    assert c.values is not None and c.values.tolist() == [1.0, 0.0]  # 1-D: no batch removed


def test_sample_picks_a_batch_element_and_none_keeps_all() -> None:
    model = build("inner_outer")
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.inner(x).numpy()
    second = capture(model, [x], ["inner.relu"], sample=1).captures[0]
    np.testing.assert_allclose(second.values, want[1], rtol=1e-6)
    too_far = capture(model, [x], ["inner.relu"], sample=9).captures[0]
    np.testing.assert_allclose(too_far.values, want[2], rtol=1e-6)
    everything = capture(model, [x], ["inner.relu"], sample=None).captures[0]
    np.testing.assert_allclose(everything.values, want, rtol=1e-6)
    assert everything.stats.numel == 15


def test_thousands_of_channels() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2048, 1), nn.ReLU())
    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    result = capture(model, [x], ["0", "1"])
    conv, relu = result.captures
    assert conv.shape == (1, 2048, 4, 4) and conv.stats.channels == 2048
    assert relu.stats.numel == 2048 * 16
    with torch.no_grad():
        want = model[0](x)[0].numpy()
    assert conv.values is not None and conv.values.shape == (2048, 4, 4)
    np.testing.assert_allclose(conv.values, want, rtol=1e-5, atol=1e-6)
    dead = int((want.reshape(2048, -1) <= 0).all(axis=1).sum())
    assert relu.stats.dead_channels == dead


def test_dead_channels_counted() -> None:
    conv = nn.Conv2d(1, 3, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, -1.0, 0.0]).view(3, 1, 1, 1))
        conv.bias.zero_()
    model = nn.Sequential(conv, nn.ReLU())
    x = torch.rand(2, 1, 3, 3) + 0.1  # positive: channel 1 dies at the ReLU, channel 2 is 0
    relu = capture(model, [x], ["1"]).captures[0]
    assert relu.stats.channels == 3 and relu.stats.dead_channels == 2


# --------------------------------------------------------------------------- hooks and mode


class _ModeSpy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append(self.training)
        return x


@pytest.mark.parametrize("train", [False, True])
def test_hooks_removed_and_mode_restored_after_success(train: bool) -> None:
    spy = _ModeSpy()
    model = nn.Sequential(nn.Linear(4, 4), spy)
    model.train(not train)  # the opposite of what capture will use
    before = [m.training for m in model.modules()]
    capture(model, [torch.randn(1, 4)], ["0", "1"], train=train)
    assert spy.seen == [train]
    assert [m.training for m in model.modules()] == before
    assert _no_hooks_left(model)


class _FrozenNormNet(nn.Module):
    """Keeps BatchNorm in eval when trained, as detection backbones do (``norm_eval``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.bn = nn.BatchNorm2d(2)

    def train(self, mode: bool = True) -> _FrozenNormNet:
        super().train(mode)
        self.bn.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


def test_a_train_override_runs_even_when_the_flags_already_match() -> None:
    model = _FrozenNormNet()  # freshly built: every flag says training, as --train wants
    assert all(m.training for m in model.modules())
    running = model.bn.running_mean.clone()
    out = capture(model, [torch.randn(4, 1, 3, 3) * 5 + 3], ["bn"], train=True).captures[0]
    assert torch.equal(model.bn.running_mean, running)  # the override kept BatchNorm in eval
    assert out.stats.mean != pytest.approx(0.0, abs=1e-3)  # running stats, not batch stats
    assert all(m.training for m in model.modules())  # and the flags are back as they were


class _FlipsAChild(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        self.inner.train()  # model code that flips a flag during forward
        return self.inner(x)


def test_flags_a_forward_flips_are_restored() -> None:
    model = _FlipsAChild().eval()
    capture(model, [torch.randn(1, 2)], ["inner"])
    assert not model.training and not model.inner.training


class _ParameterOut(nn.Module):
    """Returns a parameter itself and a slice of it (positional-embedding tables do)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(16, 8))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.table, self.table[: x.shape[-1]]


@pytest.mark.parametrize("mode", list(Mode))
def test_parameters_returned_by_a_layer_are_captured_in_every_mode(mode: Mode) -> None:
    """A tensor that requires grad but has no grad_fn (a parameter, in inference mode) has no
    gradient edge to follow there: captured, no crash; in grad mode both have an edge."""
    model = nn.Sequential(_ParameterOut())
    result = capture(model, [torch.zeros(1, 4)], ["0"], mode=mode, sample=None)
    whole, part = result.captures
    assert (whole.shape, part.shape) == ((16, 8), (4, 8))
    np.testing.assert_allclose(part.values, model[0].table[:4].detach().numpy())
    assert whole.grad.requires_grad and whole.grad.grad_fn is None
    has_edges = [("0", 1, p) in result.edges for p in ("[0]", "[1]")]
    assert has_edges == [mode is Mode.GRAD] * 2


def test_hooks_removed_and_mode_restored_after_forward_raises() -> None:
    model = nn.Sequential(nn.Linear(10, 8), nn.Linear(4, 2))  # second layer: wrong in_features
    model.train()
    with pytest.raises(ModelInputError) as info:
        capture(model, [torch.randn(1, 10)], ["0", "1"])
    assert "forward failed in '1'" in info.value.message
    assert "RuntimeError" in info.value.message
    assert info.value.hint is not None and "0" in info.value.hint
    assert isinstance(info.value.__cause__, RuntimeError)
    assert model.training and all(m.training for m in model.modules())
    assert _no_hooks_left(model)
    # The model still works afterwards, with no stale hooks: a fixed model captures cleanly.
    model[1] = nn.Linear(8, 2)
    assert _labels(capture(model, [torch.randn(1, 10)], ["1"])) == ["1"]


class _RaisesInOwnForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        self.first(x)
        raise ValueError("bad input in the model's own code")


def test_failure_in_the_root_forward_names_it() -> None:
    model = _RaisesInOwnForward()
    with pytest.raises(ModelInputError) as info:
        capture(model, [torch.randn(1, 3)], ["first"])
    assert "ValueError: bad input in the model's own code" in info.value.message
    assert info.value.hint is not None and "first" in info.value.hint
    assert _no_hooks_left(model)


def test_failure_before_any_layer_ran_says_so() -> None:
    model = nn.Sequential(nn.Linear(10, 2))
    with pytest.raises(ModelInputError) as info:
        capture(model, [torch.randn(1, 3)], ["0"])
    assert "in '0'" in info.value.message
    assert info.value.hint is not None and "no layer ran" in info.value.hint


class _Tolerant(nn.Module):
    """Tries a fast path that raises, catches the error and takes a fallback."""

    def __init__(self) -> None:
        super().__init__()
        self.fast = nn.Linear(3, 3)  # wrong in_features for (1, 10): raises
        self.safe = nn.Linear(10, 2)

    def forward(self, x: Tensor) -> Tensor:
        try:
            return self.fast(x)
        except RuntimeError:
            return self.safe(x)


def test_trace_names_stay_right_after_a_caught_submodule_error() -> None:
    result = capture(_Tolerant(), [torch.randn(1, 10)], ["safe"])
    assert [(r.name, r.class_name) for r in result.trace] == [
        ("safe", "Linear"),
        ("", "_Tolerant"),
    ]


def test_keyword_inputs_are_passed_by_name() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a_proj = nn.Linear(2, 2)

        def forward(self, a: Tensor, b: Tensor) -> Tensor:
            return self.a_proj(a) - b

    a, b = torch.ones(1, 2), torch.full((1, 2), 5.0)
    model = TwoInputs()
    result = capture(model, {"b": b, "a": a}, [""])
    with torch.no_grad():
        want = model(a, b)
    np.testing.assert_allclose(result.captures[0].values, want[0].numpy())


@pytest.mark.parametrize(
    ("mode", "grad_enabled", "inference", "requires_grad"),
    [
        (Mode.GRAD, True, False, True),
        (Mode.NO_GRAD, False, False, False),
        (Mode.INFERENCE, False, True, False),
    ],
)
def test_mode_sets_grad_facts(
    mode: Mode, grad_enabled: bool, inference: bool, requires_grad: bool
) -> None:
    model = build("inner_outer")
    result = capture(model, [example_input("inner_outer")], ["inner.relu"], mode=mode)
    (c,) = result.captures
    g = c.grad
    assert result.mode is mode
    assert g.grad_enabled is grad_enabled
    assert g.inference_mode is inference and g.is_inference is inference
    assert g.requires_grad is requires_grad
    assert (g.grad_fn == "ReluBackward0") is requires_grad
    assert (g.version is None) is inference
    assert not g.modified_in_place
    assert (("inner.relu", 1, "") in result.edges) is requires_grad
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def test_keep_values_false_drops_values_and_on_capture_runs_during_forward() -> None:
    model = build("inner_outer")
    events: list[tuple[str, Any]] = []

    def on_capture(c: Capture) -> None:
        events.append(("capture", (c.label, c.values is not None)))

    model.linear_out.register_forward_pre_hook(lambda *_: events.append(("linear_out", None)))
    result = capture(
        model,
        [example_input("inner_outer")],
        ["inner.linear", "inner.relu", "linear_out"],
        keep_values=False,
        on_capture=on_capture,
    )
    assert events == [
        ("capture", ("inner.linear", True)),
        ("capture", ("inner.relu", True)),
        ("linear_out", None),
        ("capture", ("linear_out", True)),
    ]
    assert all(c.values is None for c in result.captures)
    assert all(c.stats.numel > 0 for c in result.captures)


def test_keep_values_false_without_callback_copies_nothing() -> None:
    result = capture(
        build("inner_outer"), [example_input("inner_outer")], ["inner.relu"], keep_values=False
    )
    assert result.captures[0].values is None


def test_on_capture_called_once_per_capture_of_shared_module() -> None:
    seen: list[tuple[str, int, str]] = []

    def record(c: Capture) -> None:
        seen.append((c.layer, c.call, c.path))

    capture(build("shared_mixed"), [example_input("shared_mixed")], ["shared"], on_capture=record)
    assert seen == [("shared", 1, ""), ("shared", 2, "")]
