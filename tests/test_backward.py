"""fvis.backward: one real backward pass agrees with the grad verdicts; parameter flow;
--target; Grad-CAM math; the CLI writes Grad-CAM pictures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fvis.api import DumpOptions, ModelRef, dump
from fvis.backward import gradcam, run_backward
from fvis.capture import Mode, capture
from fvis.grads import diagnose
from fvis.inputs import InputOptions
from sample_models.zoo import SAMPLES, build, example_input


def _all_layers(model: nn.Module) -> list[str]:
    # ModuleList containers are never called: leave them out.
    return [n for n, m in model.named_modules() if n and not isinstance(m, nn.ModuleList)]


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_backward_confirms_every_verdict(name: str) -> None:
    model = build(name)
    result = capture(model, [example_input(name)], _all_layers(model))
    verdicts = diagnose(result)
    flow = run_backward(model, result)
    assert flow.error is None and flow.target == "sum of the output"
    assert set(flow.captures) == {c.label for c in result.captures}
    for c in result.captures:
        got = flow.captures[c.label]
        assert got.reached == verdicts[c.label].connected, c.label
        assert (got.norm is not None) == got.reached
        if got.reached:
            assert c.label in flow.grads
            expected_shape = c.values.shape if c.values is not None else None
            assert flow.grads[c.label].shape == expected_shape


def test_param_flow_detach_inner_starves_inner_linear() -> None:
    model = build("detach_inner")
    result = capture(model, [example_input("detach_inner")], ["inner.linear", "head"])
    params = {p.layer: p for p in run_backward(model, result).params}
    assert params["inner.linear"].trainable == 2 and params["inner.linear"].received == 0
    assert params["inner.linear"].starved
    assert params["head"].received == 2 and not params["head"].starved


def test_param_flow_frozen_layer_is_not_starved() -> None:
    model = build("frozen_nograd")
    result = capture(model, [example_input("frozen_nograd")], ["backbone.linear", "head"])
    params = {p.layer: p for p in run_backward(model, result).params}
    assert params["backbone.linear"].trainable == 0 and not params["backbone.linear"].starved
    assert not params["head"].starved


def test_backward_leaves_parameter_grads_untouched() -> None:
    model = build("inner_outer")
    run_backward(model, capture(model, [example_input("inner_outer")], ["inner.relu"]))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("target", [0, 1, -1])
def test_target_picks_one_logit(target: int) -> None:
    model = build("inner_outer")
    x = example_input("inner_outer")
    flow = run_backward(model, capture(model, [x], ["inner.relu"]), target=target)
    assert flow.error is None and flow.target == f"output[..., {target}]"
    # The same gradient by hand.
    hidden = model.inner(x)
    hidden.retain_grad()
    model.linear_out(hidden)[..., target].sum().backward()
    assert hidden.grad is not None
    manual = float(hidden.grad.norm())
    assert flow.captures["inner.relu"].norm == pytest.approx(manual, rel=1e-5)
    np.testing.assert_allclose(flow.grads["inner.relu"], hidden.grad[0].numpy(), rtol=1e-5)


def test_target_changes_the_gradient() -> None:
    model = build("inner_outer")
    x = example_input("inner_outer")
    norms = [
        run_backward(model, capture(model, [x], ["inner.relu"]), target=t)
        .captures["inner.relu"]
        .norm
        for t in (0, 1)
    ]
    assert norms[0] != pytest.approx(norms[1])


def test_target_out_of_range_is_an_error_verdict() -> None:
    model = build("inner_outer")
    flow = run_backward(model, capture(model, [example_input("inner_outer")], ["inner.relu"]), 5)
    assert flow.error is not None and "--target 5" in flow.error
    assert flow.captures == {}


@pytest.mark.parametrize("mode", [Mode.NO_GRAD, Mode.INFERENCE])
def test_no_grad_forward_gives_an_error_verdict_not_an_exception(mode: Mode) -> None:
    model = build("inner_outer")
    result = capture(model, [example_input("inner_outer")], ["inner.relu"], mode=mode)
    flow = run_backward(model, result)
    assert flow.error is not None and flow.error.startswith("backward impossible")
    assert flow.captures == {} and flow.grads == {}
    assert [(p.layer, p.received) for p in flow.params] == [("inner.relu", 0)]


def test_dump_backward_in_no_grad_mode_reports_error() -> None:
    result = dump(
        ModelRef(None),
        InputOptions(shape=(1, 10)),
        DumpOptions(layers=("inner.relu",), mode="no-grad", backward=True),
        None,
    )
    backward = result.report["backward"]
    assert backward["error"].startswith("backward impossible")
    assert "--mode no-grad" in backward["error"]


# --------------------------------------------------------------------------- gradcam


def test_gradcam_weights_channels_by_mean_gradient() -> None:
    activation = np.zeros((2, 2, 2), np.float32)
    activation[0] = [[1, 0], [0, 0]]
    activation[1] = [[0, 0], [0, 2]]
    gradient = np.stack([np.full((2, 2), 0.5), np.full((2, 2), 0.25)]).astype(np.float32)
    cam = gradcam(activation, gradient)
    assert cam is not None and cam.dtype == np.float32
    # 0.5 * A0 + 0.25 * A1 = [[0.5, 0], [0, 0.5]], scaled by its peak
    np.testing.assert_allclose(cam, [[1.0, 0.0], [0.0, 1.0]])


def test_gradcam_relu_removes_negative_evidence() -> None:
    activation = np.zeros((2, 2, 2), np.float32)
    activation[0] = [[1, 0], [0, 0]]
    activation[1] = [[0, 0], [0, 2]]
    gradient = np.stack([np.ones((2, 2)), -np.ones((2, 2))]).astype(np.float32)
    cam = gradcam(activation, gradient)
    # 1 * A0 - 1 * A1 = [[1, 0], [0, -2]] -> ReLU -> [[1, 0], [0, 0]]
    np.testing.assert_allclose(cam, [[1.0, 0.0], [0.0, 0.0]])


def test_gradcam_mean_over_positions() -> None:
    activation = np.ones((1, 2, 2), np.float32)
    gradient = np.array([[[4.0, 0.0], [0.0, 0.0]]], np.float32)  # mean 1
    np.testing.assert_allclose(gradcam(activation, gradient), np.ones((2, 2)))


def test_gradcam_degenerate_inputs() -> None:
    activation = np.ones((2, 3, 3), np.float32)
    assert np.all(gradcam(activation, -np.ones_like(activation)) == 0)  # all evidence negative
    assert gradcam(np.ones((4, 4), np.float32), np.ones((4, 4), np.float32)) is None
    assert gradcam(activation, np.ones((2, 3, 4), np.float32)) is None


# --------------------------------------------------------------------------- CLI


def test_cli_gradcam_writes_overlays(cli: Any, tmp_path: Path) -> None:
    weights = tmp_path / "nested_cnn.pt"
    torch.save(build("nested_cnn").state_dict(), weights)
    out = tmp_path / "out"
    code, stdout, stderr = cli(
        "dump",
        weights,
        "--arch",
        "sample_models.zoo:Classifier",
        "--layer",
        "backbone.layer1",
        "--layer",
        "head.2",
        "--shape",
        "1,3,16,16",
        "--gradcam",
        "--out",
        out,
    )
    assert code == 0, stderr
    cams = sorted(p.name for p in out.glob("gradcam_*.png"))
    assert cams == ["gradcam_backbone.layer1.png"]  # head.2 is (N, 3): no Grad-CAM
    with Image.open(out / cams[0]) as image:
        assert image.mode == "RGB" and image.width >= 8 and image.height > 8
    report = json.loads((out / "report.json").read_text())
    assert report["backward"]["error"] is None
    layer1 = next(c for c in report["captures"] if c["label"] == "backbone.layer1")
    assert layer1["gradient"]["reached"] is True and layer1["gradient"]["norm"] > 0
    assert any(i["file"] == cams[0] and i["layout"] == "gradcam" for i in layer1["images"])
    assert "backward from the sum of the output" in stdout


def test_cli_backward_reports_starved_parameters(cli: Any, tmp_path: Path) -> None:
    weights = tmp_path / "detach.pt"
    torch.save(build("detach_inner").state_dict(), weights)
    code, stdout, stderr = cli(
        "dump",
        weights,
        "--arch",
        "sample_models.zoo:DetachOuter",
        "--layer",
        "inner.linear",
        "--backward",
        "--no-images",
        "--out",
        tmp_path / "out",
    )
    assert code == 0, stderr
    assert "no gradient reached the trainable parameters of: inner.linear" in stdout
    words = " ".join(w for w in stdout.split() if w not in ("│", "┃"))  # table cells wrap
    assert "no gradient reached it" in words
