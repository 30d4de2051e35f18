"""fvis.grads: the right Cause and location for every way a capture can fall off the graph,
and the three examples users bring, end to end through the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from fvis.capture import Mode, capture
from fvis.grads import Cause, Verdict, diagnose, reachable_edges
from sample_models.zoo import build, example_input


def _verdicts(name: str, layers: list[str], mode: Mode = Mode.GRAD) -> dict[str, Verdict]:
    return diagnose(capture(build(name), [example_input(name)], layers, mode=mode))


def _diagnose(model: nn.Module, x: Tensor, layers: list[str]) -> dict[str, Verdict]:
    return diagnose(capture(model, [x], layers))


# --------------------------------------------------------------------------- the samples


def test_inner_outer_everything_connected() -> None:
    verdicts = _verdicts("inner_outer", ["inner.linear", "inner.relu", "inner", "linear_out"])
    for label, v in verdicts.items():
        assert v.connected and v.cause is Cause.CONNECTED, label
        assert v.summary == "connected to the output" and v.where is None
        assert v.in_place is None


def test_detach_inner_cut_downstream_by_inner() -> None:
    verdicts = _verdicts("detach_inner", ["inner.linear", "inner.relu", "inner", "head"])
    for label in ("inner.linear", "inner.relu"):
        v = verdicts[label]
        assert not v.connected
        assert v.cause is Cause.CUT_DOWNSTREAM and v.where == "inner"
        assert "DetachingInner.forward" in v.summary
        assert ".detach()" in v.hint
    inner = verdicts["inner"]
    assert inner.cause is Cause.CUT_INSIDE and inner.where == "inner"
    assert verdicts["head"].connected and verdicts["head"].cause is Cause.CONNECTED


def test_frozen_nograd_backbone_grad_off_in_outer_forward() -> None:
    verdicts = _verdicts("frozen_nograd", ["backbone.linear", "backbone.relu", "backbone", "head"])
    for label in ("backbone.linear", "backbone.relu", "backbone"):
        v = verdicts[label]
        assert not v.connected and v.cause is Cause.GRAD_OFF, label
        assert v.where == ""  # the root module holds the no_grad block
        assert "ran under no_grad inside FrozenTransfer.forward" in v.summary
        assert "requires_grad_(False)" in v.hint
    assert verdicts["head"].cause is Cause.CONNECTED


def test_dead_branch_aux_unused() -> None:
    verdicts = _verdicts("dead_branch", ["trunk", "aux.0", "aux.1", "aux", "head"])
    for label in ("aux.0", "aux.1", "aux"):
        assert verdicts[label].cause is Cause.UNUSED and not verdicts[label].connected
        assert verdicts[label].where is None
    assert verdicts["trunk"].connected and verdicts["head"].connected


def test_chunk_unused_split_by_output_nr() -> None:
    result = capture(build("chunk_unused"), [example_input("chunk_unused")], ["splitter", "proj"])
    verdicts = diagnose(result)
    assert verdicts["splitter[0]"].cause is Cause.CONNECTED
    assert verdicts["splitter[1]"].cause is Cause.UNUSED
    # Same grad node, different output_nr: connectivity is decided by the edge.
    (node0, nr0) = result.edges[("splitter", 1, "[0]")]
    (node1, nr1) = result.edges[("splitter", 1, "[1]")]
    assert node0 is node1 and (nr0, nr1) == (0, 1)
    by_label = {c.label: c for c in result.captures}
    assert by_label["splitter[0]"].grad.grad_fn == by_label["splitter[1]"].grad.grad_fn
    # proj: half of its output is dropped, but the other half is used, so it is connected.
    assert verdicts["proj"].connected


def test_shared_mixed_first_call_connected_second_grad_off() -> None:
    verdicts = _verdicts("shared_mixed", ["shared", "stem", "head"])
    assert verdicts["shared#1"].cause is Cause.CONNECTED
    second = verdicts["shared#2"]
    assert not second.connected and second.cause is Cause.GRAD_OFF
    assert second.where == "" and "inside SharedMixed.forward" in second.summary
    assert verdicts["stem"].connected and verdicts["head"].connected


def test_shared_mixed_children_of_second_call_point_at_outer_forward() -> None:
    verdicts = _verdicts("shared_mixed", ["shared.linear", "shared.act"])
    for label in ("shared.linear#2", "shared.act#2"):
        v = verdicts[label]
        assert v.cause is Cause.GRAD_OFF
        assert v.where == "", (label, v.where, v.summary)
        assert "inside SharedMixed.forward" in v.summary


def test_stores_inplace_note() -> None:
    verdicts = _verdicts("stores_inplace", ["inner", "inner.act", "inner.linear", "head"])
    for label in ("inner", "inner.act"):
        v = verdicts[label]
        assert v.connected  # still on the graph: mul_ is recorded by autograd
        assert v.in_place is not None
        assert "_version 0 -> 1" in v.in_place
        assert "GeluBackward0 -> MulBackward0" in v.in_place
        assert v.summary.endswith("modified in place after capture")
    assert verdicts["inner.linear"].in_place is None
    assert verdicts["head"].in_place is None


def test_never_runs_verdicts() -> None:
    verdicts = _verdicts("never_runs", ["skipped", "direct", "trunk"])
    skipped, direct = verdicts["skipped"], verdicts["direct"]
    assert skipped.cause is Cause.NOT_CALLED and not skipped.connected
    assert skipped.where == "skipped" and ".forward()" in skipped.hint
    # `direct.forward(h)` bypasses __call__, but its weights are on the graph all the same
    assert direct.cause is Cause.PARAMS_USED and not direct.connected
    assert "2 of its 2 trainable parameter tensors reach the output" in direct.summary
    assert verdicts["trunk"].connected


def test_nested_cnn_in_place_bn_still_connected_with_note() -> None:
    verdicts = _verdicts("nested_cnn", ["backbone.bn1", "backbone.layer1.0.relu"])
    bn1 = verdicts["backbone.bn1"]
    assert bn1.connected and bn1.in_place is not None
    assert "NativeBatchNormBackward0 -> ReluBackward0" in bn1.in_place
    assert verdicts["backbone.layer1.0.relu#1"].connected
    assert verdicts["backbone.layer1.0.relu#2"].connected


@pytest.mark.parametrize(
    ("mode", "cause", "summary"),
    [
        (Mode.NO_GRAD, Cause.GRAD_OFF, "grad mode off: ran under no_grad (--mode no-grad)"),
        (Mode.INFERENCE, Cause.INFERENCE, "inference mode (--mode inference)"),
    ],
)
def test_mode_verdicts(mode: Mode, cause: Cause, summary: str) -> None:
    verdicts = _verdicts("inner_outer", ["inner.relu", "linear_out"], mode=mode)
    for v in verdicts.values():
        assert not v.connected and v.cause is cause and v.where is None
        assert v.summary.startswith(summary)
        assert "--mode grad" in v.hint


# --------------------------------------------------------------------------- hand-made cuts


class _LeafDetach(nn.Module):
    """A leaf module (no children) whose forward detaches its result."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(4))

    def forward(self, x: Tensor) -> Tensor:
        return (x @ self.weight).detach()


