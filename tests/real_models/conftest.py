"""Real third-party models (torchvision, timm, transformers) with random weights.

These tests need the libraries, which do not install beside the default test venv's torch
(torchvision needs torch 2.14.1). `.ci/run` builds a second venv for them and runs this folder
there: see the README ("Tests on real models"). Without the libraries the folder is not
collected, and the default run says so once. Models are built from tiny configs at test time;
nothing is downloaded.
"""

from __future__ import annotations

import importlib.util

import pytest

REQUIRED = ("torchvision", "transformers", "timm")
MISSING = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
if MISSING:
    collect_ignore_glob = ["test_*.py"]


def pytest_report_header() -> str:
    if MISSING:
        return f"tests/real_models: not collected ({', '.join(MISSING)} not installed)"
    return "tests/real_models: collected"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach a hub: a builder that tries to download fails at once."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
