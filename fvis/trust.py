"""Trust policy: which globals a checkpoint may name, and which mark it as malicious.

Two questions about the globals a pickle names (read by ``fvis.inert``, nothing runs):

- ``findings``: does the file name globals that would run commands or code, open files or
  sockets, or import modules when it is fully unpickled? Such a file is refused everywhere,
  even for listing (exit 4, a scanner's verdict), and ``--trust`` only turns that into a
  warning. The table is precise on purpose: a false alarm is as bad as a missed one, so
  harmless globals (``collections.OrderedDict``, ``argparse.Namespace``, numpy's array
  rebuilders) and unknown user classes are no finding.
- the allowlist: which classes ``weights_only`` loading may build. ``torch.nn`` modules, and
  classes from a module the user allows with ``--allow-module``; never the standard library or
  a known code-runner, whatever the user asks.

Nothing here imports torch at import time (``fvis --help`` must stay light).
"""

from __future__ import annotations

import importlib
import re
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fvis.errors import MaliciousFileError, RefusedError, UsageError, first_line
from fvis.text import preview

_SHELL = "would run a shell command"
_CODE = "would execute Python code"
_IMPORT = "would import a module"
_FILES = "would open, write or delete files"
_NETWORK = "would open a network connection"
_PICKLE = "would unpickle more data (and run whatever that names)"
_NATIVE = "would call native code"
_ATTRS = "would reach any attribute of any object (a building block for running code)"
_PROCESS = "would start, signal or stop processes or threads"
_OS = "would call an operating-system function"
_CALL = "would call an arbitrary function"