class _Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.cut = _LeafDetach()
        self.post = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.post(self.cut(self.pre(x)))


def test_detach_inside_leaf_module_is_cut_inside_that_module() -> None:
    verdicts = _diagnose(_Chain(), torch.randn(1, 4), ["cut", "post"])
    cut = verdicts["cut"]
    assert cut.cause is Cause.CUT_INSIDE and cut.where == "cut"
    assert "_LeafDetach.forward" in cut.summary
    assert verdicts["post"].connected


def test_layer_before_a_detaching_sibling_is_not_called_unused() -> None:
    pre = _diagnose(_Chain(), torch.randn(1, 4), ["pre"])["pre"]
    assert pre.cause is not Cause.UNUSED
    assert pre.where == "cut"


class _SideAndFrozen(nn.Module):
    """A detached side branch, then a frozen layer on an input without grad."""

    def __init__(self) -> None:
        super().__init__()
        self.side = _LeafDetach()
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        side = self.side(x)
        return self.head(self.frozen(x)), side


def test_frozen_layer_not_blamed_on_an_unrelated_earlier_cut() -> None:
    frozen = _diagnose(_SideAndFrozen(), torch.randn(1, 4), ["frozen"])["frozen"]
    assert frozen.cause is Cause.FROZEN, frozen.summary


def _frozen_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    return model.requires_grad_(False)


def test_frozen_params_and_input_without_grad() -> None:
    verdicts = _diagnose(_frozen_model(), torch.randn(1, 4), ["0", "1", "2"])
    for v in verdicts.values():
        assert v.cause is Cause.FROZEN and not v.connected and v.where is None
        assert "--input-requires-grad" in v.hint


def test_frozen_params_with_input_requiring_grad_are_connected() -> None:
    x = torch.randn(1, 4, requires_grad=True)
    verdicts = _diagnose(_frozen_model(), x, ["0", "1", "2"])
    assert all(v.cause is Cause.CONNECTED for v in verdicts.values())


