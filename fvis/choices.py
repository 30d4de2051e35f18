"""User-facing choices, defined once for the library and the CLI.

Kept free of heavy imports so ``fvis --help`` can build its option lists without torch,
numpy or Pillow; ``fvis.capture`` and ``fvis.render`` re-export them.
"""

from __future__ import annotations

from enum import StrEnum


class Mode(StrEnum):
    """How the forward pass runs: ``grad`` makes the grad report meaningful."""

    GRAD = "grad"
    NO_GRAD = "no-grad"
    INFERENCE = "inference"


class What(StrEnum):
    """Which tensors of each chosen module to capture: what it returns, receives, or both."""

    OUTPUT = "output"
    INPUT = "input"
    BOTH = "both"


class Cmap(StrEnum):
    """Colour map for finite values, low to high."""

    GRAY = "gray"
    VIRIDIS = "viridis"
    MAGMA = "magma"
    COOLWARM = "coolwarm"


class NormScope(StrEnum):
    """Normalise each channel on its own, or all shown channels together (grids only)."""

    CHANNEL = "channel"
    GLOBAL = "global"