# Every global of these modules (and of their submodules) is dangerous.
_WHOLE_MODULES: dict[str, str] = {
    **dict.fromkeys(("subprocess", "commands", "popen2", "_posixsubprocess", "pty"), _SHELL),
    **dict.fromkeys(("os", "posix", "nt"), _OS),
    **dict.fromkeys(
        ("importlib", "imp", "_imp", "pkgutil", "zipimport", "_frozen_importlib"), _IMPORT
    ),
    "_frozen_importlib_external": _IMPORT,
    **dict.fromkeys(
        ("runpy", "code", "codeop", "timeit", "pdb", "bdb", "profile", "cProfile", "trace"), _CODE
    ),
    **dict.fromkeys(("doctest", "idlelib", "marshal", "torch.utils.cpp_extension"), _CODE),
    **dict.fromkeys(("pickle", "_pickle", "cPickle", "shelve", "dill", "cloudpickle"), _PICKLE),
    "joblib": _PICKLE,
    **dict.fromkeys(("socket", "_socket", "ssl", "_ssl", "http", "urllib", "urllib2"), _NETWORK),
    **dict.fromkeys(("httplib", "ftplib", "smtplib", "telnetlib", "poplib", "imaplib"), _NETWORK),
    **dict.fromkeys(("xmlrpc", "xmlrpclib", "socketserver", "SocketServer"), _NETWORK),
    **dict.fromkeys(("webbrowser", "requests", "urllib3", "httpx", "aiohttp"), _NETWORK),
    **dict.fromkeys(("ctypes", "_ctypes", "cffi"), _NATIVE),
    **dict.fromkeys(("shutil", "tempfile", "fileinput", "dbm", "sqlite3", "_sqlite3"), _FILES),
    "logging.handlers": _FILES,
    "logging.config": _CODE,  # dictConfig imports and calls whatever the config names
    **dict.fromkeys(("signal", "_signal", "multiprocessing", "_multiprocessing"), _PROCESS),
    **dict.fromkeys(("threading", "_thread", "thread", "asyncio", "concurrent"), _PROCESS),
    **dict.fromkeys(("sys", "inspect", "gc"), _ATTRS),
}
# Single globals of otherwise harmless modules.
_NAMED: dict[str, str] = {
    **{f"{m}.{n}": _CODE for m in ("builtins", "__builtin__") for n in ("exec", "eval")},
    **{f"{m}.{n}": _CODE for m in ("builtins", "__builtin__") for n in ("compile", "execfile")},
    **{f"{m}.{n}": _IMPORT for m in ("builtins", "__builtin__") for n in ("__import__", "reload")},
    **{f"{m}.{n}": _FILES for m in ("builtins", "__builtin__") for n in ("open", "file")},
    **{
        f"{m}.{n}": _ATTRS
        for m in ("builtins", "__builtin__")
        for n in ("getattr", "setattr", "delattr", "vars", "globals", "locals")
    },
    **{f"{m}.{n}": _CODE for m in ("builtins", "__builtin__") for n in ("breakpoint", "input")},
    **{f"{m}.{n}": _PROCESS for m in ("builtins", "__builtin__") for n in ("exit", "quit")},
    "__builtin__.apply": _CALL,
    **{f"{m}.{n}": _FILES for m in ("io", "_io", "_pyio") for n in ("open", "open_code", "FileIO")},
    **{f"{m}.{n}": _FILES for m in ("gzip", "bz2", "lzma") for n in ("open",)},
    **dict.fromkeys(("gzip.GzipFile", "bz2.BZ2File", "lzma.LZMAFile", "tarfile.open"), _FILES),
    **dict.fromkeys(("tarfile.TarFile", "zipfile.ZipFile", "zipfile.PyZipFile"), _FILES),
    **dict.fromkeys(("logging.FileHandler", "logging.basicConfig"), _FILES),
    **dict.fromkeys(("types.FunctionType", "types.LambdaType", "types.CodeType"), _CODE),
    **dict.fromkeys(("operator.attrgetter", "operator.methodcaller"), _ATTRS),
    **dict.fromkeys(("_operator.attrgetter", "_operator.methodcaller"), _ATTRS),
    **dict.fromkeys(("platform.popen", "pydoc.pipepager", "pydoc.tempfilepager"), _SHELL),
    "uuid._get_command_stdout": _SHELL,
    **dict.fromkeys(("numpy.load", "pandas.read_pickle", "pandas.io.pickle.read_pickle"), _PICKLE),
    **dict.fromkeys(("torch.load", "torch.serialization.load", "torch.jit.load"), _PICKLE),
    **dict.fromkeys(("torch.hub.load", "torch.hub.load_state_dict_from_url"), _NETWORK),
    "torch.hub.download_url_to_file": _NETWORK,
    "torch.fx.graph_module._exec_with_source": _CODE,
    "torch.fx.graph_module._forward_from_src": _CODE,
    **dict.fromkeys(("yaml.load", "yaml.unsafe_load", "yaml.full_load", "sympy.sympify"), _CODE),
}
_SHELL_NAMES = re.compile(r"(system|popen\w*|exec\w*|spawn\w*|posix_spawn\w*|startfile|fork\w*)")


@dataclass(frozen=True)
class Finding:
    """One dangerous global a file names, and what it would do when fully unpickled."""

    qualname: str
    effect: str

    def text(self) -> str:
        return f"{self.qualname} ({self.effect})"


def effect_of(qualname: str) -> str | None:
    """What ``qualname`` would do when a pickle calls it, or ``None`` when it is harmless.

    >>> effect_of("posix.system")
    'would run a shell command'
    >>> effect_of("collections.OrderedDict") is None
    True
    """
    if qualname in _NAMED:
        return _NAMED[qualname]
    module_name, _, attr = qualname.rpartition(".")
    effect = _module_effect(module_name)
    if effect == _OS and _SHELL_NAMES.fullmatch(attr):
        return _SHELL
    return effect


def _module_effect(module_name: str) -> str | None:
    parts = module_name.split(".")
    for depth in range(len(parts), 0, -1):  # "importlib.util" is importlib's
        effect = _WHOLE_MODULES.get(".".join(parts[:depth]))
        if effect is not None:
            return effect
    return None


def findings(seen: Iterable[str]) -> tuple[Finding, ...]:
    """The dangerous globals among ``seen``, in the file's order."""
    return tuple(Finding(g, e) for g in dict.fromkeys(seen) if (e := effect_of(g)) is not None)


