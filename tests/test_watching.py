"""fvis.watch: the user's own forward and backward, observed; ground truth from autograd."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import fvis
from fvis.errors import UsageError
from fvis.grads import Cause
from fvis.sample import build_sample


def line_of(marker: str) -> int:
    """The line in this file holding ``marker`` (a comment next to the user's code)."""
    source = inspect.getsource(inspect.getmodule(line_of))  # type: ignore[arg-type]
    return next(
        i
        for i, text in enumerate(source.splitlines(), 1)
        if marker in text and "line_of" not in text
    )


def global_hooks() -> int:
    hooks = torch.nn.modules.module
    return len(hooks._global_forward_hooks) + len(hooks._global_forward_pre_hooks)


def test_no_grad_around_the_forward_is_named_with_its_line() -> None:
    model = build_sample()
    x = torch.randn(2, 10)
    with fvis.watch(model, ["inner.relu"]) as w, torch.no_grad():
        out = model(x)  # MARK-NO-GRAD
    with pytest.raises(RuntimeError, match="does not require grad"):
        out.sum().backward()  # the user's wall, which the verdict explains
    verdict = w.verdicts()["inner.relu"]
    assert verdict.cause is Cause.GRAD_OFF and not verdict.connected
    where = f"tests/test_watching.py:{line_of('MARK-NO-GRAD')} in "
    assert where in verdict.summary and "torch.no_grad()" in verdict.summary


def test_a_stored_detached_intermediate_is_explained() -> None:
    class Stores(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(3, 3)
            self.head = nn.Linear(3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            hidden = torch.relu(self.body(x))
            self.intermediate_output = hidden.detach()
            return self.head(hidden)

    model = Stores()
    with fvis.watch(model, ["body"]) as w:
        out = model(torch.randn(2, 3))
    with pytest.raises(RuntimeError):  # ground truth: autograd cannot use the stored tensor
        torch.autograd.grad(out.sum(), model.intermediate_output)
    verdict = w.explain(model.intermediate_output)
    assert not verdict.connected
    # relu made a new tensor: the stored one is not body's output, so no origin is claimed
    assert verdict.where is None and "does not require grad" in verdict.summary
    body_out = model.body(torch.randn(2, 3)).detach()
    assert w.explain(body_out).where is None  # outside the block: never captured


def test_a_detached_copy_of_a_capture_is_traced_to_it() -> None:
    model = build_sample()
    with fvis.watch(model, ["inner"]) as w:
        out = model(torch.randn(2, 10))
        stored = model.inner(torch.randn(2, 10)).detach()
    verdict = w.explain(stored)
    assert verdict.where == "inner" and "a detached copy of inner (step 1)" in verdict.summary
    # explain() judges against the last step (the inner call): step 0's output is not in it
    assert w.explain(out).cause is Cause.UNUSED
    assert [s.entry for s in w.steps] == ["", "inner"]


def test_a_direct_submodule_call_under_no_grad_is_a_step_of_its_own() -> None:
    model = build_sample()
    x = torch.randn(2, 10)
    with fvis.watch(model, ["inner.relu"]) as w:
        with torch.no_grad():
            hidden = model.inner(x)  # MARK-DIRECT
        out = model(x)
    assert [s.entry for s in w.steps] == ["inner", ""]
    first, second = w.verdicts(0)["inner.relu"], w.verdicts(1)["inner.relu"]
    assert first.cause is Cause.GRAD_OFF
    assert f"test_watching.py:{line_of('MARK-DIRECT')}" in first.summary
    assert second.connected
    assert w.explain(hidden).cause is Cause.GRAD_OFF
    assert torch.autograd.grad(out.sum(), model.inner.linear.weight)[0].abs().sum() > 0


def test_inference_mode_is_named_with_its_line() -> None:
    model = build_sample()
    with fvis.watch(model, ["inner.relu"]) as w, torch.inference_mode():
        hidden = model(torch.randn(2, 10))  # MARK-INFERENCE
    verdict = w.verdicts()["inner.relu"]
    assert verdict.cause is Cause.INFERENCE
    assert f":{line_of('MARK-INFERENCE')} in " in verdict.summary
    assert w.explain(hidden).cause is Cause.INFERENCE


def test_autocast_is_reported() -> None:
    model = build_sample()
    with fvis.watch(model, ["inner.linear"]) as w, torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 10))
    assert w.steps[0].context.autocast == "cpu:bfloat16"
    assert "autocast cpu:bfloat16" in w.verdicts()["inner.linear"].hint
    assert w.steps[0].captures[0].dtype == "bfloat16"


def test_a_training_loop_records_every_step_and_the_gradients() -> None:
    torch.manual_seed(0)
    model = build_sample()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    expected: list[float] = []
    seen: list[torch.Tensor] = []
    handle = model.inner.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        with fvis.watch(model, ["inner", "linear_out"]) as w:
            for _ in range(3):
                optimizer.zero_grad()
                out = model(torch.randn(4, 10))
                seen[-1].retain_grad()
                out.pow(2).mean().backward()
                expected.append(float(seen[-1].grad.norm()))
                optimizer.step()
    finally:
        handle.remove()
    assert len(w.steps) == 3
    for index in range(3):
        assert all(v.connected for v in w.verdicts(index).values())
        assert w.gradients(index)["inner"] == pytest.approx(expected[index], rel=1e-6)
    # pictures only for the last step: earlier steps keep statistics, not values
    assert [c.values is None for c in w.steps[0].captures] == [True, True]
    assert all(c.values is not None for c in w.steps[2].captures)


def test_pictures_every_n_steps_keeps_those_values() -> None:
    model = build_sample()
    with fvis.watch(model, ["inner"], pictures_every=2) as w:
        for _ in range(4):
            model(torch.randn(1, 10))
    kept = [step.captures[0].values is not None for step in w.steps]
    assert kept == [True, False, True, True]  # steps 0 and 2, and the last


def test_an_exception_inside_the_block_removes_every_hook() -> None:
    model = build_sample().train()
    before = global_hooks()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="mat1 and mat2"), fvis.watch(model) as w:
        model(torch.randn(2, 7))  # the wrong width: forward raises inside inner.linear
    assert global_hooks() == before
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert len(w.steps) == 1  # the failed call is still a step, with what ran before it
    calls_after = global_hooks()
    model(torch.randn(2, 10))  # hooks are gone: nothing is recorded any more
    assert len(w.steps) == 1 and global_hooks() == calls_after


