"""Where fvis spends its time: profiles and what-if timings behind the misses in BENCHMARKS.md.

    python benchmarks/hotpaths.py [--reps 15]

1. cProfile of ``capture`` on every leaf of the ResNet-18-shaped model (both modes), fvis
   functions only, by total and own time.
2. What-if: the same capture with ``fvis.capture.tensor_stats`` replaced by (a) a 3-pass
   prototype (aminmax, std_mean, per-channel count_nonzero; the current code as the fallback
   when a value is not finite) and (b) nothing at all (the floor of the hook machinery),
   interleaved with a bare forward.
3. Fixed cost per capture call on a tiny model (5 modules) and scaling on a deep model.
4. cProfile of a whole in-process ``fvis dump --all`` (images) on a checkpoint.

Nothing here changes fvis; the patches live only in this process.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import os
import pstats
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, os.environ.get("FVIS_BENCH_SRC", str(HERE.parent)))

import torch  # noqa: E402

import models  # noqa: E402
from common import fmt_s, interleaved  # noqa: E402


def leaves(model: torch.nn.Module) -> list[str]:
    from fvis.api import DumpOptions, choose_layers
    from fvis.layers import ModelTree, node_from_module

    return list(choose_layers(ModelTree.of(node_from_module(model)), DumpOptions(all_leaves=True))[0])


def profile_top(fn: object, calls: int, only: str = "fvis", n: int = 14) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()  # type: ignore[operator]
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    total = stats.total_tt  # type: ignore[attr-defined]
    rows = []
    for (file, line, name), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if only in file or (only == "fvis" and file == "~" and name.startswith("<built-in method torch")):
            rows.append((ct, tt, nc, f"{Path(file).name}:{line}({name})" if file != "~" else name))
    rows.sort(reverse=True)
    lines = [f"    total {fmt_s(total / calls)} per call under cProfile ({calls} calls)"]
    lines.append(f"    {'cum/call':>10} {'own/call':>10} {'calls/call':>10}  function")
    for ct, tt, nc, label in rows[:n]:
        lines.append(f"    {fmt_s(ct / calls):>10} {fmt_s(tt / calls):>10} {nc / calls:>10.0f}  {label}")
    return "\n".join(lines)


def fast_stats_factory():  # type: ignore[no-untyped-def]
    """A 3-pass ``tensor_stats`` prototype; falls back to fvis's own for non-finite values."""
    from fvis.stats import Stats, tensor_stats

    def fast_stats(tensor: torch.Tensor) -> Stats:
        data = tensor.detach()
        if data.is_complex() or not data.is_floating_point() or data.numel() == 0:
            return tensor_stats(tensor)
        with torch.no_grad():
            lo, hi = (float(v) for v in torch.aminmax(data))
            if not (math.isfinite(lo) and math.isfinite(hi)):
                return tensor_stats(tensor)  # NaN or Inf: the careful path
            std, mean = torch.std_mean(data) if data.numel() > 1 else (torch.zeros(()), data.sum())
            if data.dim() >= 3:
                nonzero = torch.count_nonzero(data, dim=[0, *range(2, data.dim())])
                zeros, dead, channels = data.numel() - int(nonzero.sum()), int((nonzero == 0).sum()), data.shape[1]
            else:
                zeros, dead, channels = data.numel() - int(torch.count_nonzero(data)), 0, 0
        return Stats(data.numel(), lo, hi, float(mean), float(std), zeros / data.numel(), 0, 0, 0, int(channels), dead)

    return fast_stats


def whatif(reps: int) -> str:
    import fvis.capture as cap
    from fvis.capture import Mode, capture
    from fvis.stats import Stats

    original = cap.tensor_stats
    fast = fast_stats_factory()
    nothing = Stats(1, 0.0, 0.0, 0.0, 0.0, 0.0, 0, 0, 0, 0, 0)
    model, x = models.resnet18ish(), torch.randn(models.RESNET_INPUT)
    layers = leaves(model)
    lines = []
    for mode, ctx in (("inference", torch.inference_mode), ("grad", torch.enable_grad)):

        def run(stats, mode=mode):  # type: ignore[no-untyped-def]
            def call() -> None:
                cap.tensor_stats = stats
                try:
                    capture(model, [x], layers, mode=Mode(mode), keep_values=False)
                finally:
                    cap.tensor_stats = original

            return call

        def bare(ctx=ctx) -> None:  # type: ignore[no-untyped-def]
            with ctx():
                model(x)

        t = interleaved(
            {
                "bare": bare,
                "fvis as is": run(original),
                "3-pass stats": run(fast),
                "no stats": run(lambda _t: nothing),
            },
            reps,
        )
        base = t["bare"].median
        lines.append(
            f"  {mode}: bare {fmt_s(base)}; "
            + "; ".join(f"{k} {fmt_s(v.median)} = {v.median / base:.2f}x" for k, v in t.items() if k != "bare")
        )
    # the prototype must agree with fvis on a finite tensor
    probe = torch.randn(2, 8, 5, 5).relu()
    a, b = original(probe), fast(probe)
    agree = all(
        math.isclose(getattr(a, f), getattr(b, f), rel_tol=1e-4, abs_tol=1e-6)
        for f in ("min", "max", "mean", "std", "zero_fraction", "dead_channels", "channels")
    )
    lines.append(f"  3-pass prototype agrees with fvis.stats.tensor_stats on a probe: {agree}")
    return "\n".join(lines)