def screen(path: Path, seen: Iterable[str], trusted: bool, kind: str = "", part: str = "") -> None:
    """Refuse a file that names dangerous globals (exit 4); with ``--trust``, warn and go on.
    ``part`` names the member of an archive that names them (``data/weights/model.pt``)."""
    found = findings(seen)
    if not found:
        return
    named = preview([f.text() for f in found], 4)
    where = f"{path} ({part})" if part else f"{path}"
    if trusted:
        warnings.warn(
            f"{where} names dangerous globals: {named}; going on because of --trust",
            TrustWarning,
            stacklevel=2,
        )
        return
    raise MaliciousFileError(
        f"{where} names dangerous globals: {named}",
        hint="nothing from the file ran; these globals are dangerous (each effect is what full "
        "unpickling would do): treat the file as malicious and do not load it anywhere",
        findings=found,
        file=str(path),
        kind=kind,
    )


class TrustWarning(UserWarning):
    """Emitted when fvis goes on where trust was needed: ``--trust``, or code named by a
    ``[tool.fvis]`` table being imported."""


# --------------------------------------------------------------------------- torch's messages

_TORCH_ADVICE = re.compile(r"weights_only|trust|safe_globals|allowlist|can still be loaded", re.I)


def torch_reason(exc: BaseException, limit: int = 300) -> str:
    """torch's reason for a failed load, without its advice: torch suggests re-running with
    ``weights_only=False`` even for files that carry payloads, so that sentence never
    reaches the user."""
    sentences = re.split(r"(?<=[.!?])\s+|\n+", str(exc))
    kept = [s.strip() for s in sentences if s.strip() and not _TORCH_ADVICE.search(s)]
    kept = [s for s in kept if not s.startswith("Weights only load failed")]
    return (kept[0] if kept else type(exc).__name__)[:limit]


# --------------------------------------------------------------------------- the allowlist

# Third-party modules that load pickles or run code; the standard library is denied whole.
_CODE_RUNNERS = frozenset(
    {"dill", "cloudpickle", "joblib", "numpy", "pandas", "scipy", "sklearn", "yaml", "sympy"}
    | {"requests", "urllib3", "httpx", "aiohttp", "fsspec", "IPython", "setuptools", "pip"}
    | {"pkg_resources", "cffi", "_pytest", "pytest", "torch"}
)


def _python2_names() -> frozenset[str]:
    """Module names pickle protocol 2 still writes (``__builtin__``, ``copy_reg``...)."""
    try:
        import _compat_pickle

        return frozenset(m.split(".")[0] for m in _compat_pickle.IMPORT_MAPPING)
    except ImportError:  # not CPython: the names that matter most
        return frozenset({"__builtin__", "copy_reg", "commands", "cPickle", "thread"})


_NEVER_ALLOWED = frozenset(sys.stdlib_module_names) | _python2_names() | _CODE_RUNNERS


def never_allowable(module_name: str) -> bool:
    """The standard library (with private ``_x`` twins such as ``_io`` and ``_pyio``),
    Python 2 aliases and known code-runners: each can open files, sockets or processes, or
    import code, so no ``--allow-module`` may name them."""
    root = module_name.split(".")[0]
    return root in _NEVER_ALLOWED or root.lstrip("_") in _NEVER_ALLOWED


def check_allow_modules(modules: tuple[str, ...], source: str = "--allow-module") -> None:
    """``--allow-module`` takes a user's own module; the standard library, code-runners,
    torch and wildcards are refused (``source`` names where the list came from)."""
    for name in modules:
        if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", name):
            raise UsageError(
                f"{source} {name!r} must be a dotted module name such as "
                "mypkg.models (no wildcards)"
            )
        root = name.split(".")[0]
        if root == "torch":
            raise UsageError(
                f"{source} {name}: torch.nn classes are allowed already; other torch globals "
                "are not allowlisted"
            )
        if never_allowable(name):
            raise UsageError(
                f"{source} {name}: refusing to allowlist a standard-library or code-running "
                "module: its classes can open files, sockets or processes, or run code",
                hint="allow only your own package, e.g. --allow-module mypkg.models",
            )


