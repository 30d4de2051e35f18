"""--what input|both: a module's positional inputs, snapshot as the call starts (issue 15).

Ground truth: independent forward pre-hooks (clones taken at call start) and
torch.autograd.grad on those very tensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fvis.api import DumpOptions, ModelRef, dump
from fvis.capture import capture
from fvis.inputs import InputOptions
from fvis.loading import LoadOptions


class _Block(nn.Module):
    """GPT-2-shaped: the mid-block residual is ln_2's input; act changes its input in place."""

    def __init__(self, detach_head: bool = False) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(6), nn.LayerNorm(6)
        self.attn, self.mlp = nn.Linear(6, 6), nn.Linear(6, 6)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(6, 2)
        self.detach_head = detach_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.act(self.mlp(self.ln_2(x)))
        return self.head(x.detach() if self.detach_head else x)


def _pre_hook_inputs(model: nn.Module, names: list[str], x: torch.Tensor) -> tuple[Any, dict]:
    seen: dict[str, torch.Tensor] = {}
    live: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Any:
        def grab(_m: nn.Module, args: tuple[Any, ...]) -> None:
            seen[name], live[name] = args[0].detach().clone(), args[0]

        return grab

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        out = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return out, {"values": seen, "live": live}


def test_inputs_equal_independent_pre_hooks() -> None:
    torch.manual_seed(0)
    model, x = _Block().eval(), torch.randn(2, 3, 6)
    _, want = _pre_hook_inputs(model, ["ln_2", "act"], x)
    result = capture(model, [x], ["ln_2", "act"], what="input", sample=None)
    got = {c.label: c for c in result.captures}
    assert set(got) == {"ln_2:input", "act:input"}
    for name in ("ln_2", "act"):
        assert torch.equal(torch.from_numpy(got[f"{name}:input"].values), want["values"][name])


def test_input_changed_in_place_by_its_module_keeps_the_call_start_values() -> None:
    torch.manual_seed(1)
    model, x = _Block().eval(), torch.randn(2, 3, 6)
    _, want = _pre_hook_inputs(model, ["act"], x)
    assert (want["values"]["act"] < 0).any()  # so ReLU(inplace=True) really changes it
    result = capture(model, [x], ["act"], what="both", sample=None)
    got = {c.label: c for c in result.captures}
    assert torch.equal(torch.from_numpy(got["act:input"].values), want["values"]["act"])
    assert got["act:input"].grad.modified_in_place  # the live tensor did change later
    assert (got["act"].values >= 0).all()


@pytest.mark.parametrize("detach_head", [False, True])
def test_input_verdicts_match_autograd(tmp_path: Path, detach_head: bool) -> None:
    torch.manual_seed(2)
    model, x = _Block(detach_head).eval(), torch.randn(2, 3, 6)
    out, want = _pre_hook_inputs(model, ["ln_2", "head"], x)
    truth = {}
    for name in ("ln_2", "head"):
        tensor = want["live"][name]
        reachable = tensor.requires_grad and (
            torch.autograd.grad(out.sum(), tensor, retain_graph=True, allow_unused=True)[0]
            is not None
        )
        truth[f"{name}:input"] = reachable
    source = tmp_path / "x.pt"
    torch.save(x, source)
    ref = ModelRef(None, LoadOptions(), module=model)
    options = DumpOptions(layers=("ln_2", "head"), what="input", images=False)
    result = dump(ref, InputOptions(sources=(str(source),)), options, None)
    verdicts = {c["label"]: c["verdict"]["connected"] for c in result.report["captures"]}
    assert verdicts == truth
    assert truth["ln_2:input"] is (not detach_head)
    assert truth["head:input"] is (not detach_head)


def test_outputs_unchanged_by_input_capture() -> None:
    torch.manual_seed(3)
    model, x = _Block().eval(), torch.randn(2, 3, 6)
    with torch.no_grad():
        want = model(x.clone())
    result = capture(model, [x.clone()], ["ln_2", "act", "head"], what="both")
    assert torch.equal(result.output.detach(), want)


def test_cli_what_input_and_bad_value(cli: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, _, stderr = cli("dump", "--layer", "inner.relu", "--what", "input", "-o", out)
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    assert [c["label"] for c in report["captures"]] == ["inner.relu:input"]
    code, _, stderr = cli("dump", "--layer", "inner.relu", "--what", "inputs", "-o", tmp_path / "b")
    assert code == 2 and "--what" in stderr and "Traceback" not in stderr
