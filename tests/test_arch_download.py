"""An --arch builder that tries to download weights: said so, with the kwargs that stop it."""

from __future__ import annotations

from pathlib import Path

import pytest

from fvis.errors import ExitStatus, ModelInputError
from fvis.loading import build_arch

BUILDERS = """
import urllib.error

import torch


def hub():  # what torchvision does for weights_backbone by default
    return torch.hub.load_state_dict_from_url("https://example.invalid/w.pth")


def offline():
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def wrapped():
    try:
        offline()
    except Exception as exc:
        raise RuntimeError("could not build") from exc


def broken():
    raise ValueError("a real bug in the builder")
"""


@pytest.fixture
def builders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import torch

    def no_network(*args: object, **kwargs: object) -> None:
        import urllib.error

        raise urllib.error.URLError("<urlopen error [Errno -3] no network in the test>")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))  # nothing cached
    path = tmp_path / "builders.py"
    path.write_text(BUILDERS)
    return path


@pytest.mark.parametrize("name", ["hub", "offline", "wrapped"])
def test_a_download_attempt_is_named_with_the_kwargs_that_stop_it(
    builders: Path, name: str
) -> None:
    with pytest.raises(ModelInputError, match="tried to download pretrained weights") as caught:
        build_arch(f"{builders}:{name}", {})
    assert caught.value.exit_status is ExitStatus.MODEL_INPUT
    assert "weights_backbone" in (caught.value.hint or "")
    assert "--arch-kwargs" in (caught.value.hint or "")


def test_other_build_failures_are_not_called_downloads(builders: Path) -> None:
    with pytest.raises(ModelInputError, match="failed to build the model") as caught:
        build_arch(f"{builders}:broken", {})
    assert "download" not in str(caught.value) and caught.value.hint is None
