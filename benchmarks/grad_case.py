"""The grad-tracking verdicts' own cost, in a fresh process: graph walk and diagnosis vs a forward.

    python benchmarks/grad_case.py BATCH REPS     # prints one JSON object

On the ResNet-18-shaped model with every leaf captured (what ``fvis dump --all`` hooks), at
batch ``BATCH``: a bare forward (grad and inference mode), the grad-mode capture, then
``fvis.grads.reachable_edges(result.output)`` and ``fvis.grads.diagnose(result)`` on one
captured result (its graph is kept alive, as in ``dump``), interleaved. Also the size of what
grad mode keeps alive: the activation bytes autograd saves for backward (parameters not
counted) and the bytes of the captured leaf outputs, each storage counted once.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, os.environ.get("FVIS_BENCH_SRC", str(HERE.parent)))

import models  # noqa: E402
import torch  # noqa: E402
from cases import leaves  # noqa: E402
from common import interleaved  # noqa: E402


def saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the non-parameter tensors autograd saves for backward in one grad forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(seen.values())


def main() -> None:
    batch, reps = int(sys.argv[1]), int(sys.argv[2])
    from fvis.capture import Mode, capture
    from fvis.grads import _walk, diagnose, reachable_edges

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = models.resnet18ish()
    x = torch.randn(batch, *models.RESNET_INPUT[1:])
    layers = leaves(model)
    result = capture(model, [x], layers, mode=Mode.GRAD, keep_values=False)
    edges = reachable_edges(result.output)
    root = torch.autograd.graph.get_gradient_edge(result.output)
    nodes: set[int] = set()
    stack = [root.node]
    while stack:  # the same walk, counting nodes instead of edges
        node = stack.pop()
        if id(node) in nodes:
            continue
        nodes.add(id(node))
        stack.extend(n for n, _ in node.next_functions if n is not None)
    assert len(_walk([(root.node, root.output_nr)])) == len(edges)
    verdicts = diagnose(result)
    captured = {
        c.untyped_storage().data_ptr(): c.untyped_storage().nbytes()
        for c in _leaf_outputs(model, x, layers)
    }

    def bare_grad() -> None:
        with torch.enable_grad():
            model(x)

    def bare_inference() -> None:
        with torch.inference_mode():
            model(x)

    t = interleaved(
        {
            "bare forward (grad)": bare_grad,
            "bare forward (inference)": bare_inference,
            "fvis capture, every leaf, grad, no values": lambda: capture(
                model, [x], layers, mode=Mode.GRAD, keep_values=False
            ),
            "fvis.grads.reachable_edges(result.output)": lambda: reachable_edges(result.output),
            "fvis.grads.diagnose(result)": lambda: diagnose(result),
        },
        reps,
    )
    out: dict[str, Any] = {
        "timings": {
            name: {
                "median": v.median,
                "reps": list(v.reps),
                "attempts": v.attempts,
                "others": v.others,
            }
            for name, v in t.items()
        },
        "batch": batch,
        "leaves": len(layers),
        "captures": len(result.captures),
        "verdicts": len(verdicts),
        "graph_nodes": len(nodes),
        "graph_edges": len(edges),
        "saved_mb": saved_bytes(model, x) / 1e6,
        "captured_mb": sum(captured.values()) / 1e6,
        "input_mb": x.nbytes / 1e6,
    }
    json.dump(out, sys.stdout)


def _leaf_outputs(model: torch.nn.Module, x: torch.Tensor, layers: list[str]) -> list[torch.Tensor]:
    """The output of every call of the captured leaves (inference mode: no graph kept)."""
    wanted = {id(model.get_submodule(n)) for n in layers}
    outs: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, _args: Any, output: Any) -> None:
        if id(module) in wanted and isinstance(output, torch.Tensor):
            outs.append(output)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        with torch.inference_mode():
            model(x)
    finally:
        handle.remove()
    return outs


if __name__ == "__main__":
    main()