def test_the_report_folder_is_what_dump_writes(tmp_path: Path) -> None:
    model = build_sample()
    with fvis.watch(model, ["inner.relu"]) as w, torch.no_grad():
        model(torch.randn(2, 10))  # MARK-REPORT
    result = w.report(tmp_path / "out")
    assert set(result.files) == {"inner.relu.png", "report.html", "report.json", "report.md"}
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["watch"]["called_at"].endswith(
        f":{line_of('MARK-REPORT')} in {test_the_report_folder_is_what_dump_writes.__name__}"
    )
    assert report["captures"][0]["verdict"]["cause"] == "grad-off"
    assert report["mode"] == "no-grad"


def test_bad_calls_are_usage_errors() -> None:
    model = build_sample()
    w = fvis.watch(model, ["inner.relu"])
    with pytest.raises(UsageError, match="has not run yet"):
        w.verdicts()
    with pytest.raises(UsageError, match=r"torch\.Tensor"):
        w.explain([1, 2])  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"no layer 'inner\.reul'"):
        fvis.watch(model, ["inner.reul"])
    scripted = torch.jit.script(nn.Linear(2, 2))
    with pytest.raises(UsageError, match="TorchScript"):
        fvis.watch(scripted)


def test_the_readme_example_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("### `fvis.watch`") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    monkeypatch.chdir(tmp_path)
    printed: list[str] = []
    exec(
        compile(code.group(1), "train.py", "exec"),
        {"print": lambda *a: printed.append(" ".join(map(str, a)))},
    )
    assert (
        printed[0]
        == "grad mode off: the forward ran under torch.no_grad() at train.py:9 in <module>"
    )
    assert printed[1].startswith("a detached copy of inner (step 1)")
    assert re.fullmatch(r"\{'inner': [0-9.]+\}", printed[2])
    assert (tmp_path / "fvis-watch-out" / "report.html").is_file()
