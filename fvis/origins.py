"""Where a module's code lives: the user's own code, or an installed library.

A cut inside torchvision's region proposal network is there by design (it detaches its
proposals); the same cut in the user's wrapper is a bug. The difference is where the class's
``forward`` is defined: under site-packages / dist-packages, the standard library, or the torch
package itself means library code.
"""

from __future__ import annotations

import functools
import inspect
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Origin:
    """The file and line of a module class's ``forward``, and whether it is library code."""

    file: str | None
    line: int | None
    library: bool

    @property
    def where(self) -> str:
        if self.file is None:
            return "source unknown"
        return f"{self.file}:{self.line}" if self.line else self.file


@functools.cache
def origin_of(cls: type) -> Origin:
    """Where ``cls.forward`` is defined.

    >>> origin_of(torch.nn.Linear).library                           # doctest: +SKIP
    True
    """
    forward = getattr(cls, "forward", None)
    target = forward if inspect.isfunction(forward) else cls
    try:
        file = inspect.getsourcefile(target) or inspect.getfile(target)
    except (TypeError, OSError):
        return Origin(None, None, _module_is_library(cls.__module__))
    try:
        line: int | None = inspect.getsourcelines(target)[1]
    except (OSError, TypeError, IndexError):
        line = None
    return Origin(file, line, is_library_file(file))


def is_library_file(file: str) -> bool:
    """Under an installed-packages folder, the standard library, or torch's own package."""
    path = Path(file).resolve()
    if any(part in ("site-packages", "dist-packages") for part in path.parts):
        return True
    return any(path.is_relative_to(root) for root in _library_roots())


@functools.cache
def _library_roots() -> tuple[Path, ...]:
    import torch

    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    roots.add(str(Path(torch.__file__).parent))
    return tuple(Path(r).resolve() for r in roots)


def _module_is_library(module_name: str) -> bool:
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None)
    return bool(file) and is_library_file(file)
