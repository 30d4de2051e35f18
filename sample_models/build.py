"""Write every sample in every checkpoint format fvis reads.

    python -m sample_models.build OUT_DIR [--only NAME ...]

For each sample NAME: ``NAME.state_dict.pt``, ``NAME.training.pt`` (a DDP-style training
dict), ``NAME.module.pt`` (a pickled module), ``NAME.torchscript.pt``, ``NAME.pt2``
(``torch.export``), ``NAME.safetensors`` and ``NAME.input.pt`` (the example input).
Each file is serialised in memory, then written to a temporary name in ``OUT_DIR`` and
renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_save
from torch import Tensor, nn

from sample_models.zoo import SAMPLES, build, example_input

Echo = Callable[[str], None]


class _Skip(Exception):
    """A format this sample cannot be written in; the message says why, in one line."""


def build_all(
    out_dir: Path, names: Iterable[str] | None = None, *, echo: Echo = print
) -> list[Path]:
    """Write every format of each sample in ``names`` (default: all) and return the paths.

    Unknown names raise ``ValueError`` before anything is written.

    >>> paths = build_all(Path("/tmp/zoo"), ["inner_outer"])  # doctest: +SKIP
    >>> sorted(p.name for p in paths)[:2]  # doctest: +SKIP
    ['inner_outer.input.pt', 'inner_outer.module.pt']
    """
    chosen = list(SAMPLES) if names is None else list(dict.fromkeys(names))
    unknown = [name for name in chosen if name not in SAMPLES]
    if unknown:
        raise ValueError(f"no sample {unknown[0]!r}; choose from: {', '.join(SAMPLES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with warnings.catch_warnings():
        # torch.jit.* warns that TorchScript is deprecated; we write it on purpose.
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in chosen:
            written += _build_sample(name, out_dir, echo)
    return written


def _build_sample(name: str, out_dir: Path, echo: Echo) -> list[Path]:
    """Write each format of one sample; a format that cannot be made is skipped with a note."""
    # A fresh model per format: export and tracing run forward, and a forward can leave
    # state behind (StoresInplace keeps its last intermediate on self).
    formats: list[tuple[str, Callable[[], bytes]]] = [
        ("state_dict.pt", lambda: _torch_bytes(build(name).state_dict())),
        ("training.pt", lambda: _torch_bytes(_training_dict(build(name)))),
        ("module.pt", lambda: _torch_bytes(build(name))),
        ("torchscript.pt", lambda: _torchscript_bytes(name, echo)),
        ("pt2", lambda: _export_bytes(name, echo)),
        ("safetensors", lambda: _safetensors_bytes(build(name))),
        ("input.pt", lambda: _torch_bytes(example_input(name))),
    ]
    written: list[Path] = []
    for suffix, make in formats:
        path = out_dir / f"{name}.{suffix}"
        try:
            data = make()
        except _Skip as skip:
            echo(f"skipped {path.name}: {skip}")
            continue
        _write_atomic(path, data)
        echo(f"wrote {path} ({len(data):,} bytes)")
        written.append(path)
    return written


def _torch_bytes(obj: object) -> bytes:
    """``torch.save(obj)`` into memory."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _training_dict(model: nn.Module) -> dict[str, Any]:
    """What a DDP training loop saves: ``module.``-prefixed weights plus optimizer and epoch."""
    weights = {f"module.{key}": value for key, value in model.state_dict().items()}
    return {"model": weights, "optimizer": {"lr": 0.1}, "epoch": 3}


def _torchscript_bytes(name: str, echo: Echo) -> bytes:
    """``torch.jit.script`` the sample, or ``torch.jit.trace`` it (and say so) if that fails."""
    try:
        scripted = torch.jit.script(build(name))
    except Exception as error:
        echo(f"note: {name}: torch.jit.script failed ({_one_line(error)}); using torch.jit.trace")
        try:
            # strict=False: allows dict and list outputs.
            scripted = torch.jit.trace(build(name), (example_input(name),), strict=False)
        except Exception as trace_error:
            raise _Skip(f"torch.jit.trace failed too: {_one_line(trace_error)}") from None
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    return buffer.getvalue()


def _export_bytes(name: str, echo: Echo) -> bytes:
    """``torch.export.export`` the sample on its example input and save the program.

    Export's warnings are relayed as one-line notes (stores_inplace triggers one on purpose).
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            program = torch.export.export(build(name), (example_input(name),))
        except Exception as error:
            raise _Skip(f"torch.export failed: {_one_line(error)}") from None
    for warning in caught:
        if issubclass(warning.category, UserWarning):
            echo(f"note: {name}: torch.export warned: {_one_line_text(str(warning.message))}")
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def _safetensors_bytes(model: nn.Module) -> bytes:
    """The state dict as safetensors; clones so that tied or strided tensors are accepted."""
    tensors: dict[str, Tensor] = {
        key: value.detach().clone().contiguous() for key, value in model.state_dict().items()
    }
    return safetensors_save(tensors, metadata={"format": "pt"})


def _one_line(error: BaseException) -> str:
    """The first line of an exception message, with its type, cut to a readable length."""
    return _one_line_text(f"{type(error).__name__}: {str(error).strip()}")


def _one_line_text(text: str) -> str:
    """The first line of ``text``, cut to a readable length."""
    lines = text.strip().splitlines()
    first = lines[0] if lines else ""
    return first if len(first) <= 160 else first[:157] + "..."


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o644)  # mkstemp makes 0600 files
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sample_models.build OUT_DIR [--only NAME ...]``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m sample_models.build",
        description="Write every sample model in every checkpoint format fvis reads.",
    )
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="folder to write into")
    parser.add_argument(
        "--only",
        nargs="+",
        action="extend",
        choices=list(SAMPLES),
        metavar="NAME",
        help=f"build only these samples (default: all): {', '.join(SAMPLES)}",
    )
    args = parser.parse_args(argv)
    build_all(args.out_dir, args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
