"""Summary statistics of one activation, computed at hook time (no copy to numpy).

This runs inside the forward hook of every captured layer, so it is a hot path. Contiguous
float32 CPU tensors (nearly every activation) are read once by the C extension
``fvis._moments`` (min, max, sum, sum of squares, zeros and dead channels in one pass). Other
tensors, and every tensor when the extension was not built or ``FVIS_NATIVE=0``, take a
handful of torch reductions (``aminmax``, ``sum``, ``vector_norm``, a boolean sum,
``amax``/``amin`` per channel) instead of ``std_mean`` (a Welford pass about 30x slower on
CPU) or masks that copy the tensor. NaN and Inf propagate into the sum, so finite tensors
(the usual case) need no per-element finiteness test; only a tensor that has some NaN or Inf
pays for the exact counts.
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass
from types import ModuleType

import torch

from fvis.fastbuild import builder


def _load_native() -> ModuleType | None:
    if os.environ.get("FVIS_NATIVE", "1") == "0":
        return None
    try:
        native = importlib.import_module("fvis._moments")
    except ImportError:  # built without a C compiler: the torch path gives the same numbers
        return None
    # Without SIMD the kernel is a single-threaded loop, slower than torch on large tensors.
    return native if getattr(native, "SIMD", False) else None


_native = _load_native()


@dataclass(frozen=True, slots=True)
class Stats:
    """Over finite values; NaN and ±Inf are counted apart so one NaN does not hide the rest."""

    numel: int
    min: float | None
    max: float | None
    mean: float | None
    std: float | None
    zero_fraction: float
    nan: int
    posinf: int
    neginf: int
    channels: int  # size of the channel dim for tensors of 3 or more dims, else 0
    dead_channels: int  # channels whose values are all zero (over the whole batch)
    channel_axis: int | None = None  # the dim counted as channels: 1, or the last (features)

    @property
    def nonfinite(self) -> int:
        return self.nan + self.posinf + self.neginf


def tensor_stats(tensor: torch.Tensor, axis: int = 1) -> Stats:
    """Statistics of ``tensor`` (any dtype); cheap enough to run inside a forward hook.

    ``axis`` is the channel dim (``fvis.axes``): 1 for ``(N, C, ...)``, the last dim for
    ``(N, T, D)`` tokens and ``(N, H, W, C)`` maps; channels are only counted from 3 dims on.

    >>> tensor_stats(torch.tensor([0.0, 1.0, float("nan")])).nan
    1
    """
    axis = _channel_dim(tensor, axis)
    if (  # _native_can_read inline: this is the call made for every capture
        _native is not None
        and type(tensor) in _PLAIN
        and tensor.dtype is _FLOAT32
        and tensor.is_cpu
        and tensor.is_contiguous()
        and tensor.numel() > 0
        and not tensor.is_neg()
        and not tensor._is_zerotensor()
    ):  # first, and without no_grad/detach
        return _native_stats(_native, tensor, axis)
    with torch.no_grad():
        data = _as_float(tensor.detach())
        numel = data.numel()
        if numel == 0:
            return Stats(0, None, None, None, None, 0.0, 0, 0, 0, 0, 0)
        if _native is not None and _native_can_read(data):  # float16 and bfloat16, widened
            return _native_stats(_native, data, axis)
        low, high = (float(v) for v in torch.aminmax(data))
        total = float(data.sum())  # torch sums float32 pairwise: accurate enough here
        if math.isfinite(low) and math.isfinite(high) and math.isfinite(total):
            return _finite_stats(data, numel, low, high, total, axis)
        return _stats_with_nonfinite(data, numel, axis)


def _channel_dim(tensor: torch.Tensor, axis: int) -> int | None:
    """The channel dim as a non-negative index, or None below 3 dims."""
    ndim = tensor.dim()
    if ndim < 3:
        return None
    axis = axis % ndim
    return axis if axis in (1, ndim - 1) else 1


# Only tensors whose memory holds their values: not wrapper subclasses (DTensor and the like
# have no data pointer), not lazily negated views, not the storage-less zero tensors.
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_FLOAT32 = torch.float32


def _native_can_read(tensor: torch.Tensor) -> bool:
    return (
        type(tensor) in _PLAIN
        and tensor.dtype is torch.float32
        and tensor.is_cpu
        and tensor.is_contiguous()
        and tensor.numel() > 0
        and not tensor.is_neg()
        and not tensor._is_zerotensor()
    )


def _native_stats(native: ModuleType, tensor: torch.Tensor, axis: int | None) -> Stats:
    """One read of the tensor's memory: no autograd op, so no no_grad or detach is needed.

    The kernel counts dead channels along dim 1 of an (outer, C, inner) layout; for channels
    on the last dim it reads the tensor as one run and the dead units (only possible when a
    value is zero) come from a torch reduction over the other dims."""
    numel = tensor.numel()
    shape = tensor.shape
    first = axis == 1 and len(shape) >= 3
    channels = shape[axis] if axis is not None else 0
    layout = (shape[0], channels, numel // (shape[0] * channels)) if first else (1, 1, numel)
    # The kernel's sums and, in the usual case, the mean and std _mean_std would compute (the
    # same operations in C, so the same bits); (None, None) where Python decides.
    if _HAS_SUMMARY:
        low, high, total, sumsq, zeros, dead, mean, std = native.summary(tensor.data_ptr(), *layout)
    else:  # an extension built before summary existed
        low, high, total, sumsq, zeros, dead = native.moments(tensor.data_ptr(), *layout)
        mean = std = None
    if std is None:
        finite = -math.inf < low <= high < math.inf and math.isfinite(total + sumsq)
        if not finite:  # NaN, Inf, or a float32 sum that overflowed: the exact path
            with torch.no_grad():
                return _stats_with_nonfinite(tensor.detach(), numel, axis)
    if axis is not None and not first:
        with torch.no_grad():
            dead = _dead_channels(tensor.detach(), axis) if zeros else 0
    if std is None:
        mean, std = _mean_std(tensor, numel, total, sumsq, max(-low, high))
    return _new_stats(
        (
            numel,
            low,
            high,
            mean,
            std,
            zeros / numel,
            0,
            0,
            0,
            channels,
            dead if channels else 0,
            axis,
        )
    )


def _mean_std(
    data: torch.Tensor, numel: int, total: float, sumsq: float, peak: float
) -> tuple[float, float]:
    """Mean and sample standard deviation from the sum and the sum of squares (float32 sums);
    ``peak`` is the largest magnitude."""
    mean = total / numel
    spread = sumsq / numel - mean * mean
    cancelled = not (math.isfinite(spread) and spread >= 1e-3 * mean * mean)
    if cancelled or 0 < peak < 1e-18:
        # Cancellation: a small spread around a large offset is lost in E[x^2] - E[x]^2 (and
        # in a float32 mean); float32 sums also overflow, and squares of values below ~1e-19
        # fall into subnormals. Rare enough to pay for two passes in float64.
        with torch.no_grad():
            wide = data.detach().double()
        mean = float(wide.mean())
        spread = float(torch.linalg.vector_norm(wide - mean)) ** 2 / numel
    return mean, math.sqrt(max(spread, 0.0) * numel / max(numel - 1, 1))


def _as_float(data: torch.Tensor) -> torch.Tensor:
    if data.is_complex():
        return data.abs()
    if not data.is_floating_point():
        return data.double() if data.dtype == torch.int64 else data.float()
    if data.dtype in (torch.float16, torch.bfloat16):  # their own sums overflow or round
        return data.float()
    return data


def _finite_stats(
    data: torch.Tensor, numel: int, low: float, high: float, total: float, axis: int | None
) -> Stats:
    sumsq = float(torch.linalg.vector_norm(data)) ** 2
    mean, std = _mean_std(data, numel, total, sumsq, max(-low, high))
    if low > 0 or high < 0:  # no value can be zero: skip the costliest pass
        nonzero = numel
    else:  # count_nonzero is ~10x slower on sparse ReLU outputs; an int32 sum avoids an
        # int64 copy of the whole map (int64 only where int32 could overflow)
        count_dtype = torch.int32 if numel < 2**31 else torch.int64
        nonzero = int(data.bool().sum(dtype=count_dtype))
    return Stats(
        numel=numel,
        min=low,
        max=high,
        mean=mean,
        std=std,
        zero_fraction=(numel - nonzero) / numel,
        nan=0,
        posinf=0,
        neginf=0,
        channels=_channels(data, axis),
        dead_channels=_dead_channels(data, axis) if nonzero < numel else 0,
        channel_axis=axis,
    )


def _stats_with_nonfinite(data: torch.Tensor, numel: int, axis: int | None) -> Stats:
    finite = torch.isfinite(data)
    n_finite = int(finite.sum())
    nan = int(torch.isnan(data).sum())
    posinf = int((data == float("inf")).sum())
    values = data[finite].double()
    return Stats(
        numel=numel,
        min=float(values.min()) if n_finite else None,
        max=float(values.max()) if n_finite else None,
        mean=float(values.mean()) if n_finite else None,
        std=float(values.std()) if n_finite > 1 else (0.0 if n_finite else None),
        zero_fraction=int((data == 0).sum()) / numel,
        nan=nan,
        posinf=posinf,
        neginf=numel - n_finite - nan - posinf,
        channels=_channels(data, axis),
        dead_channels=_dead_channels(data, axis),
        channel_axis=axis,
    )


def _channels(data: torch.Tensor, axis: int | None) -> int:
    return int(data.shape[axis]) if axis is not None else 0


def _dead_channels(data: torch.Tensor, axis: int | None) -> int:
    # A channel is dead when it is exactly zero everywhere, in every sample: the ReLU-death
    # case. Per-channel max and min over the other dims read the tensor without copying it.
    if axis is None:
        return 0
    dims = tuple(d for d in range(data.dim()) if d != axis)
    return int(((data.amax(dim=dims) == 0) & (data.amin(dim=dims) == 0)).sum())


_new_stats = builder(Stats)

_HAS_SUMMARY = hasattr(_native, "summary")
