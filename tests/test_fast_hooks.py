"""The C hooks (fvis/_trace.c) record exactly what the Python hooks record.

Every model runs three times, capturing every module: with the C hooks around each forward
(the default), with the C hooks as global module hooks (``USE_WRAP`` off), and with the
Python session alone (``USE_NATIVE`` off). Each C result is compared with the Python one
field by field (``tests/hook_paths.py``): the trace, each capture's statistics (bit for bit),
grad facts, shapes, drawn values, token grids, edges, notes, cuts and the calls that never
ran. A count of the calls the C path took makes sure it ran at all (a fast path that always
fell back would pass the comparison)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from fvis import fasthooks
from fvis.capture import Mode
from sample_models.zoo import SAMPLES, build, example_input
from tests.hook_paths import assert_same, capture_fields, run_capture

pytestmark = pytest.mark.skipif(fasthooks._native is None, reason="fvis._moments not built")


class TokenNet(nn.Module):
    """Embedding ids in, (N, T, D) tokens (channels last), a shared LayerNorm, a GELU."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.norm = nn.LayerNorm(16)
        self.proj = nn.Linear(16, 16)
        self.act = nn.GELU()
        self.drop = nn.Dropout(0.1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.embed(ids))
        return self.norm(self.drop(self.act(self.proj(x))))


class ConvNet(nn.Module):
    """Channels first, an in-place ReLU, a frozen layer, a half-dead map, a flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.frozen = nn.Conv2d(8, 8, 1)
        self.frozen.requires_grad_(False)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.flat = nn.Flatten()
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.conv(x)))
        x = self.frozen(x)
        x[:, :4] = 0  # dead channels
        return self.head(self.flat(self.pool(x)))


class CachedNet(nn.Module):
    """A layer that returns a table made under inference_mode (an inference tensor: no
    version counter) beside one that computes."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.table = Cached()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + self.table(x).sum()


class Cached(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        with torch.inference_mode():
            self.cached = torch.ones(2, 4) * 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cached


def _models() -> dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor]]]:
    cases: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor]]] = {
        name: (lambda n=name: build(n), lambda n=name: example_input(n)) for name in SAMPLES
    }
    cases["tokens"] = (lambda: _seeded(TokenNet), lambda: torch.arange(12).reshape(2, 6) % 50)
    cases["conv"] = (lambda: _seeded(ConvNet), lambda: torch.randn(2, 3, 8, 8))
    cases["cached"] = (lambda: _seeded(CachedNet), lambda: torch.randn(2, 4))
    return cases


def _seeded(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return cls().eval()


@pytest.mark.parametrize("name", sorted(_models()))
@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("wrap", [True, False], ids=["wrapped", "global"])
def test_c_hooks_record_what_the_python_hooks_record(
    name: str, mode: Mode, wrap: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_model, make_input = _models()[name]
    model, x = make_model(), make_input()
    fast, fast_calls, fast_seen = run_capture(model, x, True, monkeypatch, wrap, mode=mode)
    slow, slow_calls, slow_seen = run_capture(model, x, False, monkeypatch, mode=mode)
    assert_same(fast, slow)
    assert [capture_fields(c) for c in fast_seen] == [capture_fields(c) for c in slow_seen]
    assert slow_calls == 0
    assert fast_calls > 0  # the C path ran
    assert all("forward" not in m.__dict__ for m in model.modules())  # unwrapped after


@pytest.mark.parametrize("options", [{"keep_values": False}, {"what": "both"}, {"sample": None}])
def test_c_hooks_match_with_other_capture_options(
    options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for make_model, make_input in (_models()["conv"], _models()["tokens"]):
        model, x = make_model(), make_input()
        fast, fast_calls, _ = run_capture(model, x, True, monkeypatch, **options)
        wrapped_off, _, _ = run_capture(model, x, True, monkeypatch, False, **options)
        slow, _, _ = run_capture(model, x, False, monkeypatch, **options)
        assert_same(fast, slow)
        assert_same(wrapped_off, slow)
        assert fast_calls > 0


def test_c_hooks_take_most_calls_of_a_plain_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Sequential of Linear/ReLU: every leaf call is the usual one (nothing falls back)."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) if i % 2 == 0 else nn.ReLU() for i in range(20)])
    for mode in Mode:
        result, fast_calls, _ = run_capture(model, torch.randn(3, 8), True, monkeypatch, mode=mode)
        assert fast_calls == len(result.trace) == 21
        assert len(result.captures) == 20


def test_c_hooks_see_a_later_in_place_change(monkeypatch: pytest.MonkeyPatch) -> None:
    """A capture changed in place by the next module: the grad facts say so on both paths."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
    x = torch.randn(2, 4)
    for native in (True, False):
        result, _, _ = run_capture(model, x, native, monkeypatch, mode=Mode.GRAD)
        first = next(c for c in result.captures if c.layer == "0")
        assert first.grad.modified_in_place, native


class Shell(nn.Module):
    """Calls one child through ``__call__`` and one through ``.forward`` (no hook sees it)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = nn.Linear(4, 4)
        self.unseen = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unseen.forward(self.seen(x))


def test_wrapped_forwards_see_only_calls_through_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """A direct ``.forward`` call is not a module call for global hooks, nor for the wrappers;
    an instance ``forward`` set before (as accelerate does) is wrapped and put back."""
    torch.manual_seed(0)
    model = Shell()

    def own_forward(x: torch.Tensor) -> torch.Tensor:
        return type(model.seen).forward(model.seen, x) * 2

    model.seen.forward = own_forward  # type: ignore[method-assign]
    result, fast_calls, _ = run_capture(model, torch.randn(2, 4), True, monkeypatch)
    assert [r.name for r in result.trace] == ["seen", ""]
    assert result.never_ran == ("unseen",)
    assert fast_calls == 2
    assert model.seen.__dict__["forward"] is own_forward
    assert "forward" not in model.unseen.__dict__ and "forward" not in model.__dict__


def test_wrapped_forward_keeps_the_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    """Code inside a forward that inspects ``self.forward`` sees the module's own."""
    import inspect

    seen: list[inspect.Signature] = []

    class Introspective(nn.Module):
        def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            seen.append(inspect.signature(self.forward))
            return x * scale

    model = nn.Sequential(Introspective())
    run_capture(model, torch.ones(2), True, monkeypatch)
    assert list(seen[0].parameters) == ["x", "scale"]


def test_a_module_with_its_own_pre_hook_keeps_the_global_hooks() -> None:
    """Its pre-hook may change the arguments: the global pre-hook sees them before it does,
    a wrapper would see them after; such a model is not wrapped."""
    model = nn.Sequential(nn.Linear(2, 2))
    assert fasthooks.wrappable(list(model.modules()))
    model[0].register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    assert not fasthooks.wrappable(list(model.modules()))


@pytest.mark.parametrize(
    "register",
    ["register_module_forward_hook", "register_module_full_backward_hook"],
)
def test_another_global_hook_keeps_the_global_hooks(register: str) -> None:
    """A forward hook registered before fvis's runs before them and may change the output they
    see; a backward hook replaces every module's arguments after the global pre-hooks."""
    model = nn.Sequential(nn.Linear(2, 2))
    hooks = torch.nn.modules.module
    with getattr(hooks, register)(lambda module, first, second: None):
        assert not fasthooks.wrappable(list(model.modules()))
    assert fasthooks.wrappable(list(model.modules()))