def _allowable(module_name: str) -> bool:
    try:
        check_allow_modules((module_name,))
    except UsageError:
        return False
    return True


def _is_dangerous(qualname: str) -> bool:
    """Globals that can run code when unpickled: any finding, any torch global that is not a
    plain ``torch.nn`` module class, and anything that is not named like a class (functions
    run when a pickle REDUCEs them)."""
    module_name, _, attr = qualname.rpartition(".")
    if effect_of(qualname) is not None:
        return True
    if module_name.split(".")[0] == "torch" and not module_name.startswith("torch.nn.modules"):
        return True
    return not attr.lstrip("_")[:1].isupper()  # private classes (_DenseBlock) are classes


def _needed_globals(seen: tuple[str, ...]) -> list[str]:
    """The globals a file names that ``weights_only`` loading does not allow by itself."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = set(_get_allowed_globals())
    except Exception:  # private API: fall back to the rebuild helpers we know
        allowed = set()
    rebuild_helpers_safe = not allowed
    return [
        g
        for g in seen
        if g not in allowed
        and not g.endswith("Storage")
        and not (rebuild_helpers_safe and g.startswith("torch._utils._rebuild"))
        and g not in ("collections.OrderedDict", "builtins.set", "__builtin__.set")
    ]


def untrusted_globals(seen: tuple[str, ...], allow_modules: tuple[str, ...] = ()) -> list[str]:
    """The globals a pickle names that safe loading would refuse."""
    return [g for g in _needed_globals(seen) if _resolve_allowed(g, allow_modules) is None]


def allowed_classes(
    path: Path,
    seen: tuple[str, ...],
    allow_modules: tuple[str, ...],
    subject: str = ": the checkpoint",
) -> list[Any]:
    """Resolve each needed global to a class (each once), or refuse naming what blocked."""
    resolved = {g: _resolve_allowed(g, allow_modules) for g in _needed_globals(seen)}
    blocked = [g for g, obj in resolved.items() if obj is None]
    if blocked:
        raise RefusedError(
            f"{path}{subject} needs globals fvis does not trust: {preview(blocked, 5)}",
            hint=ways_forward(path, blocked),
        )
    return list(resolved.values())


# torch's pure tensor functions, which libraries store as module attributes (BERT's
# ``self.act = torch._C._nn.gelu``): computing on tensors is all they can do when called.
_TENSOR_FUNCTION_MODULES = (
    "torch._C._nn",
    "torch._C._VariableFunctions",
    "torch._C._special",
    "torch._C._linalg",
    "torch._C._fft",
    "torch.nn.functional",
)


def _harmless_callable(qualname: str) -> Any:
    """``functools.partial`` (torchvision's ``norm_layer=partial(LayerNorm, eps=1e-6)``) and
    torch's pure tensor functions, else None. A partial can only wrap what the rest of the
    file's globals allow, and the safe unpickler never calls a partial it built."""
    import functools

    import torch

    if qualname == "functools.partial":
        return functools.partial
    module_name, _, attr = qualname.rpartition(".")
    if module_name == "torch" and attr in dir(torch._C._VariableFunctions):
        module_name = "torch._C._VariableFunctions"
    if module_name not in _TENSOR_FUNCTION_MODULES or attr.startswith("__"):
        return None
    if module_name.startswith("torch._C."):
        module = getattr(torch._C, module_name.removeprefix("torch._C."), None)
    else:
        module = importlib.import_module(module_name)
    obj = getattr(module, attr, None)
    if callable(obj) and not isinstance(obj, type) and effect_of(qualname) is None:
        return obj
    return None


def _resolve_allowed(qualname: str, allow_modules: tuple[str, ...]) -> Any:
    """The class for ``qualname`` if policy allows it: torch.nn modules, or classes from a
    module the user allowed, plus the harmless callables above. Other functions, dangerous
    and standard-library globals never pass."""
    import torch

    harmless = _harmless_callable(qualname)
    if harmless is not None:
        return harmless
    module_name, _, attr = qualname.rpartition(".")
    if _is_dangerous(qualname) and not module_name.startswith("torch.nn."):
        return None
    user_allowed = not never_allowable(module_name) and any(
        module_name == m or module_name.startswith(m + ".") for m in allow_modules
    )
    if not (module_name.startswith("torch.nn.") or user_allowed):
        return None
    try:
        module = import_user(module_name) if user_allowed else importlib.import_module(module_name)
    except (ImportError, UsageError):  # a name the file made up: simply not allowed
        return None
    obj = getattr(module, attr, None)
    if not isinstance(obj, type):
        return None
    if not user_allowed and not issubclass(obj, torch.nn.Module):
        return None
    return obj


def ways_forward(path: Path, blocked: list[str] | None = None) -> str:
    """The hint for a refused file: never ``--trust`` when a blocked global can run code, and
    never an ``--allow-module`` that fvis would refuse."""
    if blocked and any(_is_dangerous(g) for g in blocked):
        return "the file names dangerous globals that can run commands or code; do not trust it"
    prefixes = allow_prefixes(g.rpartition(".")[0] for g in blocked or [])
    allow = " ".join(f"--allow-module {p}" for p in prefixes) or None
    options = ["save a state dict and pass --arch", allow, f"--trust if you trust {path.name}"]
    return "; ".join(o for o in options if o)


def allow_prefixes(modules: Iterable[str]) -> list[str]:
    """The fewest ``--allow-module`` prefixes covering every allowable module: per top-level
    package, the longest dotted prefix its modules share (``transformers.activations`` and
    ``transformers.models.gpt2.modeling_gpt2`` -> ``transformers``).

    >>> allow_prefixes(["mypkg.models", "mypkg.models.blocks", "other.nets"])
    ['mypkg.models', 'other.nets']
    """
    by_root: dict[str, list[list[str]]] = {}
    for module in sorted(set(modules) - {""}):
        if _allowable(module):
            by_root.setdefault(module.split(".")[0], []).append(module.split("."))
    prefixes = []
    for parts in by_root.values():
        shared = parts[0]
        for other in parts[1:]:
            n = next(
                (i for i, (a, b) in enumerate(zip(shared, other, strict=False)) if a != b),
                min(len(shared), len(other)),
            )
            shared = shared[:n]
        prefixes.append(".".join(shared))
    return prefixes


def import_user(module_name: str) -> Any:
    """Import a module the user named (their code, their decision); the cwd is searchable."""
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r}: {first_line(exc)}") from None
    except Exception as exc:  # the user's module raised while importing: their bug, not ours
        raise UsageError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {first_line(exc)}",
            hint="run --debug to see the traceback",
        ) from None


