"""fvis against torchlens, captum and torchinfo, on the ResNet-18-shaped model, in one process.

Run by ``run.py --peers`` with ``benchmarks/.venv-peers/bin/python`` (the peers are installed
there only); prints one JSON object to stdout.

    benchmarks/.venv-peers/bin/python benchmarks/peers.py --reps 15 --checkpoint CKPT

Order matters: torchlens wraps torch's functions on its first trace and leaves them wrapped,
which slows every later plain forward in the process. So bare / fvis / captum / torchinfo are
timed first (interleaved), then torchlens, interleaved with fvis and the bare forward again
(both now running on wrapped torch: the torchlens / fvis ratio of that phase is like for like).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# fvis from the working tree (or run.py's --fvis-ref snapshot), whatever the venv holds
sys.path.insert(0, os.environ.get("FVIS_BENCH_SRC", str(HERE.parent)))

import models  # noqa: E402
import torch  # noqa: E402
from cases import leaves  # noqa: E402
from common import Timing, interleaved  # noqa: E402


def _row(t: Timing) -> dict[str, Any]:
    return {"median": t.median, "reps": list(t.reps), "attempts": t.attempts, "others": t.others}


def capture_peers(model: torch.nn.Module, x: torch.Tensor, reps: int) -> dict[str, Timing]:
    """bare forward (grad and no-grad), fvis capture, captum LayerActivation: interleaved."""
    from captum.attr import LayerActivation

    from fvis.capture import Mode, capture

    layers = leaves(model)
    captum = LayerActivation(model, [model.get_submodule(n) for n in layers])

    def bare_grad() -> None:
        with torch.enable_grad():
            model(x)

    def bare_nograd() -> None:
        with torch.no_grad():
            model(x)

    return interleaved(
        {
            "bare forward (grad)": bare_grad,
            "bare forward (no_grad)": bare_nograd,
            "fvis capture, every leaf, grad, no values": lambda: capture(
                model, [x], layers, mode=Mode.GRAD, keep_values=False
            ),
            "fvis capture, every leaf, grad, values kept": lambda: capture(
                model, [x], layers, mode=Mode.GRAD, keep_values=True
            ),
            "captum LayerActivation, same layers": lambda: captum.attribute(x),
        },
        reps,
    )


def listing_peers(
    model: torch.nn.Module, checkpoint: str, arch: str, reps: int
) -> dict[str, Timing]:
    """torchinfo summary against fvis layers --shape (in-process list_layers)."""
    import torchinfo

    from fvis.api import list_layers, open_model, prepare_inputs, resolve_model, trace_runs
    from fvis.inputs import InputOptions
    from fvis.loading import LoadOptions

    ref = resolve_model(Path(checkpoint), LoadOptions(arch=arch))[0]
    inputs = InputOptions(shape=models.RESNET_INPUT)
    loaded = open_model(ref)
    prepared = prepare_inputs(loaded, inputs)
    return interleaved(
        {
            "torchinfo summary(model, input_size), depth 10": lambda: torchinfo.summary(
                model, input_size=models.RESNET_INPUT, verbose=0, depth=10
            ),
            "fvis list_layers(checkpoint, shape) (loads the file too)": lambda: list_layers(
                ref, inputs
            ),
            "fvis trace_runs(loaded model) (the forward part only)": lambda: trace_runs(
                loaded, prepared
            ),
        },
        reps,
    )


def torchlens_phase(
    model: torch.nn.Module, x: torch.Tensor, reps: int, timings: dict[str, Timing]
) -> dict[str, Any]:
    import torchlens

    try:
        trace = torchlens.log_forward_pass  # the torchlens < 2 spelling
    except Exception:  # 2.x raises a teaching error for the old name: trace() replaced it
        trace = torchlens.trace
    from fvis.capture import Mode, capture

    layers = leaves(model)
    start = time.perf_counter()
    trace(model, x)  # the first call wraps torch's functions
    first = time.perf_counter() - start
    timed = interleaved(
        {
            "torchlens full trace (every op, values saved)": lambda: trace(model, x),
            "fvis capture, every leaf, grad, no values (torch wrapped by torchlens)": lambda: (
                capture(model, [x], layers, mode=Mode.GRAD, keep_values=False)
            ),
            "bare forward (grad) (torch wrapped by torchlens)": lambda: model(x),
        },
        reps,
    )
    timings.update(timed)
    return {
        "torchlens_entry": getattr(trace, "__name__", "trace"),
        "torchlens_first_call_s": first,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--arch", default=f"{HERE / 'models.py'}:resnet18ish")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = models.resnet18ish()
    model.load_state_dict(torch.load(args.checkpoint, weights_only=True))
    x = torch.randn(models.RESNET_INPUT)
    out: dict[str, Any] = {"errors": {}}
    timings: dict[str, Timing] = {}
    for name, step in (
        ("capture", lambda: timings.update(capture_peers(model, x, args.reps))),
        (
            "listing",
            lambda: timings.update(listing_peers(model, args.checkpoint, args.arch, args.reps)),
        ),
        ("torchlens", lambda: out.update(torchlens_phase(model, x, args.reps, timings))),
    ):
        try:
            step()
        except Exception as exc:  # one peer failing must not hide the others' numbers
            out["errors"][name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    out["timings"] = {name: _row(t) for name, t in timings.items()}
    out["versions"] = {p: version(p) for p in ("torchlens", "captum", "torchinfo")}
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