class _InnerInference(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        with torch.inference_mode():
            h = self.embed(x)
        return self.head(h.clone())


def test_inference_mode_inside_forward_names_the_forward() -> None:
    verdicts = _diagnose(_InnerInference(), torch.randn(1, 4), ["embed"])
    v = verdicts["embed"]
    assert v.cause is Cause.INFERENCE and v.where == ""
    assert "inside _InnerInference.forward" in v.summary


class _ArgMaxHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.pick = _Pick()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.linear(x)
        return logits, self.pick(logits)


class _Pick(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.argmax(dim=-1)


def test_integer_output_is_not_differentiable() -> None:
    v = _diagnose(_ArgMaxHead(), torch.randn(2, 4), ["pick"])["pick"]
    assert v.cause is Cause.NOT_DIFFERENTIABLE and "int64" in v.summary


# --------------------------------------------------------------------------- reachable_edges


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 2)
        self.b = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> dict[str, Any]:
        self.unused(x)
        return {"a": self.a(x), "nested": {"b": [self.b(x)]}, "meta": "text"}


def test_reachable_edges_walks_every_tensor_of_a_dict_output() -> None:
    result = capture(_TwoHeads(), [torch.randn(1, 4)], ["a", "b", "unused"])
    edges = reachable_edges(result.output)
    for key in (("a", 1, ""), ("b", 1, "")):
        node, nr = result.edges[key]
        assert (id(node), nr) in edges
    node, nr = result.edges[("unused", 1, "")]
    assert (id(node), nr) not in edges
    verdicts = diagnose(result)
    assert verdicts["a"].connected and verdicts["b"].connected
    assert verdicts["unused"].cause is Cause.UNUSED


def test_reachable_edges_of_output_without_grad_is_empty() -> None:
    with torch.no_grad():
        out = {"x": nn.Linear(2, 2)(torch.ones(1, 2))}
    assert reachable_edges(out) == set()
    assert reachable_edges("not a tensor") == set()


class _ReturnsParameterView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.p = nn.Parameter(torch.ones(1, 2))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            frozen = self.p.view(2)  # requires grad, but no grad_fn and no node to reach
        return self.lin(x), frozen


def test_an_output_without_a_reachable_node_does_not_crash_the_diagnosis() -> None:
    result = capture(_ReturnsParameterView(), [torch.randn(1, 2)], ["lin"])
    assert len(reachable_edges(result.output)) > 0
    assert diagnose(result)["lin"].connected


def test_tiny_transformer_dict_output_everything_connected() -> None:
    result = capture(
        build("tiny_transformer"),
        [example_input("tiny_transformer")],
        ["encoder.layers.0.attn", "encoder.norm", "head"],
    )
    verdicts = diagnose(result)
    # attention weights feed the output through weights @ v, so both elements are connected
    assert all(v.connected for v in verdicts.values()), verdicts


# --------------------------------------------------------------------------- the user examples


def _dump_report(cli: Any, tmp_path: Path, *args: str) -> tuple[dict[str, Any], str]:
    out = tmp_path / "out"
    code, stdout, stderr = cli("dump", *args, "--out", str(out))
    assert code == 0, stderr
    return json.loads((out / "report.json").read_text()), stdout


def test_user_example_grad_mode_inner_relu_connected(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    report, stdout = _dump_report(cli, tmp_path, "--layer", "inner.relu", "--mode", "grad")
    (capture_json,) = report["captures"]
    assert capture_json["label"] == "inner.relu"
    assert capture_json["verdict"]["connected"] is True
    assert capture_json["verdict"]["cause"] == "connected"
    assert "connected to the output" in stdout


def test_user_example_no_grad_mode_says_grad_off(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    report, stdout = _dump_report(cli, tmp_path, "--layer", "inner.relu", "--mode", "no-grad")
    verdict = report["captures"][0]["verdict"]
    assert verdict["connected"] is False and verdict["cause"] == "grad-off"
    assert verdict["summary"].startswith("grad mode off: ran under no_grad")
    assert "grad mode off: ran under no_grad" in stdout
    assert report["captures"][0]["grad"]["grad_enabled"] is False


def test_user_example_stores_inplace_warns(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "stores_inplace.pt"
    torch.save(build("stores_inplace").state_dict(), weights)
    report, stdout = _dump_report(
        cli,
        tmp_path,
        str(weights),
        "--arch",
        "sample_models.zoo:StoresInplace",
        "--layer",
        "inner",
        "--shape",
        "1,10",
    )
    (c,) = report["captures"]
    assert c["grad"]["modified_in_place"] is True
    assert c["grad"]["grad_fn_after"] == "MulBackward0"
    assert "modified in place after capture" in c["verdict"]["in_place"]
    assert "modified in place after capture" in stdout
    md = (tmp_path / "out" / "report.md").read_text()
    assert "**yes**" in md
