"""fvis on CUDA: capture overhead and host syncs per forward (issue 17). Needs a GPU.

    python benchmarks/cuda_overhead.py [--reps 20] [--dtype float32|bfloat16]

For the ResNet-18-shaped model at 1x3x224x224 and the GPT-2-tiny-shaped transformer of
``ops_overhead.py``, on ``cuda``: the bare forward against fvis capturing every leaf (grad
and inference mode), each timed with ``torch.cuda.synchronize`` around the call, interleaved;
and the host syncs of one captured forward, counted as the scalar reads (``item()``,
``float(t)``: ``aten._local_scalar_dense``) and copies to the host (``aten._to_copy`` /
``copy_`` to the CPU) seen by a dispatch mode, for 4, 8 and every leaf hooked: with fvis's
deferred statistics the count must not grow with the hooked layers (grad mode). Prints a
Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, os.environ.get("FVIS_BENCH_SRC", str(HERE.parent)))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from cases import leaves  # noqa: E402
from common import interleaved  # noqa: E402
from ops_overhead import _cases  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from fvis.capture import Mode, capture  # noqa: E402


class HostReads(TorchDispatchMode):
    """Counts scalar reads and device-to-host copies: each is a host sync on CUDA."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        aten = torch.ops.aten
        if func is aten._local_scalar_dense.default:
            self.count += 1
        elif func is aten._to_copy.default:
            self.count += args[0].is_cuda and str(kwargs.get("device", "")).startswith("cpu")
        elif func is aten.copy_.default:
            self.count += args[0].is_cpu and args[1].is_cuda
        return func(*args, **kwargs)


def _synced(fn: Any) -> Any:
    def run() -> None:
        fn()
        torch.cuda.synchronize()

    return run


def _row(name: str, model: Any, x: Any, reps: int) -> str:
    names = leaves(model)

    def bare() -> None:
        with torch.enable_grad():
            model(x)

    timings = interleaved(
        {
            "bare": _synced(bare),
            "grad": _synced(lambda: capture(model, [x], names, mode=Mode.GRAD)),
            "inference": _synced(lambda: capture(model, [x], names, mode=Mode.INFERENCE)),
        },
        reps,
    )
    syncs = []
    for count in (4, 8, len(names)):
        reads = HostReads()
        with reads:
            capture(model, [x], names[:count], mode=Mode.GRAD)
        syncs.append(reads.count)
    b, g, i = (timings[k].median for k in ("bare", "grad", "inference"))
    return (
        f"| {name} | {b * 1e3:.2f} ms | {g * 1e3:.2f} ms | {g / b:.2f}x | "
        f"{i * 1e3:.2f} ms | {i / b:.2f}x | {' / '.join(map(str, syncs))} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark needs a GPU")
    dtype = getattr(torch, args.dtype)
    print(f"{torch.cuda.get_device_name()}, {args.dtype}")
    print(
        "| model | bare | fvis every leaf, grad | ratio | inference | ratio | "
        "host syncs (4 / 8 / all leaves hooked) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, (model, x) in _cases().items():
        model = model.to("cuda", dtype)
        x = x.to("cuda", dtype) if x.is_floating_point() else x.to("cuda")
        print(_row(name, model, x, args.reps))


if __name__ == "__main__":
    main()
