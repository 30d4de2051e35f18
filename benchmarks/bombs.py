"""Timing checks for inputs that used to take quadratic time in ``fvis layers``.

    python benchmarks/bombs.py            # exits 1 if a case is slow or scales worse than linear

- ``blank-lines``: a TorchScript archive whose generated code holds N blank lines (a leading
  ``\\s+`` in the ``__buffers__`` regex once retried across all of them: 200k lines, minutes).
- ``alias-tree``: one module object referenced under many names at every level (``walk`` once
  recomputed each subtree per name).

Each case is timed at size N and 2N: linear work roughly doubles, quadratic quadruples.
Nothing in this folder is part of the pytest suite.
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from fvis.loading import inspect_model

MAX_RATIO = 3.0  # time(2N) / time(N): linear is ~2, quadratic ~4
MAX_SECONDS = 5.0  # for the larger size of each case


def blank_lines_archive(folder: Path, lines: int) -> Path:
    """A scripted Conv+BatchNorm whose code files gain ``lines`` blank lines after each class."""
    warnings.simplefilter("ignore")
    plain = folder / f"plain{lines}.pt"
    torch.jit.save(torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))), plain)
    path = folder / f"blank{lines}.pt"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w") as out:
        for info in src.infolist():
            data = src.read(info)
            if "/code/" in info.filename and info.filename.endswith(".py"):
                data = data.replace(b"):\n", b"):\n" + b"\n" * lines, 1)
            out.writestr(info, data, compress_type=zipfile.ZIP_STORED)  # no ratio cap
    return path


def alias_tree(folder: Path, names: int, levels: int = 40) -> Path:
    """``levels`` modules, each holding the next one under ``names`` names."""
    node: nn.Module = nn.Linear(2, 2)
    for _ in range(levels):
        parent = nn.Module()
        for i in range(names):
            parent.add_module(f"n{i}", node)
        node = parent
    path = folder / f"alias{names}.pt"
    torch.save(node, path)
    return path


def seconds(path: Path) -> tuple[float, int]:
    start = time.perf_counter()
    inspect_model(path)
    return time.perf_counter() - start, path.stat().st_size


def main() -> int:
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cases: dict[str, Callable[[int], Path]] = {
            "blank-lines": lambda n: blank_lines_archive(folder, n),
            "alias-tree": lambda n: alias_tree(folder, n),
        }
        sizes = {"blank-lines": 100_000, "alias-tree": 500}
        for name, build in cases.items():
            n = sizes[name]
            small, _ = seconds(build(n))
            large, size = seconds(build(2 * n))
            ratio = large / max(small, 1e-3)
            slow = large > MAX_SECONDS or (large > 0.2 and ratio > MAX_RATIO)
            failed |= slow
            print(
                f"{name:12} N={n:>7,}: {small:6.3f} s   2N ({size / 1e3:,.0f} KB): {large:6.3f} s"
                f"   ratio {ratio:4.1f}   {'SLOW' if slow else 'ok'}"
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
