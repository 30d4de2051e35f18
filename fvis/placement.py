"""Where the model runs: ``--device`` and ``--dtype``.

``parse`` turns the option texts into a ``Placement``; ``resolve`` picks the device (``auto``:
CUDA when available, else the CPU; no ``--device``: an already-placed model keeps its own
device, a loaded checkpoint goes to ``auto``); ``apply`` moves and casts the model and its
inputs. Floating inputs follow the model's dtype; integer inputs (token ids, masks) keep
theirs and only move. A live module given in Python is copied before a cast, so the caller's
model is never changed.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fvis.errors import UsageError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
_DEVICE = re.compile(r"(cpu|cuda|cuda:\d+|mps|auto)")


@dataclass(frozen=True)
class Placement:
    """The device and dtype asked for (None: keep the model's)."""

    device: str | None = None  # cpu, cuda, cuda:N, mps, auto
    dtype: str | None = None  # float32, bfloat16, float16


def parse(device: str | None, dtype: str | None) -> Placement:
    """Validate ``--device`` and ``--dtype``.

    >>> parse("cuda:1", "bf16")
    Placement(device='cuda:1', dtype='bfloat16')
    """
    if device is not None and not _DEVICE.fullmatch(device.strip().lower()):
        raise UsageError(f"--device {device!r}: choose cpu, cuda, cuda:N, mps or auto")
    name = None
    if dtype is not None:
        name = _ALIASES.get(dtype.strip().lower(), dtype.strip().lower())
        if name not in DTYPES:
            raise UsageError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return Placement(device.strip().lower() if device else None, name)


def resolve(placement: Placement, model: nn.Module, loaded: bool) -> torch.device:
    """The device to run on; an unavailable one is a usage error."""
    asked = placement.device
    if asked is None:
        own = _own_device(model)
        asked = "auto" if loaded or own is None else str(own)
    if asked == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(asked)
    _check_available(device)
    return device


def _own_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter or buffer (None: it has neither)."""
    first = next(iter(model.parameters()), None)
    if first is None:
        first = next(iter(model.buffers()), None)
    return first.device if first is not None else None


def _check_available(device: torch.device) -> None:
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {device}: no CUDA device is available here",
                hint="use --device cpu, or auto (CUDA when there is one)",
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {device}: there are {torch.cuda.device_count()} CUDA devices"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: MPS is not available here", hint="use --device cpu")


def apply(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], device: torch.device,
    placement: Placement, live: bool,
) -> tuple[nn.Module, tuple[Any, ...], dict[str, Any]]:  # fmt: skip
    """The model on ``device`` in the dtype asked for, and the inputs moved to match."""
    dtype = DTYPES[placement.dtype] if placement.dtype else None
    if live and (dtype is not None or _own_device(model) not in (None, device)):
        model = copy.deepcopy(model)  # the caller's module stays as it was
    model = model.to(device=device, dtype=dtype) if dtype else model.to(device)
    target = dtype or _floating_dtype(model)

    def move(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if value.is_floating_point() and target is not None:
            return value.to(device=device, dtype=target)
        return value.to(device)

    return model, tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


def _floating_dtype(model: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def describe(device: torch.device, model: nn.Module) -> tuple[str, str]:
    """(device, dtype) as the report and the header name them."""
    dtype = _floating_dtype(model)
    return str(device), str(dtype).removeprefix("torch.") if dtype else "none"


@dataclass(frozen=True)
class Placed:
    """The model and inputs where they run, and how the report names that."""

    module: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    device: str
    dtype: str


def place(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    placement: Placement,
    live: bool,
    dispatched: bool,
) -> Placed:
    """Apply ``placement``; a model accelerate dispatched stays where its map put it (its
    hooks move the inputs), so only the inputs' dtype follows it."""
    if dispatched:
        if placement.device is not None:
            raise UsageError("give --device-map or --device, not both")
        target = _floating_dtype(module)
        moved = (
            tuple(_cast(a, target) for a in args),
            {k: _cast(v, target) for k, v in kwargs.items()},
        )
        return Placed(module, *moved, "device map", describe(torch.device("cpu"), module)[1])
    device = resolve(placement, module, loaded=not live)
    module, args, kwargs = apply(module, args, kwargs, device, placement, live)
    return Placed(module, args, kwargs, *describe(device, module))


def _cast(value: Any, dtype: torch.dtype | None) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and dtype is not None:
        return value.to(dtype)
    return value
