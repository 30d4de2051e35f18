"""Per-record cost of module capture (issue 15): every leaf captured, ``--ops`` off.

    python benchmarks/per_record.py [--reps 15] [--only deep,resnet,gpt2] [--modes grad,inference]
                                    [--threads 2]

For each model and grad mode, timed interleaved in one process (``common.interleaved``):

- ``bare``: the forward alone, under the same grad mode;
- ``hooks``: the forward with one empty global forward pre-hook and one empty global forward
  hook (``with_kwargs=True``), each doing the dict lookup fvis does: the floor any tool that
  sees every module call through hooks pays;
- ``fvis``: ``fvis.capture.capture`` of every leaf, ``keep_values=False`` (statistics,
  snapshot facts, trace; no pictures), with the C hooks (``fvis/_trace.c``);
- ``python``: the same capture with the C hooks off (``fvis.fasthooks.USE_NATIVE = False``):
  the Python session alone, what every build without a C compiler runs.

``--clock cpu`` (the table in BENCHMARKS.md) times CPU time of this thread
(``time.thread_time``) instead of the wall clock, and keeps the fastest of ``--reps``
interleaved repetitions of 5 calls each (``fastest_cpu``; ``--collect``: each from a full
collection): on a shared 2-core machine the wall clock of a 2 ms forward swings by ±20-30%
with the other processes; with ``--threads 1`` the thread's CPU time is all the work there is.

"per record" is the extra time over the bare forward divided by the captures (one per leaf
call here). Models: ``deep_narrow`` (400 small leaves, 16x64), the ResNet-18-shaped CNN at
1x3x224x224, and a GPT-2-tiny-shaped transformer (``GPT2ish``: 4 blocks of width 256 over 128
tokens, Hugging Face's names and ``Conv1D``; the same shape as ``ops_overhead.py``'s).
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, os.environ.get("FVIS_BENCH_SRC", str(HERE.parent)))
sys.path.insert(0, str(HERE))

import models  # noqa: E402
import torch  # noqa: E402
from cases import leaves  # noqa: E402
from common import Timing, fmt_s, interleaved  # noqa: E402
from gpt2ish import GPT2_INPUT, GPT2ish  # noqa: E402
from torch import Tensor, nn  # noqa: E402


def cases() -> dict[str, tuple[nn.Module, Tensor]]:
    torch.manual_seed(0)
    return {
        "deep": (models.deep_narrow(200), torch.randn(models.DEEP_INPUT)),
        "resnet": (models.resnet18ish(), torch.randn(models.RESNET_INPUT)),
        "gpt2": (GPT2ish().eval(), torch.randint(0, 5000, GPT2_INPUT)),
    }


def _grad(mode: str) -> Any:
    return torch.inference_mode() if mode == "inference" else torch.enable_grad()


def _bare(model: nn.Module, x: Tensor, mode: str) -> Callable[[], object]:
    def run() -> object:
        with _grad(mode):
            return model(x)

    return run


def _hooks(model: nn.Module, x: Tensor, mode: str) -> Callable[[], object]:
    known = {id(m): m for m in model.modules()}

    def pre(module: nn.Module, args: Any) -> None:
        if id(module) not in known:
            return

    def post(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if id(module) not in known:
            return

    hooks = torch.nn.modules.module

    def run() -> object:
        with (
            _grad(mode),
            hooks.register_module_forward_pre_hook(pre),
            hooks.register_module_forward_hook(post, with_kwargs=True),
        ):
            return model(x)

    return run


def _fvis(
    model: nn.Module, x: Tensor, mode: str, layers: list[str], native: bool = True
) -> Callable[[], object]:
    from fvis import fasthooks
    from fvis.capture import Mode, capture

    chosen = Mode.INFERENCE if mode == "inference" else Mode.GRAD

    def run() -> object:
        before, fasthooks.USE_NATIVE = fasthooks.USE_NATIVE, native and fasthooks.USE_NATIVE
        try:
            return capture(model, [x], layers, mode=chosen, keep_values=False)
        finally:
            fasthooks.USE_NATIVE = before

    return run


def fastest_cpu(
    fns: dict[str, Callable[[], object]], reps: int, calls: int = 5, collect: bool = False
) -> dict[str, Timing]:
    """Thread CPU seconds per call: the fastest of ``reps`` interleaved repetitions of
    ``calls`` calls. The cycle collector runs as it does in any loop of captures; with
    ``collect`` each repetition starts from a full collection instead (which leaves the
    first call of each repetition cold for every contender: ~15% slower bare forwards)."""
    names = list(fns)
    for name in names:  # warm-up
        fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            if collect:
                gc.collect()
            start = time.thread_time()
            for _ in range(calls):
                fns[name]()
            samples[name].append((time.thread_time() - start) / calls)
    return {name: Timing(min(s), tuple(s)) for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--only", default="deep,resnet,gpt2")
    parser.add_argument("--modes", default="inference,grad")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--collect", action="store_true", help="--clock cpu: gc.collect() per rep")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    chosen = args.only.split(",")
    for name, (model, x) in cases().items():
        if name not in chosen:
            continue
        layers = leaves(model)
        for mode in args.modes.split(","):
            records = len(_fvis(model, x, mode, layers)().captures)  # type: ignore[attr-defined]
            timer = (
                functools.partial(fastest_cpu, collect=args.collect)
                if args.clock == "cpu"
                else interleaved
            )
            t = timer(
                {
                    "bare": _bare(model, x, mode),
                    "hooks": _hooks(model, x, mode),
                    "fvis": _fvis(model, x, mode, layers),
                    "python": _fvis(model, x, mode, layers, native=False),
                },
                args.reps,
            )
            bare, hooks, fv = t["bare"].median, t["hooks"].median, t["fvis"].median
            py = t["python"].median
            print(
                f"{name:6} {mode:9} {records:3} captures: bare {fmt_s(bare)} "
                f"(±{t['bare'].spread / 2:.0%}), empty hooks {hooks / bare:.3f}x "
                f"({(hooks - bare) / records * 1e6:.1f} us/record), fvis {fmt_s(fv)} "
                f"{fv / bare:.3f}x ({(fv - bare) / records * 1e6:.1f} us/record, "
                f"{(fv - hooks) / records * 1e6:.1f} us over the empty hooks); "
                f"python hooks {py / bare:.3f}x ({(py - bare) / records * 1e6:.1f} us/record); "
                f"others {t['bare'].others:.1f} cores",
                flush=True,
            )


if __name__ == "__main__":
    main()
