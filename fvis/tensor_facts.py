"""Small facts read from tensors in the hot path of a capture, and the tensors of a value.

Gradient edges, storage addresses, the raw grad facts of a captured tensor, dtype and device
names, the float32 sample copy kept for pictures, and the tensors inside a call's arguments
or output. Used by the hook session (``fvis.session``) and re-exported by ``fvis.capture``.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from fvis.outputs import flatten_tensors
from fvis.records import CallRecord


def _any_requires_grad(args: Any) -> bool:
    if type(args) is tuple and len(args) == 1 and isinstance(args[0], torch.Tensor):
        return args[0].requires_grad  # the usual call: one tensor in
    return any(t.requires_grad for t in _tensors(args))


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors in a call's arguments or output, without building path names (hot path)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if type(value) is tuple and all(isinstance(v, torch.Tensor) for v in value):
        return list(value)
    return [t for _, t in flatten_tensors(value)]


def gradient_edge(tensor: torch.Tensor) -> tuple[Any, int] | None:
    """The autograd edge a gradient would flow into, or None where there is none to follow."""
    node = tensor.grad_fn
    if node is not None:  # what get_gradient_edge returns, without its cost (a hot path)
        return (node, tensor.output_nr)
    try:  # a leaf: its AccumulateGrad node
        edge = torch.autograd.graph.get_gradient_edge(tensor)
    except (RuntimeError, AssertionError, AttributeError):
        # requires_grad without grad_fn and not a leaf that autograd can reach: a view of a
        # parameter made under no_grad, or a parameter returned as is in inference mode
        return None
    return (edge.node, edge.output_nr)


def _storages(value: Any) -> list[int]:
    """Storage addresses of the floating tensors in ``value`` (views share their base's)."""
    pointers = []
    for _, tensor in flatten_tensors(value):
        if tensor.is_floating_point() and tensor.device.type != "meta":
            pointer = tensor.untyped_storage().data_ptr()
            if pointer:
                pointers.append(pointer)
    return pointers


# GradFacts' first seven fields, read in the hook; the dataclass is built once, at the end.
_RawFacts = tuple[bool, bool, bool, str | None, bool, bool, int | None]


def _grad_facts(tensor: torch.Tensor, record: CallRecord) -> _RawFacts:
    inference = tensor.is_inference()
    node = tensor.grad_fn
    return (
        record.grad_enabled,  # the grad mode of the call that returned the tensor
        record.inference_mode,
        tensor.requires_grad,
        node.name() if node is not None else None,
        tensor.is_leaf,
        inference,
        None if inference else tensor._version,
    )


def _grad_fn_name(tensor: torch.Tensor) -> str | None:
    return tensor.grad_fn.name() if tensor.grad_fn is not None else None


@functools.cache
def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@functools.cache
def _device(device: torch.device) -> str:
    return str(device)


def sample_values(tensor: torch.Tensor, sample: int | None) -> np.ndarray:
    """A float32 numpy copy of one batch element (dim 0), or of everything."""
    with torch.no_grad():
        return drawn(tensor, sample).to("cpu", torch.float32, copy=True).numpy()


def drawn(tensor: torch.Tensor, sample: int | None) -> torch.Tensor:
    """The batch element that gets drawn (dim 0; everything for ``None``), as real values:
    a detached view, not a copy."""
    data = tensor.detach()
    if sample is not None and data.dim() >= 2:
        data = data[min(sample, data.shape[0] - 1)]
    return data.abs() if data.is_complex() else data


def perturbed(value: Any) -> Any:
    """``value`` with every floating tensor (in tuples, lists, dicts) replaced by random values
    of the same shape, dtype and device; a fixed seed keeps runs repeatable."""
    if isinstance(value, torch.Tensor):
        if not (value.is_floating_point() or value.is_complex()) or value.device.type == "meta":
            return value
        generator = torch.Generator(device=value.device).manual_seed(1234)
        scale = float(value.detach().abs().max()) + 1.0 if value.numel() else 1.0
        noise = torch.randn(value.shape, generator=generator, device=value.device)
        return (noise * scale).to(value.dtype)
    if type(value) in (tuple, list):
        return type(value)(perturbed(v) for v in value)
    if isinstance(value, dict):
        return {k: perturbed(v) for k, v in value.items()}
    return value


def same_tensors(first: Any, second: Any) -> bool:
    a, b = _tensors(first), _tensors(second)
    return (
        bool(a)
        and len(a) == len(b)
        and all(
            x.shape == y.shape and x.dtype == y.dtype and torch.equal(x.detach(), y.detach())
            for x, y in zip(a, b, strict=True)
        )
    )
