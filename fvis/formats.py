"""Tell checkpoint formats apart by content, never by extension, and name wrong files plainly.

Nothing here imports torch: sniffing must be cheap and must not trust the file.
"""

from __future__ import annotations

import json
import struct
import zipfile
import zlib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from fvis.errors import BadFileError, RefusedError, UsageError
from fvis.layers import TensorMeta

# The largest safetensors header we accept (the format's own limit is 100 MB).
_MAX_SAFETENSORS_HEADER = 100_000_000


class FileKind(StrEnum):
    """The checkpoint formats fvis reads."""

    TORCH_ZIP = "torch-zip"  # torch.save: state dict, training dict or pickled module
    LEGACY_PICKLE = "torch-legacy"  # torch.save(..., _use_new_zipfile_serialization=False)
    TORCHSCRIPT = "torchscript"
    EXPORT_PROGRAM = "pt2"  # torch.export.save
    SAFETENSORS = "safetensors"


@dataclass(frozen=True)
class Sniffed:
    """What a file is, and for zip archives the folder every entry lives under."""

    path: Path
    kind: FileKind
    prefix: str = ""  # "archive/" for zip formats


@dataclass(frozen=True)
class Limits:
    """Resource limits checked before torch reads a zip checkpoint."""

    max_model_bytes: int | None = None  # total declared size of the archive's entries
    verify_crc: bool | None = None  # None: verify files up to CRC_AUTO_LIMIT bytes


CRC_AUTO_LIMIT = 2 << 30  # verifying CRCs reads the whole file: skip it above 2 GiB by default
_MAX_PICKLE_BYTES = 1 << 30  # data.pkl holds the object tree, never the tensor data
_MAX_DEFLATED_BYTES = 64 << 20  # TorchScript deflates only its code and debug tables
_MAX_DEFLATE_RATIO = 200


# What reading a damaged zip can raise: bad structure, bad deflate data, encrypted or
# unsupported entries (RuntimeError / NotImplementedError), short reads, missing members.
ZIP_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile,
    zlib.error,
    OSError,
    ValueError,
    EOFError,
    KeyError,
    RuntimeError,
    NotImplementedError,
)

# Magic numbers of files people pass by mistake, and what to call them.
_WRONG_FILES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"%PDF", "a PDF document"),
    (b"\x89HDF", "an HDF5 file (Keras .h5?)"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"BZh", "a bzip2 archive"),
    (b"\xfd7zXZ", "an xz archive"),
    (b"7z\xbc\xaf", "a 7-Zip archive"),
    (b"\x7fELF", "an executable (ELF)"),
)


def sniff(path: Path, limits: Limits = Limits()) -> Sniffed:
    """Classify a model file by its bytes.

    >>> sniff(Path("model.pt")).kind          # doctest: +SKIP
    <FileKind.TORCH_ZIP: 'torch-zip'>

    Raises ``UsageError`` for a missing path or a folder and ``BadFileError`` (naming what
    the file looks like instead) for anything that is not a checkpoint.
    """
    _require_file(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(4096)
    except OSError as exc:
        raise BadFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    if size == 0 and not head:
        raise BadFileError(f"{path} is empty (0 bytes), not a PyTorch checkpoint")
    if _looks_like_safetensors(head, size):
        return Sniffed(path, FileKind.SAFETENSORS)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return _sniff_zip(path, limits)
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return Sniffed(path, FileKind.LEGACY_PICKLE)
    raise BadFileError(
        f"{path} is {_describe_other(head)}, not a PyTorch checkpoint", hint=_wrong_file_hint(head)
    )


def _require_file(path: Path) -> None:
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if path.is_dir():
        raise UsageError(f"{path} is a folder, not a checkpoint file")
    if not path.is_file():  # a FIFO or device would block or never end
        raise BadFileError(f"{path} is not a regular file")


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    # Checked before the pickle test: the header length's low byte can be 0x80.
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 2 <= header_len <= min(size - 8, _MAX_SAFETENSORS_HEADER) and head[8:9] == b"{"


def _describe_other(head: bytes) -> str:
    for magic, label in _WRONG_FILES:
        if head.startswith(magic):
            return label
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "a WebP image"
    if head.startswith(b"BM") and len(head) > 14:
        return "a BMP image"
    if head.startswith(b"\x08") and b"onnx" in head[:64].lower():
        return "an ONNX model"
    if _is_text(head):
        return "a text file"
    return "of a format fvis does not know"


def _wrong_file_hint(head: bytes) -> str | None:
    label = _describe_other(head)
    if "image" in label or "NumPy" in label:
        return "the model comes first and the input after --input: fvis dump MODEL --input IMAGE"
    if "ONNX" in label:
        return "fvis reads PyTorch checkpoints; export the model with torch.save or torch.export"
    return None


def _is_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in text)
    return printable >= 0.95 * max(len(text), 1)


