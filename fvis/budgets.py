"""Memory budgets for what an untrusted file makes fvis build.

A pickle can call an allowlisted constructor with its own arguments: a 2.5 KB file whose
REDUCE calls ``torch.nn.Linear(70000, 70000)`` makes ``torch.load`` allocate ~20 GB, even
with ``weights_only=True``. Before that load, each constructor call the stand-in reader saw is
replayed on the meta device (nothing is allocated) and the tensors it would create are
weighed against a budget: ``--max-model-bytes`` when given, else a bound derived from the
file's size (a file cannot legitimately need much more memory than the tensors it stores).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fvis.errors import BadFileError

# Slack over the file's size for what constructors legitimately add (non-persistent buffers,
# a model whose weights are replaced by the file's right after construction).
CONSTRUCTOR_SLACK_BYTES = 64 << 20
# Files torch.save wrote call no constructor; replaying each costs ~50 us, so cap the count.
MAX_CONSTRUCTOR_CALLS = 10_000
_PLAIN = (int, float, bool, str, bytes, type(None))


def constructor_budget(path: Path, max_model_bytes: int | None) -> int:
    """The bytes constructors called by ``path`` may allocate."""
    if max_model_bytes is not None:
        return max_model_bytes
    return 2 * path.stat().st_size + CONSTRUCTOR_SLACK_BYTES


def check_constructor_calls(
    path: Path,
    calls: Iterable[tuple[str, tuple[Any, ...]]],
    classes: Iterable[Any],
    max_model_bytes: int | None = None,
) -> None:
    """Refuse (exit 3) when the constructors ``path`` calls would allocate over the budget.

    ``classes`` are those the load would allow; calls to any other name are refused by the
    load itself. Arguments that are not plain values (a stand-in tensor or object) cannot be
    replayed: such a call is refused too, as no file ``torch.save`` wrote calls a module
    constructor at all.
    """
    budget = constructor_budget(path, max_model_bytes)
    by_name = _by_name(calls, classes)
    checked = [(q, args) for q, args in calls if q in by_name]
    if len(checked) > MAX_CONSTRUCTOR_CALLS:
        raise BadFileError(
            f"{path} calls module constructors {len(checked):,} times; refusing a possible "
            "resource bomb (torch.save never writes such calls)"
        )
    total = 0
    for qualname, args in checked:
        cls = by_name[qualname]
        if not _plain(args):
            raise BadFileError(
                f"{path} calls {qualname} with arguments fvis cannot check; "
                "torch.save never writes such a call"
            )
        total += _meta_bytes(cls, args)
        if total > budget:
            raise BadFileError(
                f"{path} calls {qualname}{_args_text(args)}, which would allocate "
                f"{total:,} bytes, more than the {budget:,} the file can justify",
                hint="raise the limit with --max-model-bytes if you trust this file",
            )


def _by_name(
    calls: Iterable[tuple[str, tuple[Any, ...]]], classes: Iterable[Any]
) -> dict[str, Any]:
    """The file's global name -> module class (only constructing a module allocates its
    tensors; ``functools.partial`` and plain classes build no tensors); by class name when it
    was reached by another path."""
    import torch

    found = [c for c in classes if isinstance(c, type) and issubclass(c, torch.nn.Module)]
    by_name = {f"{c.__module__}.{c.__qualname__}": c for c in found}
    for qualname, _args in calls:
        short = [c for c in found if c.__name__ == qualname.rpartition(".")[2]]
        if qualname not in by_name and len(short) == 1:
            by_name[qualname] = short[0]
    return by_name


def _meta_bytes(cls: Any, args: tuple[Any, ...]) -> int:
    """Bytes of the tensors ``cls(*args)`` creates, measured on the meta device."""
    import torch

    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            built = cls(*args)
    except Exception:  # the real load fails the same way and says so in its own message
        return 0
    if not isinstance(built, torch.nn.Module):
        return 0
    tensors = [*built.parameters(), *built.buffers()]
    return sum(t.nelement() * t.element_size() for t in tensors)


def _plain(value: Any, depth: int = 0) -> bool:
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, list | tuple) and depth < 8:
        return all(_plain(v, depth + 1) for v in value)
    if isinstance(value, dict) and depth < 8:
        return all(_plain(k, depth + 1) and _plain(v, depth + 1) for k, v in value.items())
    return False


def _args_text(args: tuple[Any, ...]) -> str:
    text = "(" + ", ".join(_repr(a) for a in args) + ")"
    return text if len(text) <= 80 else text[:77] + "...)"


def _repr(value: Any) -> str:
    try:
        return repr(value)[:80]
    except ValueError:  # an int too long to print (Python's int-to-str digit limit)
        return "<huge number>"
