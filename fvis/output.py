"""The output folder: atomic writes, a manifest of what fvis wrote, and nothing else touched.

Rules (documented in the README):

- every file is first written completely to a hidden temporary in the same folder; only when
  all are complete are they renamed into place, and ``.fvis-manifest.json`` (the list of what
  fvis wrote) comes last. Any failure or interrupt before that deletes the temporaries, so the
  folder holds exactly what it held before: no partial file, no new file;
- a folder holding files fvis did not write is refused unless ``overwrite``; even then only
  files in fvis's own manifest are replaced, and a name clash with a foreign file is refused;
- a rerun into a folder fvis wrote replaces its files and removes the ones it no longer writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from fvis.errors import OutputError

MANIFEST = ".fvis-manifest.json"
MANIFEST_SCHEMA = "fvis.manifest/1"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class OutputDir:
    """A folder fvis writes into, in two phases so a failure leaves nothing new behind.

    ``write`` stages each file completely as a hidden temporary in the folder; ``commit``
    renames them all into place and writes the manifest last; ``abort`` (or leaving a ``with``
    block by an exception, Ctrl-C included) deletes the temporaries, so the folder holds
    exactly what it held before. Create with ``OutputDir.open(path, overwrite)``.
    """

    def __init__(self, root: Path, previous: set[str]) -> None:
        self.root = root
        self._previous = previous  # files listed in the old manifest
        self._staged: dict[str, Path] = {}  # final name -> complete temporary
        self._written: list[str] = []
        self._mode = 0o666 & ~_umask()
        self._created: list[Path] = []  # folders open() made, removed again on abort

    @classmethod
    def open(cls, root: Path, overwrite: bool = False) -> OutputDir:
        """Check the folder can be used (creating it if needed) before any work is done."""
        if root.exists() and not root.is_dir():
            raise OutputError(
                f"--out {root} is a file, not a folder", hint="choose another --out folder"
            )
        created = [p for p in (root, *root.parents) if not p.exists()]
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create --out {root}: {exc.strerror or exc}") from None
        previous = _read_manifest(root)
        foreign = sorted(
            p.name
            for p in root.iterdir()
            if p.name != MANIFEST and p.name not in previous and not _is_temp(p.name)
        )
        if foreign and not overwrite:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise OutputError(
                f"--out {root} holds {len(foreign)} files fvis did not write ({shown})",
                hint="choose an empty or new folder, or pass --overwrite (fvis then replaces "
                "only its own files)",
            )
        folder = cls(root, previous)
        folder._created = list(reversed(created))  # outermost first
        return folder

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, exc_type: object, *_rest: object) -> None:
        if exc_type is not None:
            self.abort()

    def check_names(self, names: list[str]) -> None:
        """Refuse before writing anything if a new file would replace a file fvis did not write."""
        clashes = [n for n in names if (self.root / n).exists() and n not in self._previous]
        if clashes:
            raise OutputError(
                f"--out {self.root}: {clashes[0]} exists and was not written by "
                "fvis; it is left untouched",
                hint="choose another --out folder",
            )

    def write_bytes(self, name: str, data: bytes) -> None:
        self.write(name, lambda fh: fh.write(data))

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode("utf-8"))

    def write(self, name: str, writer: Callable[[IO[bytes]], object]) -> None:
        """Stage ``name``: ``writer(file)`` writes it completely to a temporary."""
        if "/" in name or "\\" in name or name in ("", ".", "..") or name == MANIFEST:
            raise OutputError(f"refusing to write {name!r}: not a plain file name")
        self._staged[name] = self._complete_temporary(name, writer)

    def _complete_temporary(self, name: str, writer: Callable[[IO[bytes]], object]) -> Path:
        return _write_temporary(
            self.root / name,
            writer,
            self._mode,
            hint="check free space and permissions of the output folder",
        )

    def commit(self, extra: dict[str, object] | None = None) -> Path:
        """Move every staged file into place, the manifest last; all or nothing.

        Files being replaced are first moved aside; if anything fails (a rename, Ctrl-C),
        the new files are removed and the old ones put back. Then files the previous run
        wrote and this one did not are removed (they were fvis's own).
        """
        names = sorted(self._staged)
        manifest = {"schema": MANIFEST_SCHEMA, "files": names, **(extra or {})}
        data = (json.dumps(manifest, indent=2) + "\n").encode()
        self._staged[MANIFEST] = self._complete_temporary(MANIFEST, lambda fh: fh.write(data))
        placed: list[str] = []
        backups: dict[str, Path] = {}
        try:
            for name in [*names, MANIFEST]:
                target = self.root / name
                if target.exists():
                    backups[name] = self._aside(name)
                os.replace(self._staged[name], target)
                placed.append(name)
        except BaseException as exc:
            self._roll_back(placed, backups)
            if isinstance(exc, OSError):
                raise OutputError(f"cannot finish {self.root}: {exc.strerror or exc}") from None
            raise
        self._staged.clear()
        self._written = names
        stale = [self.root / n for n in self._previous if n not in names]
        for leftover in [*backups.values(), *stale]:
            with contextlib.suppress(OSError):
                leftover.unlink()
        return self.root / MANIFEST

    def _aside(self, name: str) -> Path:
        fd, aside = tempfile.mkstemp(prefix=f".{name[:40]}.", suffix=".fvis-tmp", dir=self.root)
        os.close(fd)
        os.replace(self.root / name, aside)
        return Path(aside)

    def _roll_back(self, placed: list[str], backups: dict[str, Path]) -> None:
        for name in placed:
            with contextlib.suppress(OSError):
                (self.root / name).unlink()
        for name, aside in backups.items():
            with contextlib.suppress(OSError):
                os.replace(aside, self.root / name)
        self.abort()

    def abort(self) -> None:
        """Delete every staged temporary and any folder ``open`` created: the disk is left as
        it was."""
        for tmp in self._staged.values():
            with contextlib.suppress(OSError):
                tmp.unlink()
        self._staged.clear()
        for folder in reversed(self._created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty

    @property
    def written(self) -> list[str]:
        return list(self._written)


def write_file_atomic(path: Path, data: bytes) -> None:
    """Replace one file the user named (a baseline, a JUnit report) atomically."""
    if path.is_dir():
        raise OutputError(f"{path} is a folder, not a file")
    tmp = _write_temporary(path, lambda fh: fh.write(data), 0o666 & ~_umask())
    try:
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _write_temporary(
    target: Path, writer: Callable[[IO[bytes]], object], mode: int, hint: str | None = None
) -> Path:
    """``writer(file)`` writes ``target``'s content completely into a synced temporary beside
    it, for the caller to rename into place; on any failure the temporary is gone."""
    try:
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{target.name[:40]}.", suffix=".fvis-tmp", dir=target.parent
        )
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            writer(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)  # closing may fail again (a full disk): unlink anyway
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {target}: {exc.strerror or exc}", hint=hint) from None
        raise
    return tmp


def _is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(".fvis-tmp")


def _read_manifest(root: Path) -> set[str]:
    path = root / MANIFEST
    if not path.is_file():
        return set()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = data.get("files", []) if isinstance(data, dict) else []
    except (OSError, ValueError):
        return set()
    return {f for f in files if isinstance(f, str) and "/" not in f and f not in ("", "..")}