def _sniff_zip(path: Path, limits: Limits = Limits()) -> Sniffed:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            preflight_zip(path, archive, limits)
            twice = duplicate_members(archive)
    except ZIP_ERRORS as exc:
        raise BadFileError(
            f"{path} is a corrupt or truncated zip archive ({exc})",
            hint="copy or download the checkpoint again",
        ) from None
    prefix = _single_top_folder(path, names)
    kind = _zip_kind(path, prefix, set(names))
    if twice and kind is not FileKind.EXPORT_PROGRAM:  # .pt2 archives are checked on loading
        # zipfile reads the last copy of a name and torch's reader may pick another one, so
        # what fvis checks need not be what torch loads; torch.save never writes a name twice.
        raise RefusedError(
            f"{path} holds more than one zip entry named {', '.join(twice[:3])}: "
            "zip readers disagree on which copy is real, so fvis cannot vouch for what would "
            "be loaded",
            hint="torch.save never writes this; get the checkpoint again from its source",
        )
    return Sniffed(path, kind, prefix)


def _zip_kind(path: Path, prefix: str, entries: set[str]) -> FileKind:
    if f"{prefix}constants.pkl" in entries:
        return FileKind.TORCHSCRIPT
    if f"{prefix}archive_format" in entries or f"{prefix}models/model.json" in entries:
        return FileKind.EXPORT_PROGRAM
    if f"{prefix}data.pkl" in entries:
        return FileKind.TORCH_ZIP
    raise BadFileError(f"{path} is a zip archive but not a PyTorch checkpoint (no data.pkl)")


def duplicate_members(archive: zipfile.ZipFile) -> list[str]:
    """Names that occur more than once in the archive's directory, each listed once."""
    seen: set[str] = set()
    twice: dict[str, None] = {}
    for name in archive.namelist():
        if name in seen:
            twice[name] = None
        seen.add(name)
    return list(twice)


def preflight_zip(path: Path, archive: zipfile.ZipFile, limits: Limits = Limits()) -> None:
    """Refuse resource bombs and damage before torch reads the archive.

    Tensor data and ``data.pkl`` must be stored uncompressed (torch never compresses them);
    every entry must lie inside the file; the declared total must fit ``max_model_bytes``;
    CRCs are verified (for files up to 2 GiB unless ``verify_crc`` says otherwise).
    """
    size = path.stat().st_size
    total = 0
    for info in archive.infolist():
        _check_entry(path, info, size)
        total += info.file_size
    if limits.max_model_bytes is not None and total > limits.max_model_bytes:
        raise BadFileError(
            f"{path} declares {total:,} bytes of content, more than "
            f"--max-model-bytes {limits.max_model_bytes:,}"
        )
    verify = limits.verify_crc if limits.verify_crc is not None else size <= CRC_AUTO_LIMIT
    if verify:
        bad = archive.testzip()
        if bad is not None:
            raise BadFileError(
                f"{path} is damaged: the checksum of {bad} does not match",
                hint="copy or download the checkpoint again",
            )


def _check_entry(path: Path, info: zipfile.ZipInfo, size: int) -> None:
    name = info.filename
    if name.startswith("/") or ".." in name.split("/") or "\\" in name:
        raise BadFileError(f"{path} holds an entry with an unsafe name: {name!r}")
    if info.header_offset + info.compress_size > size:
        raise BadFileError(
            f"{path} is truncated: entry {name} runs past the end of the file",
            hint="copy or download the checkpoint again",
        )
    is_tensor_data = "/data/" in name or name.endswith("/data.pkl")
    if info.compress_type == zipfile.ZIP_STORED:
        if info.file_size != info.compress_size:
            raise BadFileError(f"{path} is damaged: stored entry {name} declares two sizes")
        if name.endswith("data.pkl") and info.file_size > _MAX_PICKLE_BYTES:
            raise BadFileError(
                f"{path}: {name} declares {info.file_size:,} bytes of pickle, "
                "more than any checkpoint needs"
            )
        return
    if is_tensor_data:
        raise BadFileError(
            f"{path}: entry {name} is compressed; torch never compresses "
            "tensor data, so this is not a checkpoint torch wrote"
        )
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size > _MAX_DEFLATED_BYTES or ratio > _MAX_DEFLATE_RATIO:
        raise BadFileError(
            f"{path}: entry {name} would expand to {info.file_size:,} bytes "
            f"(ratio {ratio:.0f}); refusing a possible zip bomb"
        )


def _single_top_folder(path: Path, names: list[str]) -> str:
    tops = {name.split("/", 1)[0] for name in names}
    if len(tops) != 1 or not all("/" in name for name in names):
        raise BadFileError(
            f"{path} is a zip archive but not a PyTorch checkpoint "
            f"(expected one top-level folder, found {len(tops)})"
        )
    return tops.pop() + "/"


def read_safetensors_header(path: Path) -> dict[str, dict[str, object]]:
    """The JSON header of a safetensors file, validated by the safetensors library."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            keys = list(handle.keys())
        with path.open("rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(header_len))
    except Exception as exc:  # the library raises its own SafetensorError and OSError
        raise BadFileError(f"{path} is a damaged safetensors file: {exc}") from None
    header.pop("__metadata__", None)
    return {key: header[key] for key in keys}


def safetensors_metas(path: Path) -> dict[str, TensorMeta]:
    """Name, shape and dtype of every tensor of a safetensors file, from its header alone."""
    return {
        name: TensorMeta(
            name,
            tuple(int(d) for d in info["shape"]),  # type: ignore[attr-defined]
            str(info["dtype"]).lower(),
        )
        for name, info in read_safetensors_header(path).items()
    }
