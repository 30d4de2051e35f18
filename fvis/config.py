"""``[tool.fvis]`` in ``pyproject.toml``: defaults for a repository, overridden by flags."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fvis.errors import UsageError

MAX_NESTING = 32  # for --arch-kwargs and [tool.fvis] values: far beyond any real argument
KNOWN_KEYS = (
    "model",
    "arch",
    "arch-kwargs",
    "allow-modules",
    "input",
    "shape",
    "layers",
    "fail-on",
    "expect",
    "baseline",
    "device",
    "dtype",
)


@dataclass(frozen=True)
class Config:
    """Values from ``[tool.fvis]``; paths are resolved against the pyproject's folder."""

    file: Path
    model: Path | None = None
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    allow_modules: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    shape: str | None = None
    layers: tuple[str, ...] = ()
    fail_on: str | None = None
    expect: tuple[str, ...] = ()
    baseline: Path | None = None
    device: str | None = None  # --device (fvis.placement)
    dtype: str | None = None  # --dtype


def find_config(folder: Path) -> Config | None:
    """Read ``folder/pyproject.toml``'s ``[tool.fvis]``; ``None`` when there is none."""
    path = folder / "pyproject.toml"
    if not path.is_file():
        return None
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not valid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses per level of nested arrays and tables
        raise UsageError(f"{path} nests values too deeply to read") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    tool = data.get("tool", {})
    table = tool.get("fvis") if isinstance(tool, dict) else None
    if table is None:
        return None
    if not isinstance(table, dict):
        raise UsageError(f"{path}: [tool.fvis] must be a table")
    return _parse(path, table)


def _parse(path: Path, table: dict[str, Any]) -> Config:
    unknown = [k for k in table if k not in KNOWN_KEYS]
    if unknown:
        raise UsageError(
            f"{path}: unknown key {unknown[0]!r} in [tool.fvis]",
            hint="known keys: " + ", ".join(KNOWN_KEYS),
        )
    base = path.parent
    model = table.get("model")
    return Config(
        file=path,
        model=base / _str(path, "model", model) if model is not None else None,
        arch=_arch(base, _opt_str(path, "arch", table.get("arch"))),
        arch_kwargs=_dict(path, "arch-kwargs", table.get("arch-kwargs", {})),
        allow_modules=_allow_modules(path, table.get("allow-modules", [])),
        inputs=tuple(_input(base, s) for s in _strs(path, "input", table.get("input", []))),
        shape=_opt_str(path, "shape", table.get("shape")),
        layers=_strs(path, "layers", table.get("layers", [])),
        fail_on=_opt_str(path, "fail-on", table.get("fail-on")),
        expect=_strs(path, "expect", table.get("expect", [])),
        baseline=base / _str(path, "baseline", table["baseline"]) if "baseline" in table else None,
        device=_opt_str(path, "device", table.get("device")),
        dtype=_opt_str(path, "dtype", table.get("dtype")),
    )


def _arch(base: Path, spec: str | None) -> str | None:
    """``path/file.py:callable`` is relative to the pyproject; ``pkg.module:callable`` is not."""
    if spec is None:
        return None
    target, sep, attr = spec.rpartition(":")
    if sep and target.endswith(".py") and not Path(target).is_absolute():
        return f"{base / target}:{attr}"
    return spec


def _allow_modules(path: Path, value: Any) -> tuple[str, ...]:
    """The same policy as ``--allow-module``: never the standard library or a code-runner."""
    from fvis.trust import check_allow_modules

    modules = _strs(path, "allow-modules", value)
    check_allow_modules(modules, source=f"{path}: [tool.fvis] allow-modules")
    return modules


def _input(base: Path, source: str) -> str:
    """A file or folder relative to the pyproject; ``name=FILE`` keeps its name."""
    name, sep, file_name = source.partition("=")
    if sep and name.isidentifier():
        return f"{name}={base / file_name}"
    return str(base / source)


def _str(path: Path, key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise UsageError(f"{path}: [tool.fvis] {key} must be a string")
    return value


def _opt_str(path: Path, key: str, value: Any) -> str | None:
    return None if value is None else _str(path, key, value)


def _strs(path: Path, key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{path}: [tool.fvis] {key} must be a string or a list of strings")
    return tuple(value)


def _dict(path: Path, key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UsageError(f"{path}: [tool.fvis] {key} must be a table")
    check_nesting(value, f"{path}: [tool.fvis] {key}")
    return dict(value)


def check_nesting(value: Any, what: str, limit: int = MAX_NESTING) -> None:
    """Refuse values nested deeper than ``limit`` (the report and --arch callables recurse
    into them); checked without recursion."""
    pending = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if depth > limit:
            raise UsageError(f"{what} is nested more than {limit} levels deep")
        children = item.values() if isinstance(item, dict) else item
        if isinstance(item, dict | list | tuple):
            pending.extend((child, depth + 1) for child in children)
