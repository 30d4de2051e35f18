"""Statistics of tensors on an accelerator: reduced where they live, copied back once.

On a GPU every ``float(t)`` is a host sync, and the CPU statistics path (``fvis.stats``) takes
several per tensor. Here a captured tensor's statistics are reduced on its device into one
small float64 vector (no sync), and its drawn sample is cloned there; ``HostCopies`` gathers
the vectors and samples of a whole forward and copies them to the host in one transfer at
its end, so the host syncs per forward do not grow with the number of hooked layers.
Half and bfloat16 values are widened to float32 before any sum (float64 for the sums).

The mean and the standard deviation are two passes on the device (the deviations from the
mean, not ``E[x^2] - E[x]^2``), so they are exact to float64 rounding of the values captured.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from fvis.stats import Stats

# Devices whose statistics are reduced in place and copied back at the end of the forward
# (the CPU keeps the one-read C path of fvis.stats).
DEFERRED_DEVICES = frozenset({"cuda", "mps", "xpu", "hpu"})
# True: CPU tensors take the accelerator path too (how CPU-only CI tests it; FVIS_DEFER_CPU=1).
DEFER_ON_CPU = os.environ.get("FVIS_DEFER_CPU", "") == "1"

_SLOTS = 9  # numel-finite, min, max, mean, sum of squared deviations, zeros, nan, +inf, dead


def reduce_on_device(tensor: torch.Tensor, axis: int | None) -> torch.Tensor:
    """The statistics of ``tensor`` as a float64 vector on its device (no host sync)."""
    with torch.no_grad():
        data = tensor.detach()
        if data.is_complex():
            data = data.abs()
        if not data.is_floating_point() or data.dtype in (torch.float16, torch.bfloat16):
            data = data.double() if data.dtype == torch.int64 else data.float()
        finite = torch.isfinite(data)
        count = finite.sum(dtype=torch.float64)
        wide = torch.where(finite, data, 0).double()
        mean = wide.sum() / count.clamp(min=1)
        spread = torch.where(finite, wide - mean, 0).square().sum()
        low = torch.where(finite, data, math.inf).amin().double()
        high = torch.where(finite, data, -math.inf).amax().double()
        nan = torch.isnan(data).sum(dtype=torch.float64)
        posinf = (data == math.inf).sum(dtype=torch.float64)
        zeros = (data == 0).sum(dtype=torch.float64)
        dead = _dead(data, axis)
        return torch.stack([count, low, high, mean, spread, zeros, nan, posinf, dead])


def _dead(data: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None or data.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=data.device)
    dims = tuple(d for d in range(data.dim()) if d != axis)
    return ((data.amax(dim=dims) == 0) & (data.amin(dim=dims) == 0)).sum(dtype=torch.float64)


def stats_from(vector: list[float], numel: int, channels: int, axis: int | None) -> Stats:
    """``Stats`` from a vector of ``reduce_on_device`` read back on the host."""
    count, low, high, mean, spread, zeros, nan, posinf, dead = vector
    finite = int(count)
    if numel == 0:
        return Stats(0, None, None, None, None, 0.0, 0, 0, 0, channels, 0, axis)
    std = math.sqrt(spread / (finite - 1)) if finite > 1 else (0.0 if finite else None)
    return Stats(
        numel=numel,
        min=low if finite else None,
        max=high if finite else None,
        mean=mean if finite else None,
        std=std,
        zero_fraction=zeros / numel,
        nan=int(nan),
        posinf=int(posinf),
        neginf=numel - finite - int(nan) - int(posinf),
        channels=channels,
        dead_channels=int(dead),
        channel_axis=axis,
    )


def sample_on_device(tensor: torch.Tensor, sample: int | None) -> torch.Tensor:
    """The drawn sample (or everything) as a float32 clone on the tensor's device: the values
    at hook time, safe from later in-place ops, not yet copied to the host."""
    from fvis.tensor_facts import drawn

    with torch.no_grad():
        return drawn(tensor, sample).to(torch.float32, copy=True)


class HostCopies:
    """What a forward left on the devices, copied to the host in one transfer per device."""

    def __init__(self) -> None:
        self.pending: list[tuple[Any, torch.Tensor, torch.Tensor | None]] = []
        self.transfers = 0  # host copies made (one per device and forward): for the tests

    def add(self, owner: Any, vector: torch.Tensor, values: torch.Tensor | None) -> None:
        self.pending.append((owner, vector, values))

    def resolve(self) -> list[tuple[Any, list[float], Any]]:
        """Every pending (owner, statistics vector, sample as numpy or None), in order."""
        if not self.pending:
            return []
        by_device: dict[torch.device, list[int]] = {}
        for index, (_, vector, _) in enumerate(self.pending):
            by_device.setdefault(vector.device, []).append(index)
        vectors: dict[int, list[float]] = {}
        samples: dict[int, Any] = {}
        for indices in by_device.values():
            parts = [self.pending[i][1] for i in indices]
            values = [self.pending[i][2] for i in indices]
            flat = [v.reshape(-1).double() for v in values if v is not None]
            host = torch.cat([*parts, *flat]).cpu()  # the one sync for this device
            self.transfers += 1
            offset = _SLOTS * len(parts)
            for n, i in enumerate(indices):
                vectors[i] = host[n * _SLOTS : (n + 1) * _SLOTS].tolist()
                value = values[n]
                if value is not None:
                    size = value.numel()
                    chunk = host[offset : offset + size].to(torch.float32).reshape(value.shape)
                    samples[i] = chunk.numpy()
                    offset += size
        done = [(owner, vectors[i], samples.get(i)) for i, (owner, _, _) in enumerate(self.pending)]
        self.pending = []
        return done
