"""fvis: see what a layer deep inside a PyTorch model sees, and whether it is on the graph.

The importable API is the product; the ``fvis`` command is a thin shell over it. Names are
imported lazily so ``import fvis`` (and ``fvis --help``) does not import torch.

>>> import fvis
>>> model = fvis.load_model("model.pt", fvis.LoadOptions(arch="pkg.models:Net"))  # doctest: +SKIP
>>> result = fvis.capture(model.module, [x], ["inner.relu"])                      # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "FvisError": "fvis.errors",
    "ExitStatus": "fvis.errors",
    "LoadOptions": "fvis.loading",
    "Trust": "fvis.loading",
    "load_model": "fvis.loading",
    "inspect_model": "fvis.loading",
    "sniff": "fvis.formats",
    "walk": "fvis.layers",
    "resolve": "fvis.layers",
    "node_from_module": "fvis.layers",
    "Mode": "fvis.capture",
    "Capture": "fvis.capture",
    "capture": "fvis.capture",
    "render": "fvis.gallery",
    "render_array": "fvis.render",
    "build_report": "fvis.report",
    "check": "fvis.api",
    "CheckOptions": "fvis.api",
    "run_backward": "fvis.backward",
    "RenderOptions": "fvis.render",
    "InputOptions": "fvis.inputs",
    "list_layers": "fvis.api",
    "dump": "fvis.api",
    "DumpOptions": "fvis.api",
    "diagnose": "fvis.grads",
    "Verdict": "fvis.grads",
    "resolve_model": "fvis.api",
    "watch": "fvis.watching",
    "Watch": "fvis.watching",
}

__all__ = sorted(_EXPORTS)


# Public names that differ from the name inside their module.
_RENAMED = {"render": "render_capture", "render_array": "render"}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), _RENAMED.get(name, name))
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fvis' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The package object: importing a submodule never rebinds a public name.

    Python's import system sets ``fvis.capture = <module fvis.capture>`` once the submodule is
    imported (here, as soon as anything from it is used), which would shadow the public
    function ``fvis.capture`` (and ``fvis.render``). Such an assignment is dropped, so the
    lazy ``__getattr__`` above keeps answering with the function. Submodules stay reachable
    through ``sys.modules`` and ``from fvis.capture import ...``.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
