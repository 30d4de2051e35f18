"""The public names of ``fvis`` stay the documented functions whatever was imported first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Each snippet touches the package in a different order; every one must end with the functions.
ORDERS = [
    "import fvis; fvis.Mode; print(fvis.capture.__module__, fvis.render.__name__)",
    "import fvis.capture, fvis; print(fvis.capture.__module__, fvis.render.__name__)",
    "import fvis.render, fvis.gallery, fvis.grads, fvis; fvis.Capture; "
    "print(fvis.capture.__module__, fvis.render.__name__)",
    "from fvis import capture, render; print(capture.__module__, render.__name__)",
]


@pytest.mark.parametrize("code", ORDERS)
def test_public_functions_are_not_shadowed_by_submodules(code: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["fvis.capture", "render_capture"]


def test_capture_is_callable_after_its_module_is_imported() -> None:
    import torch

    import fvis
    import fvis.capture  # the import that used to rebind the name

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    result = fvis.capture(model, [torch.ones(1, 2)], ["0"])
    assert [c.label for c in result.captures] == ["0"]
    assert fvis.Mode.GRAD.value == "grad"


def test_submodules_stay_importable() -> None:
    from fvis.capture import capture as function
    from fvis.render import render as array_render

    assert sys.modules["fvis.capture"].capture is function
    assert sys.modules["fvis.render"].render is array_render
