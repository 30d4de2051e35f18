"""Summary statistics of one activation, computed in torch at hook time (no copy to numpy)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
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
    channels: int  # size of dim 1 for (N, C, ...) tensors, else 0
    dead_channels: int  # channels whose values are all zero (over the whole batch)

    @property
    def nonfinite(self) -> int:
        return self.nan + self.posinf + self.neginf


def tensor_stats(tensor: torch.Tensor) -> Stats:
    """Statistics of ``tensor`` (any dtype); cheap enough to run inside a forward hook.

    >>> tensor_stats(torch.tensor([0.0, 1.0, float("nan")])).nan
    1
    """
    with torch.no_grad():
        data = tensor.detach()
        if data.is_complex():
            data = data.abs()
        if not data.is_floating_point():
            data = data.double() if data.dtype == torch.int64 else data.float()
        numel = data.numel()
        if numel == 0:
            return Stats(0, None, None, None, None, 0.0, 0, 0, 0, 0, 0)
        finite = torch.isfinite(data)
        n_finite = int(finite.sum())
        nan = int(torch.isnan(data).sum())
        posinf = int((data == float("inf")).sum())
        zeros = int((data == 0).sum())
        values = data if n_finite == numel else data[finite]
        return Stats(
            numel=numel,
            min=float(values.min()) if n_finite else None,
            max=float(values.max()) if n_finite else None,
            mean=float(values.mean(dtype=torch.float64)) if n_finite else None,
            std=float(values.double().std()) if n_finite > 1 else (0.0 if n_finite else None),
            zero_fraction=zeros / numel,
            nan=nan,
            posinf=posinf,
            neginf=numel - n_finite - nan - posinf,
            channels=_channels(data),
            dead_channels=_dead_channels(data),
        )


def _channels(data: torch.Tensor) -> int:
    return int(data.shape[1]) if data.dim() >= 3 else 0


def _dead_channels(data: torch.Tensor) -> int:
    # A channel is dead when it is exactly zero everywhere, in every sample: the ReLU-death case.
    if data.dim() < 3:
        return 0
    per_channel = data.transpose(0, 1).reshape(data.shape[1], -1)
    return int((per_channel == 0).all(dim=1).sum())
