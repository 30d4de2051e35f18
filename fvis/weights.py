"""Read the tensors of a pickled module or TorchScript archive as plain data.

``torch.jit.load`` compiles and can run an archive's code, and unpickling a module imports and
runs its classes; to load weights into the user's Python class (``--arch``) fvis only needs the
tensors. The stand-in unpickler of ``fvis.inert`` reads ``data.pkl``; only tensor rebuilding and
storages are real here.
"""

from __future__ import annotations

import io
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from fvis import inert
from fvis.errors import BadFileError


class _TensorUnpickler(inert._StubUnpickler):
    def __init__(self, stream: io.BytesIO, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(stream)
        self._archive = archive
        self._prefix = prefix
        # Each storage is read once, however many tensors view it (torch.load does the same):
        # a 4 MB storage behind 600 parameters must not become 2.4 GB of copies.
        self._storages: dict[str, torch.UntypedStorage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_parameter"):
            return getattr(torch._utils, name)
        if module == "torch" and name.endswith("Storage") and hasattr(torch, name):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # legacy typed storage classes warn on access
                return _StorageDtype(getattr(torch, name).dtype)
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and isinstance(pid[1], _StorageDtype)):
            raise BadFileError("unexpected storage record in TorchScript archive")
        dtype, key, numel = pid[1].dtype, str(pid[2]), int(pid[4])
        if key not in self._storages:
            data = bytearray(self._archive.read(f"{self._prefix}data/{key}"))
            self._storages[key] = torch.frombuffer(data, dtype=torch.uint8).untyped_storage()
        untyped = self._storages[key]
        itemsize = torch.empty((), dtype=dtype).element_size()
        if untyped.nbytes() < numel * itemsize:
            raise BadFileError(
                f"storage {key} is truncated ({untyped.nbytes()} bytes, "
                f"{numel * itemsize} declared)"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TypedStorage is deprecated but is what rebuild takes
            return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


class _StorageDtype:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def read_tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """``{dotted_name: tensor}`` for every parameter and buffer of the pickled module tree."""
    try:
        with zipfile.ZipFile(path) as archive:
            stream = io.BytesIO(archive.read(f"{prefix}data.pkl"))
            inert.check_pickle_ops(path, stream)
            root = _TensorUnpickler(stream, archive, prefix).load()
    except BadFileError as exc:
        raise BadFileError(f"{path}: {exc.message}") from None
    except Exception as exc:
        raise BadFileError(f"{path} is a damaged checkpoint archive ({exc})") from None
    return _flatten(root, "")


def _flatten(stub: Any, prefix: str) -> dict[str, torch.Tensor]:
    state = getattr(stub, "state", None)
    if not isinstance(state, dict):
        return {}
    if "_modules" in state:  # a pickled nn.Module: its __dict__
        items = {
            **(state.get("_parameters") or {}),
            **(state.get("_buffers") or {}),
            **(state.get("_modules") or {}),
        }
    else:  # TorchScript: attributes directly
        items = state
    out: dict[str, torch.Tensor] = {}
    for name, value in items.items():
        if isinstance(value, torch.Tensor):
            out[f"{prefix}{name}"] = value
        elif inert.is_module_stub(value):
            out.update(_flatten(value, f"{prefix}{name}."))
    return out
