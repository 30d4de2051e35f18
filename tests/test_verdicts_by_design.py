"""Verdicts on patterns stock models use by design (issue 14), on small hand-built models.

Ground truth comes from ``torch.autograd.grad`` and plain module attributes, never from fvis.
Each test reproduces a false alarm of the old code (or a bug that must stay caught).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fvis.backward import run_backward
from fvis.capture import capture, train_mode
from fvis.dumping import _not_run_entries
from fvis.gates import evaluate, parse_gates
from fvis.grads import Cause, Verdict, diagnose
from fvis.layers import ModelTree, node_from_module
from fvis.origins import is_library_file, origin_of

DEFAULT = parse_gates("missing,not-run,disconnected,nonfinite")


def _diagnose(
    model: nn.Module, x: Tensor, layers: list[str], watch_ops: bool = False
) -> dict[str, Verdict]:
    return diagnose(capture(model.eval(), [x], layers, watch_ops=watch_ops))


class FunctionalProj(nn.Module):
    """Swin / MultiheadAttention style: the child's weight is used through F.linear."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)  # really unused
        self.drop = nn.Dropout(0.1)  # parameter-free, never called (SDPA-style dropout)
        self.blocks = nn.ModuleList([nn.Linear(4, 4)])

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks[0](F.linear(x, self.proj.weight, self.proj.bias))


def test_parameters_used_functionally_are_not_never_ran() -> None:
    model, x = FunctionalProj(), torch.randn(2, 4)
    truth = torch.autograd.grad(model(x).sum(), [model.proj.weight, model.unused.weight],
                                allow_unused=True)  # fmt: skip
    assert truth[0] is not None and truth[1] is None
    v = _diagnose(model, x, ["proj", "unused", "drop", "blocks"])
    assert v["proj"].cause is Cause.PARAMS_USED
    assert "2 of its 2 trainable parameter tensors reach the output" in v["proj"].summary
    assert v["unused"].cause is Cause.NOT_CALLED
    assert "its parameters do not reach the output" in v["unused"].summary
    assert v["drop"].cause is Cause.NOT_CALLED and "parameter-free" in v["drop"].summary
    assert v["blocks"].cause is Cause.CONTAINER and "never ran" not in v["blocks"].summary


def test_container_is_not_listed_as_never_ran() -> None:
    model = FunctionalProj().eval()
    result = capture(model, [torch.randn(2, 4)], ["blocks", "blocks.0"])
    assert result.never_ran == ()  # a ModuleList cannot be called at all
    assert [c.layer for c in result.captures] == ["blocks.0"]


def test_not_run_gate_only_for_names_the_user_gave() -> None:
    model = FunctionalProj().eval()
    tree = ModelTree.of(node_from_module(model))
    result = capture(model, [torch.randn(2, 4)], ["proj", "unused", "drop", "blocks.0"])
    verdicts = {k: v.as_dict() for k, v in diagnose(result).items()}
    not_called = set(result.not_called)

    def gated(patterns: tuple[str, ...]) -> set[str]:
        entries = _not_run_entries(tree, patterns, not_called, verdicts)
        report = {"never_ran": list(result.never_ran), "not_run": entries, "captures": []}
        return {f.layer for f in evaluate(report, DEFAULT).failures}

    assert gated(()) == set()  # the default selection (every leaf)
    assert gated(("drop",)) == {"drop"}  # named exactly: the user wanted it
    assert gated(("blocks.*", "d*")) == {"drop"}  # a glob: only when none of its matches ran
    assert gated(("*",)) == set()  # blocks.0 ran


class Anchors(nn.Module):
    """Parameter-free, reads only the feature map's shape (like an anchor generator)."""

    def forward(self, feature: Tensor) -> Tensor:
        h, w = feature.shape[-2:]
        return torch.arange(h * w, dtype=feature.dtype).reshape(h, w)


