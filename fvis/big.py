"""Models bigger than memory: ``--device-map auto`` through accelerate (``fvis[big]``).

The weights are dispatched across the GPUs, the CPU and the disk as ``--max-memory`` allows
(``cpu=4GiB``, ``0=20GiB``); what fits nowhere is offloaded to ``--offload-folder`` (default: a
temporary folder, removed at exit) and loaded layer by layer during the forward by
accelerate's hooks, which run inside fvis's module hooks, so every capture sees the values
the layer computed. A Hugging Face folder loads straight into that map through
``from_pretrained`` (the full model is never in memory); any other checkpoint is loaded and
then dispatched.
"""

from __future__ import annotations

import atexit
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fvis.errors import OutputError, UsageError

DEVICE_MAPS = ("auto",)
_BUDGET = re.compile(
    r"\s*(cpu|mps|disk|cuda:\d+|\d+)\s*=\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", re.I
)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


@dataclass(frozen=True)
class BigModel:
    """``--device-map``, ``--max-memory`` and ``--offload-folder``."""

    device_map: str = "auto"
    max_memory: Mapping[str | int, int] = field(default_factory=dict)  # bytes per device
    offload_folder: Path | None = None
    dtype: str | None = None  # --dtype: cast before dispatch (fvis.placement.DTYPES)


def parse(
    device_map: str | None,
    max_memory: Sequence[str],
    offload: Path | None,
    dtype: str | None = None,
) -> Any:
    """The options as a ``BigModel``, or None without ``--device-map``.

    >>> parse("auto", ["cpu=4GiB,0=20GB"], None).max_memory
    {'cpu': 4294967296, 0: 20000000000}
    """
    if device_map is None:
        if max_memory or offload:
            raise UsageError("--max-memory and --offload-folder need --device-map auto")
        return None
    if device_map not in DEVICE_MAPS:
        raise UsageError(f"--device-map {device_map!r}: only 'auto' is supported")
    budgets: dict[str | int, int] = {}
    for item in (part for text in max_memory for part in text.split(",") if part.strip()):
        match = _BUDGET.fullmatch(item)
        if match is None:
            raise UsageError(
                f"--max-memory {item.strip()!r}: write DEVICE=SIZE, e.g. cpu=4GiB or 0=20GiB"
            )
        key = match.group(1).lower().removeprefix("cuda:")
        unit = (match.group(3) or "").upper()
        budgets[int(key) if key.isdigit() else key] = int(float(match.group(2)) * _UNITS[unit])
    from fvis.placement import parse as parse_placement

    return BigModel(device_map, budgets, offload, parse_placement(None, dtype).dtype)


def require_accelerate() -> Any:
    try:
        import accelerate
    except ImportError:
        raise UsageError(
            "--device-map needs accelerate", hint="install the extra: pip install 'fvis[big]'"
        ) from None
    return accelerate


def offload_folder(big: BigModel) -> Path:
    """The folder offloaded weights go to: the one given (it must be empty, so nothing the
    user had is overwritten), else a temporary one removed at exit."""
    if big.offload_folder is None:
        folder = Path(tempfile.mkdtemp(prefix="fvis-offload-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        return folder
    folder = big.offload_folder
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise OutputError(
            f"--offload-folder {folder} is not an empty folder",
            hint="offloaded weights are written there: give a new or empty folder",
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"--offload-folder {folder}: {exc.strerror or exc}") from None
    return folder


def pretrained_kwargs(big: BigModel) -> dict[str, Any]:
    """What ``from_pretrained`` takes for this map (a Hugging Face folder)."""
    require_accelerate()
    kwargs: dict[str, Any] = {
        "device_map": big.device_map,
        "offload_folder": str(offload_folder(big)),
    }
    if big.max_memory:
        kwargs["max_memory"] = dict(big.max_memory)
    if big.dtype:
        from fvis.placement import DTYPES

        kwargs["dtype"] = DTYPES[big.dtype]
    return kwargs


def dispatch(model: Any, big: BigModel) -> tuple[Any, str]:
    """A loaded model dispatched by accelerate as ``big`` says; returns the note."""
    accelerate = require_accelerate()
    if big.dtype:
        from fvis.placement import DTYPES

        model = model.to(DTYPES[big.dtype])
    memory = dict(big.max_memory) or None
    device_map = accelerate.infer_auto_device_map(model, max_memory=memory)
    if device_map.get("") == "disk":  # the whole model offloaded: accelerate needs its parts
        device_map = _children_on_disk(model)
    folder = offload_folder(big)
    main = "cpu" if all(d in ("cpu", "disk") for d in device_map.values()) else None
    kwargs = {"main_device": main} if main else {}
    model = accelerate.dispatch_model(
        model, device_map=device_map, offload_dir=str(folder), **kwargs
    )
    return model, describe(device_map, folder)


def _children_on_disk(model: Any) -> dict[str, str]:
    if model._parameters or model._buffers or not model._modules:
        raise UsageError(
            "--max-memory leaves no room on any device, and the model's own weights cannot be "
            "offloaded without room for one layer",
            hint="give a larger budget",
        )
    return {name: "disk" for name in model._modules}


def describe(device_map: Mapping[str, Any], folder: Path | None) -> str:
    """``device map auto: 1 module on cpu, 7 on disk (offloaded to DIR)``."""
    counts: dict[str, int] = {}
    for where in device_map.values():
        counts[str(where)] = counts.get(str(where), 0) + 1
    parts = ", ".join(f"{n} on {where}" for where, n in counts.items())
    disk = f" (offloaded to {folder})" if "disk" in counts and folder is not None else ""
    return f"device map auto: {parts}{disk}"
