"""The records of module calls: a ``CallRecord`` for each call the hooks see (built with
``tuple.__new__``: this runs once per module call) and a ``NotCalled`` for each chosen
layer that never ran. Pure functions of the call's module, arguments and output."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fvis.records import CallRecord, NotCalled, _Frame
from fvis.tensor_facts import _any_requires_grad, _tensors


def not_called(name: str, module: nn.Module, exported: bool) -> NotCalled:
    container = type(module).forward is nn.Module.forward  # ModuleList, ModuleDict
    every = list(module.parameters())
    params = tuple(p for p in every if p.requires_grad)
    return NotCalled(name, type(module).__qualname__, container, params, exported, bool(every))


def call_record(
    frame: _Frame,
    class_name: str,
    call: int,
    params_grad: bool,
    args: Any,
    output: Any,
    has_params: bool = False,
) -> CallRecord:
    if isinstance(output, torch.Tensor):  # the usual case, without building lists
        floating = output.is_floating_point() or output.is_complex()
        outputs_require_grad = floating and output.requires_grad
        output_shapes: tuple[tuple[int, ...], ...] = (tuple(output.shape),)
    else:
        outputs = _tensors(output)
        floats = [t for t in outputs if t.is_floating_point() or t.is_complex()]
        floating = bool(floats)
        outputs_require_grad = any(t.requires_grad for t in floats)
        output_shapes = tuple(tuple(t.shape) for t in outputs)
    # tuple.__new__ with every field: what CallRecord(...) builds, without its Python-level
    # __new__ (3x faster; this runs once per module call).
    if type(args) is tuple and len(args) == 1 and isinstance(args[0], torch.Tensor):
        inputs_require_grad = args[0].requires_grad  # the usual call: one tensor in
    else:
        inputs_require_grad = _any_requires_grad(args)
    return _new_tuple(
        CallRecord,
        (
            frame.name,
            class_name,
            call,
            _grad_enabled(),
            _inference_mode(),
            inputs_require_grad,
            params_grad,
            outputs_require_grad,
            floating,
            output_shapes,
            frame.call_id,
            frame.parent_id,
            False,  # constant
            has_params,
            False,  # op: a module call, not a tensor op (fvis.ops)
        ),
    )


_new_tuple = tuple.__new__
_grad_enabled = torch.is_grad_enabled
_inference_mode = torch.is_inference_mode_enabled
