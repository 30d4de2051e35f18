"""The output folder: atomic writes, a manifest of what fvis wrote, and nothing else touched.

Rules (documented in the README):

- every file is first written completely to a hidden temporary in the same folder; only when
  all are complete are they renamed into place, and ``.fvis-manifest.json`` (the list of what
  fvis wrote) comes last. Any failure or interrupt before that deletes the temporaries, so the
  folder holds exactly what it held before: no partial file, no new file;
- a folder holding files fvis did not write is refused unless ``overwrite``; even then only
  files in fvis's own manifest are replaced, and a name clash with a foreign file is refused;
- a rerun into a folder fvis wrote replaces its files and removes the ones it no longer writes;
- a symlink is never replaced or removed, and a manifest that is not a regular file holding a
  list of names is refused (nothing is deleted on its say-so);
- one run at a time: the folder is locked (``flock`` on the folder itself) from ``open`` to
  ``commit``; a second run waits up to ``LOCK_WAIT_S`` seconds, then fails.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from fvis.errors import OutputError

MANIFEST = ".fvis-manifest.json"
MANIFEST_SCHEMA = "fvis.manifest/1"
LOCK_WAIT_S = 5.0  # how long a second run into the same folder waits for the first


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
        self._lock: int | None = None  # the folder's descriptor, flock()ed while in use

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
        lock = _lock_folder(root)
        try:
            previous = _read_manifest(root)
        except BaseException:
            _unlock(lock)
            raise
        foreign = sorted(
            p.name
            for p in root.iterdir()
            if p.name != MANIFEST and p.name not in previous and not _is_temp(p.name)
        )
        if foreign and not overwrite:
            _unlock(lock)
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise OutputError(
                f"--out {root} holds {len(foreign)} files fvis did not write ({shown})",
                hint="choose an empty or new folder, or pass --overwrite (fvis then replaces "
                "only its own files)",
            )
        folder = cls(root, previous)
        folder._created = list(reversed(created))  # outermost first
        folder._lock = lock
        return folder

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, exc_type: object, *_rest: object) -> None:
        if exc_type is not None:
            self.abort()
        self._release()

    def __del__(self) -> None:  # an OutputDir dropped without commit or abort
        self._release()

    def _release(self) -> None:
        lock, self._lock = getattr(self, "_lock", None), None
        _unlock(lock)

    def check_names(self, names: list[str]) -> None:
        """Refuse before writing anything if a new file would replace a file fvis did not
        write, or any symlink (even one named like fvis's own file)."""
        clashes = [n for n in names if self._clashes(n)]
        if clashes:
            raise OutputError(
                f"--out {self.root}: {clashes[0]} exists and was not written by "
                "fvis; it is left untouched",
                hint="choose another --out folder",
            )

    def _clashes(self, name: str) -> bool:
        path = self.root / name
        return os.path.lexists(path) and (name not in self._previous or path.is_symlink())

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
        try:  # a symlink or a foreign file may have appeared since open()
            self.check_names(names)
            if (self.root / MANIFEST).is_symlink():
                raise _bad_manifest(self.root, "is not a regular file")
        except OutputError:
            self.abort()
            raise
        manifest = {"schema": MANIFEST_SCHEMA, "files": names, **(extra or {})}
        data = (json.dumps(manifest, indent=2) + "\n").encode()
        self._staged[MANIFEST] = self._complete_temporary(MANIFEST, lambda fh: fh.write(data))
        placed: list[str] = []
        backups: dict[str, Path] = {}
        try:
            for name in [*names, MANIFEST]:
                target = self.root / name
                if os.path.lexists(target):
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
        stale = [p for p in stale if not p.is_symlink()]  # fvis never writes links
        for leftover in [*backups.values(), *stale]:
            with contextlib.suppress(OSError):
                leftover.unlink()
        self._release()
        return self.root / MANIFEST

    def _aside(self, name: str) -> Path:
        fd, aside = tempfile.mkstemp(prefix=f".{name[:40]}.", suffix=".fvis-tmp", dir=self.root)
        os.close(fd)
        try:
            os.replace(self.root / name, aside)
        except BaseException:
            Path(aside).unlink(missing_ok=True)  # no empty temporary left behind
            raise
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
        self._release()
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
    """The names the previous run wrote. A manifest that is not a regular file, or does not
    hold a list of names, is refused: fvis deletes files on its say-so."""
    path = root / MANIFEST
    if not os.path.lexists(path):
        return set()
    if path.is_symlink() or not path.is_file():
        raise _bad_manifest(root, "is not a regular file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        raise _bad_manifest(root, "is not readable JSON") from None
    files = data.get("files", []) if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("schema", MANIFEST_SCHEMA) != MANIFEST_SCHEMA:
        raise _bad_manifest(root, f"is not an {MANIFEST_SCHEMA} manifest")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise _bad_manifest(root, "does not hold a list of file names")
    if any("\0" in f for f in files):
        raise _bad_manifest(root, "names a file with a NUL character")
    # Entries that are not plain names in this folder are never fvis's: ignore, never delete.
    return {f for f in files if f and "/" not in f and "\\" not in f and f not in (".", "..")}


def _bad_manifest(root: Path, problem: str) -> OutputError:
    return OutputError(
        f"--out {root}: {MANIFEST} {problem}; nothing was written or deleted",
        hint=f"if fvis wrote this folder, delete {root / MANIFEST}; else choose another --out",
    )


def _lock_folder(root: Path) -> int | None:
    """An exclusive ``flock`` on the folder itself (no lock file to leave behind), waiting up
    to ``LOCK_WAIT_S``; ``None`` where the file system cannot lock folders (some NFS)."""
    import fcntl

    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise OutputError(f"cannot open --out {root}: {exc.strerror or exc}") from None
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise OutputError(
                    f"--out {root} is in use by another fvis run (waited {LOCK_WAIT_S:g} s)",
                    hint="wait for it to finish, or choose another --out folder",
                ) from None
            time.sleep(0.05)
        except OSError as exc:
            if exc.errno not in (errno.EBADF, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                os.close(fd)
                raise OutputError(f"cannot lock --out {root}: {exc.strerror or exc}") from None
            os.close(fd)
            return None


def _unlock(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)  # closing the descriptor releases the flock