@dataclass(frozen=True)
class Trust:
    """The user's decision to run code from a checkpoint, optionally bound to one file."""

    sha256: str | None = None  # None: trust whatever file is given

    @classmethod
    def parse(cls, value: str | None) -> Trust | None:
        """``None`` -> no trust; ``"any"`` (bare ``--trust``); ``"sha256:<hex>"`` or
        ``"<hex>"`` (``--trust-sha256``) -> trust bound to one exact file."""
        if value is None:
            return None
        if value == "any":
            return cls()
        match = re.fullmatch(r"(?:sha256:)?([0-9a-fA-F]{64})", value.strip())
        if not match:
            raise UsageError(
                f"--trust-sha256 takes the file's SHA-256 (64 hex digits), not {value!r}",
                hint="compute it with: sha256sum MODEL",
            )
        return cls(match.group(1).lower())

    @classmethod
    def from_flags(cls, trust: bool, sha256: str | None) -> Trust | None:
        """``--trust`` and ``--trust-sha256 HEX`` (which implies ``--trust``)."""
        return cls.parse(sha256) if sha256 is not None else (cls() if trust else None)


def check_trust_binding(path: Path, digest: str, trust: Trust | None) -> None:
    """Refuse a file whose hash is not the one --trust-sha256 names."""
    if trust is not None and trust.sha256 is not None and trust.sha256 != digest:
        raise RefusedError(
            f"{path} has SHA-256 {digest}, not the {trust.sha256} that --trust-sha256 names",
            hint="the file changed since you trusted it; check where it came from",
        )
