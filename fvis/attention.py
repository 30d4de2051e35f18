"""Attention probabilities a model did not compute, said instead of dropped silently.

Hugging Face attention modules return ``(attn_output, attn_weights)``; under fused kernels
(``sdpa``, flash attention) the weights are never formed and the second part is ``None``.
A capture of such a module then holds only the output, so fvis says why and how to get the
probabilities: eager attention (``--attn-implementation eager``), where the softmax is an
ordinary tensor.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fvis.errors import UsageError

EAGER_HINT = "load the model with --attn-implementation eager to capture them"


def missing_probabilities(module: nn.Module, output: Any) -> str | None:
    """A note when ``module`` is an attention module whose tuple output holds ``None`` where
    the attention probabilities go; None otherwise."""
    if not type(module).__name__.endswith("Attention") or not isinstance(output, tuple):
        return None
    missing = [i for i, part in enumerate(output) if part is None]
    if not missing:
        return None
    kernel = implementation(module)
    where = ", ".join(f"output[{i}]" for i in missing)
    if kernel in (None, "eager"):
        return f"{where} is None: the attention probabilities were not returned"
    return f"{where} is None: {kernel} attention does not compute the probabilities; {EAGER_HINT}"


def implementation(module: nn.Module) -> str | None:
    """The attention kernel a transformers module was configured with (``sdpa``, ``eager``,
    ``flash_attention_2``...), when it says."""
    config = getattr(module, "config", None)
    found = getattr(config, "_attn_implementation", None)
    return found if isinstance(found, str) else None


def set_implementation(module: nn.Module, kernel: str) -> str:
    """Switch a transformers model's attention kernel (``--attn-implementation``); returns
    the note for the report."""
    setter = getattr(module, "set_attn_implementation", None)
    if not callable(setter):
        raise UsageError(
            f"--attn-implementation needs a transformers model; {type(module).__name__} "
            "has no attention kernel to switch"
        )
    try:
        setter(kernel)
    except (ValueError, ImportError) as exc:  # an unknown name, a kernel not installed
        text = str(exc).strip().splitlines()
        raise UsageError(f"--attn-implementation {kernel!r}: {text[0] if text else exc}") from None
    return f"attention kernel: {kernel} (--attn-implementation)"
