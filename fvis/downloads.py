"""Builders that try to download weights (torchvision's ``weights_backbone`` default, hubs).

fvis loads weights from the checkpoint it was given and never downloads: an ``--arch``
builder that reaches for the network fails with a bare ``<urlopen error ...>``. This tells
that case apart, from the exception chain and the frames it passed through, so the message
can say what happened and which keyword arguments turn the download off.
"""

from __future__ import annotations

import socket
import urllib.error
from collections.abc import Iterator

from fvis.errors import ModelInputError, first_line

_NETWORK_ERRORS = (urllib.error.URLError, socket.gaierror, socket.timeout, ConnectionError)
# Functions that only run to fetch weights (torch.hub, huggingface_hub, timm).
_DOWNLOADERS = frozenset(
    {
        "download_url_to_file",
        "load_state_dict_from_url",
        "load_url",
        "hf_hub_download",
        "snapshot_download",
        "load_pretrained",
    }
)


def tried_to_download(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a network failure or was raised while fetching.

    >>> tried_to_download(urllib.error.URLError("no network"))
    True
    """
    for link in _chain(exc):
        if isinstance(link, _NETWORK_ERRORS):
            return True
        frame = link.__traceback__
        while frame is not None:
            if frame.tb_frame.f_code.co_name in _DOWNLOADERS:
                return True
            frame = frame.tb_next
    return False


def download_refusal(spec: str, exc: BaseException) -> ModelInputError:
    return ModelInputError(
        f"--arch {spec} tried to download pretrained weights while building the model "
        f"({type(exc).__name__}: {first_line(exc, 200)}); fvis never downloads",
        hint="build it without them, e.g. --arch-kwargs "
        '\'{"weights": null, "weights_backbone": null}\' (torchvision detection and '
        "segmentation builders take both; timm: pretrained false); the checkpoint's weights "
        "are loaded afterwards",
    )


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        link = link.__cause__ or link.__context__