class DetachNoParams(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.detach() * 2


class Rotary(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("inv_freq", torch.arange(1, 3, dtype=torch.float32))

    @torch.no_grad()
    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        return (positions[..., None].float() * self.inv_freq).cos().to(x.dtype)


class ShapeModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.anchors = Anchors()
        self.cut = DetachNoParams()
        self.rotary = Rotary()

    def forward(self, x: Tensor) -> Tensor:
        f = self.conv(x)
        table = self.rotary(f, positions=torch.arange(3))
        return f + self.anchors(f) + self.cut(f) + table.sum()


def test_constant_outputs_are_not_cuts_but_a_real_detach_is() -> None:
    v = _diagnose(ShapeModel(), torch.randn(1, 1, 3, 3), ["anchors", "rotary", "cut"])
    assert v["anchors"].cause is Cause.CONSTANT and not v["anchors"].connected
    assert v["rotary"].cause is Cause.CONSTANT  # @torch.no_grad() by design, keyword input
    assert v["cut"].cause is Cause.CUT_INSIDE and v["cut"].where == "cut"
    report = {"captures": [{"label": k, "layer": k, "verdict": x.as_dict(),
                            "stats": {"nan": 0, "posinf": 0, "neginf": 0, "channels": 0},
                            "grad": {}} for k, x in v.items()]}  # fmt: skip
    assert [f.layer for f in evaluate(report, DEFAULT).failures] == ["cut"]


class DetachingWrapper(nn.Module):
    """A wrapper that detaches backbone features before its head (a bug to catch)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x).detach() + 1)


class StraightThrough(nn.Module):
    """VQ-VAE style: the codebook lookup is used, then detached in the parent's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.codebook = nn.Embedding(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        z = self.encoder(x)
        z_q = self.codebook(z.argmax(-1))
        return z + (z_q - z).detach()


def test_detach_in_parent_forward_is_used_then_detached() -> None:
    model, x = DetachingWrapper(), torch.randn(2, 4)
    assert torch.autograd.grad(model(x).sum(), model.backbone.weight, allow_unused=True)[0] is None
    assert _diagnose(model, x, ["backbone"])["backbone"].cause is Cause.UNUSED  # hooks alone
    v = _diagnose(model, x, ["backbone", "head"], watch_ops=True)["backbone"]
    assert v.cause is Cause.CUT_DOWNSTREAM and v.where == ""
    assert v.summary.startswith("used, then detached: DetachingWrapper.forward detaches")
    assert "dead branch" not in v.summary and v.summary.endswith(" (your code)")
    assert not v.library and v.origin is not None and v.origin.endswith(".py:" + str(
        DetachingWrapper.forward.__code__.co_firstlineno))  # fmt: skip
    vq = _diagnose(StraightThrough(), x, ["codebook", "encoder"], watch_ops=True)
    assert vq["codebook"].summary.startswith("used, then detached: StraightThrough.forward")
    assert vq["encoder"].connected


def test_dump_runs_the_op_watch_only_when_a_capture_is_unreachable() -> None:
    from fvis.api import DumpOptions, check_module

    result = check_module(
        DetachingWrapper().eval(),
        [torch.randn(2, 4)],
        DumpOptions(layers=("backbone", "head"), images=False),
    )
    verdict = {c["label"]: c["verdict"] for c in result.dump.report["captures"]}["backbone"]
    assert verdict["summary"].startswith("used, then detached: DetachingWrapper.forward")
    calls: list[bool] = []
    import sys

    module = sys.modules["fvis.capture"]  # `import fvis.capture` gives the function
    real = module.capture

    def spy(*args, **kwargs):
        calls.append(kwargs.get("watch_ops", False))
        return real(*args, **kwargs)

    module.capture = spy
    try:
        check_module(nn.Sequential(nn.Linear(4, 4)), [torch.randn(2, 4)], DumpOptions(images=False))
        check_module(
            DetachingWrapper().eval(),
            [torch.randn(2, 4)],
            DumpOptions(layers=("backbone",), images=False),
        )
    finally:
        module.capture = real
    assert calls == [False, False, True]  # a connected model runs once, without the watch


class NoGradThenDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.drop = nn.Dropout(0.1)
        self.flat = nn.Flatten()
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            f = self.backbone(x)
        return self.head(self.flat(self.drop(f.mean(0, keepdim=True))))


def test_layers_after_a_no_grad_block_blame_it_not_frozen_parameters() -> None:
    model = NoGradThenDropout()
    assert all(p.requires_grad for p in model.parameters())  # nothing is frozen
    v = _diagnose(model, torch.randn(3, 4), ["drop", "flat", "backbone.0"])
    for name in ("drop", "flat"):
        assert v[name].cause is Cause.GRAD_OFF and v[name].where == "", name
        assert "backbone ran under no_grad inside NoGradThenDropout.forward" in v[name].summary
        assert "frozen" not in v[name].summary.split("(")[0]
    assert v["backbone.0"].cause is Cause.GRAD_OFF


def test_frozen_parameters_stay_frozen() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    v = _diagnose(model, torch.randn(2, 4), ["0", "1", "2"])
    assert v["0"].cause is Cause.FROZEN and v["1"].cause is Cause.FROZEN
    assert v["2"].connected


class SharedLeaky(nn.Module):
    """A shared in-place activation modifies a tensor that ``b`` saved for backward."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.act = nn.LeakyReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.a(x))
        y = self.b(h) * h
        self.act(h)
        return y


def test_connected_but_backward_fails_is_not_connected() -> None:
    model, x = SharedLeaky(), torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        model(x).sum().backward()
    v = _diagnose(model, x, ["a", "b"])
    for name in ("a", "b"):
        assert v[name].cause is Cause.BACKWARD_FAILS and not v[name].connected
        assert "modified by an inplace operation" in v[name].summary
    fine = _diagnose(nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True)), x, ["0"])
    assert fine["0"].connected  # an in-place op that breaks nothing


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.block = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.ReLU())
        self.out = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        from torch.utils.checkpoint import checkpoint

        if not self.training:
            return self.out(self.block(x))
        return self.out(checkpoint(self.block, x, use_reentrant=self.reentrant))


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_in_train_mode_gets_gradients_like_backward(reentrant: bool) -> None:
    torch.manual_seed(0)
    model, x = Checkpointed(reentrant), torch.randn(3, 4, requires_grad=reentrant)
    model.eval()
    with train_mode(model, True):
        result = capture(model, [x], ["block", "out"], train=True)
        flow = run_backward(model, result)
    assert not model.training and not model.block[1].training  # restored after backward
    assert flow.error is None, flow.error
    assert {p.layer: p.received for p in flow.params} == {"block": 2, "out": 2}
    assert all(p.grad is None for p in model.parameters())  # .grad left as it was


def test_library_classification() -> None:
    assert origin_of(nn.Linear).library and origin_of(nn.MultiheadAttention).library
    mine = origin_of(DetachingWrapper)
    assert not mine.library and mine.file is not None and mine.file.endswith(".py")
    assert is_library_file("/usr/lib/python3/dist-packages/x/y.py")
    assert not is_library_file("/home/me/project/model.py")


def test_library_cut_passes_by_default_and_fails_strict() -> None:
    verdict = {"connected": False, "cause": "cut-downstream", "library": True, "summary": "s"}
    stats = {"nan": 0, "posinf": 0, "neginf": 0, "channels": 0}
    report = {
        "captures": [{"label": "l", "layer": "l", "verdict": verdict, "grad": {}, "stats": stats}]
    }
    assert evaluate(report, DEFAULT).passed
    assert not evaluate(report, DEFAULT, strict_library=True).passed
    verdict["library"] = False
    assert not evaluate(report, DEFAULT).passed
