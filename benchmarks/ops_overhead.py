"""What ``--ops`` costs: every tensor op captured with statistics, against a bare forward.

    python benchmarks/ops_overhead.py [--reps 9] [--only resnet,gpt2] [--json]

Two models, each timed interleaved (``common.interleaved``) in one process:

- ``resnet18ish`` (``models.py``) at 1x3x224x224;
- ``gpt2ish``: a GPT-2-tiny-shaped transformer written here like Hugging Face's GPT-2 (token
  and position embeddings, ``Conv1D`` as ``addmm`` on a view, heads split with
  ``split``/``view``/``transpose``, SDPA, ``gelu_new`` as seven functional ops, residual adds)
  with 4 blocks of width 256 over 128 tokens.

Contenders: the bare forward (grad mode), fvis capturing every leaf module (``--ops`` off),
fvis capturing every compute op (``ops=True``, no pattern: statistics for each, grad mode,
what ``fvis dump --ops`` pays before pictures), every op including views and in-place ops
(patterns spelling each op out), every compute op in inference mode, and fvis listing the
ops only (what ``fvis layers --ops`` runs). torchlens is timed too
when it is importable (it is not installed in the project's venvs: then it is skipped and
the output says so).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, os.environ.get("FVIS_BENCH_SRC", str(HERE.parent)))
sys.path.insert(0, str(HERE))

import models  # noqa: E402
import torch  # noqa: E402
from cases import leaves  # noqa: E402
from common import STEADY_MALLOC, interleaved, steady_malloc_env  # noqa: E402
from gpt2ish import GPT2_INPUT, GPT2ish  # noqa: E402
from torch import Tensor, nn  # noqa: E402


def _cases() -> dict[str, tuple[nn.Module, Tensor]]:
    torch.manual_seed(0)
    return {
        "resnet": (models.resnet18ish(), torch.randn(models.RESNET_INPUT)),
        "gpt2": (GPT2ish().eval(), torch.randint(0, 5000, GPT2_INPUT)),
    }


def _spelled(model: nn.Module, x: Tensor) -> list[str]:
    """Patterns that spell out every op the model runs (``*:relu_*``, ``*:view*``): views and
    in-place ops are captured too, as a user naming them gets."""
    from fvis.capture import capture

    ops = capture(model, [x], [], ops=True, every_op=False).ops
    return sorted({f"*:{o.op}#*" for o in ops})


def _contenders(model: nn.Module, x: Tensor) -> dict[str, Any]:
    from fvis.capture import Mode, capture

    every_leaf = leaves(model)
    spelled = _spelled(model, x)

    def bare() -> None:
        with torch.enable_grad():
            model(x)

    return {
        "bare forward (grad)": bare,
        "fvis every leaf, --ops off": lambda: capture(model, [x], every_leaf, keep_values=False),
        "fvis every compute op + stats": lambda: capture(
            model, [x], [], ops=True, keep_values=False
        ),
        "fvis every op incl. views/in-place": lambda: capture(
            model, [x], spelled, ops=True, keep_values=False
        ),
        "fvis every op + stats (inference)": lambda: capture(
            model, [x], [], ops=True, keep_values=False, mode=Mode.INFERENCE
        ),
        "fvis ops listed only": lambda: capture(model, [x], [], ops=True, every_op=False),
    }


def _torchlens(model: nn.Module, x: Tensor) -> Any:
    try:
        import torchlens  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        trace = torchlens.log_forward_pass  # the torchlens < 2 spelling
    except Exception:  # 2.x raises a teaching error for the old name: trace() replaced it
        trace = torchlens.trace
    return lambda: trace(model, x)  # every op, values saved (its defaults)


def measure(name: str, reps: int) -> dict[str, Any]:
    model, x = _cases()[name]
    from fvis.capture import capture

    result = capture(model, [x], _spelled(model, x), ops=True, keep_values=False)
    fns = _contenders(model, x)
    lens = _torchlens(model, x)
    if lens is not None:
        fns["torchlens full trace"] = lens
    timings = interleaved(fns, reps)
    bare = timings["bare forward (grad)"].median
    return {
        "model": name,
        "ops": len(result.ops),
        "captured": len(result.captures),
        "medians_s": {k: t.median for k, t in timings.items()},
        "ratio_to_bare": {k: t.median / bare for k, t in timings.items()},
        "spread": {k: t.spread for k, t in timings.items()},
        "torchlens": "timed" if lens is not None else "not importable: skipped",
    }


def main() -> None:
    if any(os.environ.get(k) != v for k, v in STEADY_MALLOC.items()):  # as run.py's children
        os.execve(sys.executable, [sys.executable, *sys.argv], steady_malloc_env())
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--only", default="resnet,gpt2")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = [measure(name, args.reps) for name in args.only.split(",")]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        print(f"{row['model']}: {row['ops']} ops, {row['captured']} captured; {row['torchlens']}")
        for key, ratio in row["ratio_to_bare"].items():
            ms = row["medians_s"][key] * 1e3
            print(f"  {key:36s} {ms:9.2f} ms  {ratio:5.2f}x  (spread {row['spread'][key]:.2f})")


if __name__ == "__main__":
    main()
