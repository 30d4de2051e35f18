"""One capture-overhead case in a fresh process: ``fvis.capture.capture`` vs a bare forward.

    python benchmarks/capture_case.py LABEL MODE REPS     # prints one JSON object

A fresh process per (model, mode) because the allocator state one case leaves behind changes
the next one's speed: after inference-mode runs, a grad-mode forward of the ResNet-18-shaped
model took ~5000 page faults and 25 ms per call instead of ~300 and 17 ms.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, os.environ.get("FVIS_BENCH_SRC", str(HERE.parent)))

import torch  # noqa: E402
from cases import capture_cases, leaves  # noqa: E402
from common import interleaved  # noqa: E402


def faults_per_call(fn: Any, calls: int = 10) -> float:
    """Minor page faults per call (memory the allocator had to get from the kernel again)."""
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def main() -> None:
    label, mode, reps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    from fvis.capture import Mode, capture

    torch.set_num_threads(2)
    model, x = capture_cases()[label]()
    layers = leaves(model)
    ctx = torch.inference_mode if mode == "inference" else torch.enable_grad

    def bare() -> None:
        with ctx():
            model(x)

    def fvis() -> None:
        capture(model, [x], layers, mode=Mode(mode), keep_values=False)

    t = interleaved({"bare": bare, "fvis": fvis}, reps)
    out = {
        name: {"median": v.median, "reps": list(v.reps), "attempts": v.attempts, "others": v.others}
        for name, v in t.items()
    }
    out["leaves"] = len(layers)
    out["faults"] = {"bare": faults_per_call(bare), "fvis": faults_per_call(fvis)}
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