def fixed_costs(reps: int) -> str:
    from fvis.capture import Mode, capture
    from sample_models.zoo import build, example_input

    lines = []
    tiny, tx = build("inner_outer"), example_input("inner_outer")
    tiny_layers = leaves(tiny)
    t = interleaved(
        {
            "bare": lambda: tiny(tx),
            "capture": lambda: capture(tiny, [tx], tiny_layers, mode=Mode.GRAD, keep_values=False),
        },
        reps,
    )
    lines.append(
        f"  inner_outer (5 modules): bare {fmt_s(t['bare'].median)}, capture "
        f"{fmt_s(t['capture'].median)}: fixed cost ~{fmt_s(t['capture'].median - t['bare'].median)} per call"
    )
    lines.append(profile_top(lambda: capture(tiny, [tx], tiny_layers, mode=Mode.GRAD, keep_values=False), 300, n=12))
    for depth in (50, 100, 200, 400):
        model, x = models.deep_narrow(depth), torch.randn(models.DEEP_INPUT)
        layers = leaves(model)
        for mode in (Mode.INFERENCE, Mode.GRAD):
            t = interleaved(
                {
                    "bare": lambda m=model, x=x, mode=mode: _bare(m, x, mode),
                    "capture": lambda m=model, x=x, mode=mode, ls=layers: capture(m, [x], ls, mode=mode, keep_values=False),
                },
                max(3, reps // 3),
            )
            extra = t["capture"].median - t["bare"].median
            lines.append(
                f"  deep_narrow depth {depth} ({2 * depth} leaves), {mode.value}: bare {fmt_s(t['bare'].median)}, "
                f"capture {fmt_s(t['capture'].median)}, extra per leaf {fmt_s(extra / (2 * depth))}"
            )
    return "\n".join(lines)


def _bare(model: torch.nn.Module, x: torch.Tensor, mode: object) -> None:
    from fvis.capture import Mode

    ctx = torch.inference_mode() if mode is Mode.INFERENCE else torch.enable_grad()
    with ctx:
        model(x)


def dump_profile() -> str:
    from fvis.cli import main

    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "r.pt"
        torch.save(models.resnet18ish().state_dict(), ckpt)
        for extra in (["--all"], ["--all", "--no-images"]):
            count = [0]

            def one(extra: list[str] = extra) -> None:
                count[0] += 1
                sys.argv = ["fvis", "dump", str(ckpt), "--arch", f"{HERE / 'models.py'}:resnet18ish",
                            "--shape", "1,3,224,224", "-q", "--out", f"{tmp}/o{count[0]}", *extra]
                try:
                    main()
                except SystemExit:
                    pass

            one()  # warm: imports happen once
            lines.append(f"  fvis dump {' '.join(extra)} (in process, imports already done):")
            lines.append(profile_top(one, 3, n=22))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--only", default="profile,whatif,fixed,dump")
    args = parser.parse_args()
    torch.set_num_threads(2)
    only = args.only.split(",")
    model, x = models.resnet18ish(), torch.randn(models.RESNET_INPUT)
    layers = leaves(model)
    from fvis.capture import Mode, capture

    if "profile" in only:
        for mode in (Mode.INFERENCE, Mode.GRAD):
            for _ in range(3):
                capture(model, [x], layers, mode=mode, keep_values=False)
            print(f"## capture, ResNet-18-shaped, every leaf ({len(layers)}), {mode.value}")
            print(profile_top(lambda mode=mode: capture(model, [x], layers, mode=mode, keep_values=False), 20))
    if "whatif" in only:
        print("## what-if: tensor_stats replaced (ResNet-18-shaped, every leaf)")
        print(whatif(args.reps))
    if "fixed" in only:
        print("## fixed cost per call and per leaf")
        print(fixed_costs(args.reps))
    if "dump" in only:
        print("## whole dump, in process")
        print(dump_profile())


if __name__ == "__main__":
    main()
