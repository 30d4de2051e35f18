"""Gradient flow (``--backward``): one real backward pass confirms the grad verdicts.

The gradient is taken with respect to the captures' own gradient edges (recorded at hook
time), so no tensor hooks are needed and no activation is kept for it. Module hooks are gone
by then, so activation-checkpoint recomputation during backward cannot add calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fvis.capture import CaptureResult, flatten_tensors, sample_values
from fvis.errors import first_line


@dataclass(frozen=True)
class GradFlow:
    """What one backward pass showed for one capture."""

    reached: bool
    norm: float | None


@dataclass(frozen=True)
class ParamFlow:
    """Whether the trainable parameters of one hooked layer received a gradient."""

    layer: str
    trainable: int  # number of trainable parameter tensors
    received: int  # how many got a non-zero gradient

    @property
    def starved(self) -> bool:
        return self.trainable > 0 and self.received == 0


@dataclass(frozen=True)
class BackwardResult:
    target: str  # "sum of the output" or "output[..., 3]"
    error: str | None  # why no backward could run, as a verdict, not a traceback
    captures: dict[str, GradFlow]  # by capture label
    params: tuple[ParamFlow, ...]
    grads: dict[str, np.ndarray]  # by capture label: the shown sample's gradient (for Grad-CAM)


def run_backward(
    model: nn.Module,
    result: CaptureResult,
    target: int | None = None,
    sample: int | None = 0,
    position: int | None = None,
) -> BackwardResult:
    """Backpropagate from the output (its sum, or logit ``target``) to every capture. On a
    sequence output ``(N, T, V)`` the logit is taken at token ``position`` (default: the last
    token), not summed over every position.

    >>> flow = run_backward(model, capture(model, [x], ["inner.relu"]))   # doctest: +SKIP
    >>> flow.captures["inner.relu"].reached
    True
    """
    layers = list(dict.fromkeys(c.layer for c in result.captures))
    params = _trainable_params(model, layers)
    scalar, error, label = _objective(result.output, target, position)
    if scalar is None:
        return BackwardResult(label, error, {}, _param_flow(params), {})
    keyed = [
        (c.label, result.edges[(c.layer, c.call, c.path)])
        for c in result.captures
        if (c.layer, c.call, c.path) in result.edges
    ]
    inputs: list[Any] = [torch.autograd.graph.GradientEdge(node, nr) for _, (node, nr) in keyed]
    flat_params = [p for _, group in params for p in group]
    try:
        grads = (
            torch.autograd.grad(scalar, inputs, allow_unused=True, retain_graph=True)
            if inputs
            else ()
        )
        param_grads = _param_grads(model, scalar, flat_params)
    except Exception as exc:  # a custom autograd.Function may raise anything
        first = first_line(exc)
        return BackwardResult(label, f"backward failed: {first[:300]}", {}, _param_flow(params), {})
    capture_grads = dict(zip([k for k, _ in keyed], grads, strict=True))
    flows = {c.label: _flow(capture_grads.get(c.label)) for c in result.captures}
    shown = {k: sample_values(g, sample) for k, g in capture_grads.items() if g is not None}
    received = iter(param_grads)
    param_flows = tuple(
        ParamFlow(layer, len(group), sum(_nonzero(next(received)) for _ in group))
        for layer, group in params
    )
    return BackwardResult(label, None, flows, param_flows, shown)


def _param_grads(
    model: nn.Module, scalar: torch.Tensor, params: list[torch.nn.Parameter]
) -> list[torch.Tensor | None]:
    """The gradient each parameter receives from ``scalar.backward()``, measured the way
    training sees it: reentrant activation checkpointing runs its own backward inside, which
    ``autograd.grad(inputs=params)`` does not see. Every ``.grad`` is restored afterwards."""
    if not params:
        return []
    every = list(model.parameters())
    saved = [p.grad for p in every]
    try:
        for p in every:
            p.grad = None
        scalar.backward()
        return [p.grad for p in params]
    finally:
        for p, grad in zip(every, saved, strict=True):
            p.grad = grad


def _objective(
    output: Any, target: int | None, position: int | None = None
) -> tuple[torch.Tensor | None, str | None, str]:
    """The scalar to backpropagate from, the error when there is none, and its label."""
    tensors = [t for _, t in flatten_tensors(output) if t.requires_grad and t.is_floating_point()]
    label = "sum of the output" if target is None else f"output[..., {target}]"
    if not tensors:
        return (
            None,
            (
                "backward impossible: nothing in the model's output requires grad "
                "(everything ran under no_grad/inference mode, or every parameter is "
                "frozen and the input does not require grad: try --input-requires-grad)"
            ),
            label,
        )
    if target is None:
        if position is not None:
            return None, "--target-position needs --target (the logit to take there)", label
        return torch.stack([t.sum() for t in tensors]).sum(), None, label
    first = tensors[0]
    if first.dim() == 0 or not -first.shape[-1] <= target < first.shape[-1]:
        return (
            None,
            f"--target {target} is outside the output's last dimension {first.shape}",
            label,
        )
    if first.dim() != 3:
        if position is not None:
            return (
                None,
                f"--target-position needs a (N, T, V) output, not {tuple(first.shape)}",
                label,
            )
        return first[..., target].sum(), None, label
    where = -1 if position is None else position
    if not -first.shape[1] <= where < first.shape[1]:
        return None, f"--target-position {where} is outside the {first.shape[1]} tokens", label
    return first[:, where, target].sum(), None, f"output[:, {where}, {target}] (token {where})"


def _trainable_params(
    model: nn.Module, layers: Sequence[str]
) -> list[tuple[str, list[torch.nn.Parameter]]]:
    out = []
    for layer in layers:
        try:
            module = model.get_submodule(layer) if layer else model
        except AttributeError:
            continue
        out.append((layer, [p for p in module.parameters() if p.requires_grad]))
    return out


def _param_flow(params: list[tuple[str, list[torch.nn.Parameter]]]) -> tuple[ParamFlow, ...]:
    return tuple(ParamFlow(layer, len(group), 0) for layer, group in params)


def _flow(grad: torch.Tensor | None) -> GradFlow:
    if grad is None:
        return GradFlow(False, None)
    return GradFlow(True, float(grad.detach().float().norm()))


def _nonzero(grad: torch.Tensor | None) -> bool:
    return grad is not None and bool(grad.detach().abs().sum() > 0)


def gradcam(activation: np.ndarray, gradient: np.ndarray) -> np.ndarray | None:
    """Grad-CAM of one sample's ``(C, H, W)`` activation: ReLU(sum_c mean(grad_c) * A_c),
    scaled to [0, 1]; ``None`` for other shapes."""
    if activation.ndim != 3 or gradient.shape != activation.shape:
        return None
    weights = gradient.reshape(gradient.shape[0], -1).mean(axis=1)
    cam = np.maximum(np.tensordot(weights, activation, axes=1), 0.0)
    peak = float(cam.max()) if cam.size else 0.0
    return (cam / peak).astype(np.float32) if peak > 0 else np.zeros_like(cam, np.float32)


def merge_flows(flows: Sequence[BackwardResult | None]) -> BackwardResult | None:
    """One result for several forward passes (``--batch-size``): captures are per batch
    already; a layer's parameters count as fed when any pass fed them."""
    present = [f for f in flows if f is not None]
    if not present:
        return None
    if len(present) == 1:
        return present[0]
    received: dict[str, ParamFlow] = {}
    for flow in present:
        for param in flow.params:
            best = received.get(param.layer)
            if best is None or param.received > best.received:
                received[param.layer] = param
    return BackwardResult(
        target=present[0].target,
        error=next((f.error for f in present if f.error), None),
        captures={k: v for f in present for k, v in f.captures.items()},
        params=tuple(received.values()),
        grads={k: v for f in present for k, v in f.grads.items()},
    )
