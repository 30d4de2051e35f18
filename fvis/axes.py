"""Which dimension of an activation holds its channels (units): dim 1 or the last one.

``(N, C, H, W)`` is the PyTorch convention for convolutions, but transformers keep features
last: ``(N, T, D)`` tokens (BERT, GPT-2, ViT), ``(N, H, W, C)`` maps (every torchvision Swin
layer, ConvNeXt's block internals, timm NHWC models). Counting dead channels, or drawing one
tile per channel, along the wrong dim gives facts about tokens or image rows instead.

The axis is read from the module that produced the tensor, never guessed from sizes alone:

- convolutions, batch/instance/group norms and pooling work on dim 1;
- ``Linear``, ``Embedding``, GPT-2's ``Conv1D`` and single-dim ``LayerNorm``/``RMSNorm``
  produce features on the last dim (when their feature size equals it);
- torchvision's ``Permute`` says where it moved dim 1;
- a container answers like its last child that decides (the one that produced the output);
- a module without parameters (an activation, dropout) answers like the call that produced
  a tensor of the same shape just before it ran (``producer``).

With no evidence the old convention, dim 1, stays, and the reason says it was assumed.

ViT tokens ``(N, 1+HW, D)`` are also placed back on their patch grid when the trace holds the
``(N, D, H, W)`` patch embedding they were flattened from (``find_token_grid``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from torch import nn

_FIRST = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.Upsample,
)


class Axis(NamedTuple):
    """The channel dim of a tensor (counting the batch dim) and why."""

    dim: int
    reason: str


def channel_axis(
    module: nn.Module,
    shape: tuple[int, ...],
    producer: Callable[[], Axis | None] | None = None,
) -> Axis:
    """The channel dim of ``module``'s output of ``shape`` (3 or more dims).

    >>> channel_axis(nn.LayerNorm(8), (1, 5, 5, 8))
    Axis(dim=3, reason='last dim: LayerNorm(8) normalises it')
    >>> channel_axis(nn.Conv2d(3, 8, 1), (1, 8, 5, 5)).dim
    1
    """
    found = decide(module, shape) or (producer() if producer is not None else None)
    return found or Axis(1, "dim 1: assumed (N, C, ...), no module says otherwise")


def decide(module: nn.Module, shape: tuple[int, ...], depth: int = 0) -> Axis | None:
    """The axis ``module`` itself (or its last deciding child) implies, or None; remembered per
    module and shape (a hook runs this for every captured call, and the answer only depends
    on the module's type and sizes)."""
    known = _DECIDED.get(module)
    if known is None:
        known = _DECIDED[module] = {}
    if (shape, depth) not in known:
        known[(shape, depth)] = _decide(module, shape, depth)
    return known[(shape, depth)]


_DECIDED: weakref.WeakKeyDictionary[nn.Module, dict[Any, Axis | None]] = weakref.WeakKeyDictionary()


def _decide(module: nn.Module, shape: tuple[int, ...], depth: int) -> Axis | None:
    own = _by_type(module, shape)
    if own is not None or depth > 6:
        return own
    for child in reversed([m for m in module._modules.values() if m is not None]):
        found = decide(child, shape, depth + 1)
        if found is not None:
            return found
    return None


def _by_type(module: nn.Module, shape: tuple[int, ...]) -> Axis | None:
    """The axis a module's type implies for a tensor of ``shape`` (its own output, or its
    parent's when the parent reshaped after it: then sizes must agree, or it says nothing)."""
    last, name = len(shape) - 1, type(module).__name__
    if isinstance(module, _FIRST) or (isinstance(module, nn.LayerNorm) and name.endswith("2d")):
        size = _channels_first_size(module)  # incl. ConvNeXt's LayerNorm2d
        if size is None or size == shape[1]:
            return Axis(1, f"dim 1: {name} works on channels first")
        if size == shape[-1]:  # timm's PatchEmbed: conv, then flattened to (N, T, D)
            return Axis(last, f"last dim: the {size} channels of {name} moved there")
        return None
    if name == "Permute" and isinstance(getattr(module, "dims", None), (list, tuple)):
        return _permuted(list(module.dims), last)
    features = _features(module)
    if features is not None and features == shape[-1]:
        return Axis(last, f"last dim: {name}({features}) {_verb(module)} it")
    if features is not None and features == shape[1]:  # transposed after it
        return Axis(1, f"dim 1: the {features} features of {name} moved there")
    return None


def _channels_first_size(module: nn.Module) -> int | None:
    """The channel count a channels-first module produces, where it has one."""
    for attr in ("out_channels", "num_features", "num_channels"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    if isinstance(module, nn.LayerNorm):
        dims = tuple(module.normalized_shape)
        return dims[0] if len(dims) == 1 else None
    return None


def _features(module: nn.Module) -> int | None:
    """The size of the last dim a module produces or normalises, where its type fixes it."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        dims = tuple(module.normalized_shape)
        return dims[0] if len(dims) == 1 else None
    name = type(module).__name__
    if name == "Conv1D" and isinstance(getattr(module, "nf", None), int):  # GPT-2's linear
        return int(module.nf)
    weight = module._parameters.get("weight")
    if name.endswith(("RMSNorm", "LayerNorm")) and weight is not None and weight.dim() == 1:
        return int(weight.shape[0])  # Llama's, T5's, timm's own norms
    return None


def _verb(module: nn.Module) -> str:
    return "normalises" if "Norm" in type(module).__name__ else "produces"


def _permuted(dims: list[int], last: int) -> Axis | None:
    if len(dims) != last + 1:
        return None
    if dims[-1] == 1:
        return Axis(last, f"last dim: Permute{tuple(dims)} moves channels last")
    if dims[1] == last:
        return Axis(1, f"dim 1: Permute{tuple(dims)} moves channels first")
    return None


# --------------------------------------------------------------------------- ViT tokens

_PREFIX_TOKENS = frozenset({"class_token", "cls_token", "dist_token", "reg_token"})


def find_token_grid(
    trace: Sequence[Any], before: int, shape: tuple[int, ...], prefix: int
) -> tuple[int, int, int] | None:
    """``(prefix, H, W)`` when a call (a ``fvis.capture.CallRecord`` of ``trace``) that
    finished before call ``before`` produced ``(N, D, H, W)`` with ``T == prefix + H * W``
    for tokens of ``shape`` ``(N, T, D)``."""
    n, tokens, width = shape
    for earlier in reversed(trace):
        if earlier.call_id >= before:
            continue
        for out in earlier.output_shapes:
            if len(out) == 4 and out[:2] == (n, width) and tokens == prefix + out[2] * out[3]:
                return (prefix, out[2], out[3])
    return None


def prefix_tokens(model: nn.Module, width: int) -> int:
    """Tokens ``model`` prepends to its patches: ``class_token``, ``cls_token``,
    ``dist_token`` and ``reg_token`` parameters of width ``width``."""
    count = 0
    for name, param in model.named_parameters():
        last = name.rsplit(".", 1)[-1]
        if last in _PREFIX_TOKENS and param.dim() >= 2 and param.shape[-1] == width:
            count += int(param.shape[-2]) if param.dim() == 3 else 1
    return count
