"""The accelerator path of the statistics (fvis.device_stats), run on the CPU: statistics
reduced where the tensor lives equal a float64 reference, and a forward's host syncs do not
grow with the number of hooked layers (one transfer at the end)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fvis import device_stats
from fvis.capture import Mode, capture
from fvis.device_stats import HostCopies, reduce_on_device, stats_from


def _reference(tensor: torch.Tensor, axis: int | None) -> dict[str, Any]:
    data = tensor.detach().abs() if tensor.is_complex() else tensor.detach()
    wide = data.double()
    finite = torch.isfinite(wide)
    values = wide[finite]
    dead = 0
    if axis is not None:
        moved = wide.movedim(axis, 0).reshape(wide.shape[axis], -1)
        dead = int((moved == 0).all(dim=1).sum())
    return {
        "min": float(values.min()) if values.numel() else None,
        "max": float(values.max()) if values.numel() else None,
        "mean": float(values.mean()) if values.numel() else None,
        "std": float(values.std()) if values.numel() > 1 else None,
        "zero_fraction": float((wide == 0).double().mean()),
        "nan": int(torch.isnan(wide).sum()),
        "posinf": int((wide == math.inf).sum()),
        "neginf": int((wide == -math.inf).sum()),
        "dead_channels": dead,
    }


def _relu_maps() -> torch.Tensor:
    maps = torch.relu(torch.randn(2, 6, 5, 5))
    maps[:, 2] = 0  # a dead channel
    return maps


def _with_nonfinite() -> torch.Tensor:
    values = torch.randn(3, 4, 7)
    values[0, 0, 0], values[1, 2, 3], values[2, 1, 1] = math.nan, math.inf, -math.inf
    return values


CASES = {
    "float32": (lambda: torch.randn(4, 9) * 3 + 100, None),  # a large offset: no cancellation
    "relu maps": (_relu_maps, 1),
    "channels last": (lambda: torch.relu(torch.randn(2, 5, 8)), 2),
    "nonfinite": (_with_nonfinite, 1),
    "bfloat16": (lambda: torch.randn(2, 3, 16).to(torch.bfloat16), 1),
    "float16": (lambda: (torch.randn(2, 3, 16) * 300).to(torch.float16), 1),
    "int64": (lambda: torch.randint(-5, 5, (3, 7)), None),
    "all nan": (lambda: torch.full((2, 3), math.nan), None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_reduced_statistics_equal_a_float64_reference(case: str) -> None:
    torch.manual_seed(0)
    make, axis = CASES[case]
    tensor = make()
    vector = reduce_on_device(tensor, axis).tolist()
    channels = tensor.shape[axis] if axis is not None else 0
    stats = stats_from(vector, tensor.numel(), channels, axis)
    want = _reference(tensor, axis)
    for name, expected in want.items():
        got = getattr(stats, name)
        if expected is None or isinstance(expected, int):
            assert got == expected, name
        else:
            assert got == pytest.approx(expected, rel=1e-12, abs=1e-12), name
    assert stats.numel == tensor.numel() and stats.channels == channels


class _Deep(nn.Module):
    def __init__(self, depth: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(8, 8) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class _Syncs(TorchDispatchMode):
    """Counts the ops that read a tensor's value on the host (``item()``, ``float(t)``):
    each is a host sync on an accelerator."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _syncs(depth: int, mode: Mode, monkeypatch: pytest.MonkeyPatch, defer: bool) -> int:
    monkeypatch.setattr(device_stats, "DEFER_ON_CPU", defer)
    monkeypatch.setattr("fvis.stats._native", None)  # the torch path an accelerator takes
    model = _Deep(depth).eval()
    layers = [f"layers.{i}" for i in range(depth)]
    spy = _Syncs()
    with spy:
        capture(model, [torch.randn(2, 8)], layers, mode=mode)
    return spy.count


@pytest.mark.parametrize("mode", [Mode.GRAD, Mode.NO_GRAD])
def test_host_syncs_do_not_grow_with_the_hooked_layers(
    monkeypatch: pytest.MonkeyPatch, mode: Mode
) -> None:
    reads = {depth: _syncs(depth, mode, monkeypatch, defer=False) for depth in (4, 16)}
    assert reads[16] > reads[4] > 0  # the per-call path: reads grow with the layers
    deferred = {depth: _syncs(depth, mode, monkeypatch, defer=True) for depth in (4, 16)}
    assert deferred[4] == deferred[16] == 0  # one bulk copy at the end, no scalar reads


def test_one_transfer_per_forward_and_values_taken_at_hook_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(device_stats, "DEFER_ON_CPU", True)
    made: list[HostCopies] = []
    original = HostCopies.__init__

    def spy(self: HostCopies) -> None:
        original(self)
        made.append(self)

    monkeypatch.setattr(HostCopies, "__init__", spy)

    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.fc(x)
            snapshot = out.detach().clone()
            out.data.mul_(0)  # changes the captured tensor after the hook
            return out + snapshot

    model = InPlace()
    x = torch.randn(2, 4)
    expected = model.fc(x).detach()
    result = capture(model, [x], ["fc"], mode=Mode.NO_GRAD, keep_values=True)
    assert made[0].transfers == 1
    (fc,) = result.captures
    assert torch.equal(torch.from_numpy(fc.values), expected[0])  # the drawn sample, at hook time
    assert fc.stats.max == pytest.approx(float(expected.double().max()))
