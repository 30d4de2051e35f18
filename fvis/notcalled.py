"""Verdicts for requested modules whose ``__call__`` never happened, and why.

"Never ran" is often false: ``nn.MultiheadAttention`` uses ``out_proj.weight`` through
``F.multi_head_attention_forward`` without calling ``out_proj``, Swin's attention calls
``F.linear`` with ``qkv.weight``; the module's parameters are on the graph all the same. A
container (``ModuleList``) has no forward at all, and ``torch.export`` removes modules that do
nothing in eval (Dropout, Identity). Only the first kind can be proven from the graph: the
parameters' ``AccumulateGrad`` nodes are reached from the output.
"""

from __future__ import annotations

from typing import Any

from fvis.capture import CaptureResult, NotCalled, flatten_tensors


def reached_leaves(output: Any) -> set[int]:
    """``id`` of every leaf tensor (parameter) whose ``AccumulateGrad`` node is reachable
    back from the output's tensors."""
    stack = [t.grad_fn for _, t in flatten_tensors(output) if t.grad_fn is not None]
    seen: set[int] = set()
    leaves: set[int] = set()
    alive = []  # hold every node: an id of a freed wrapper could be reused
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        alive.append(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad holds its leaf
        if variable is not None:
            leaves.add(id(variable))
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    return leaves


def not_called_verdicts(result: CaptureResult, verdict: Any, cause: Any) -> dict[str, Any]:
    """A verdict per requested module that was not called (``verdict``/``cause``: the
    ``fvis.grads`` types, passed in to keep the import one way)."""
    infos = list(result.not_called.values())
    needs_graph = any(i.params for i in infos) and result.mode.value == "grad"
    leaves = reached_leaves(result.output) if needs_graph else set()
    return {i.name: _one(i, leaves, needs_graph, verdict, cause) for i in infos}


def _one(info: NotCalled, leaves: set[int], checked: bool, verdict: Any, cause: Any) -> Any:
    name, cls = info.name, info.class_name
    if info.container and not info.exported:  # an export leaves a bare Module placeholder
        return verdict(
            False,
            cause.CONTAINER,
            name,
            f"a container ({cls}): it has no forward of its own and is never called",
            "name its items instead (e.g. 'layers.0' or 'layers.*')",
        )
    used = [p for p in info.params if id(p) in leaves]
    if used:
        return verdict(
            False,
            cause.PARAMS_USED,
            name,
            f"not called as a module, but {len(used)} of its {len(info.params)} trainable "
            "parameter tensors reach the output (its parent uses them in functional code or "
            "calls .forward() directly)",
            f"its parameters are trained; to see its output, hook the parent of {name}",
        )
    if info.exported:
        return verdict(
            False,
            cause.REMOVED_BY_EXPORT,
            name,
            f"removed by export: the exported program has no call of {name} ({cls})",
            "torch.export drops modules that do nothing in eval (Dropout, Identity); give "
            "--arch to load the original module tree",
        )
    if not info.has_params:
        what = " (parameter-free)"
    elif info.params and checked:
        what = " (its parameters do not reach the output)"
    else:
        what = ""
    return verdict(
        False,
        cause.NOT_CALLED,
        name,
        f"never ran for this input{what}: {name}.__call__ did not happen",
        "a branch not taken in this configuration, .forward() called directly, or work "
        "its parent does functionally (e.g. attention dropout inside "
        "scaled_dot_product_attention); hook its parent instead",
    )
