"""Where fvis spends its time: profiles and what-if timings behind the misses in BENCHMARKS.md.

    python benchmarks/hotpaths.py [--reps 15] [--only passes,kernels,profile,whatif,fixed,dump,crc]

0. ``tensor_stats`` pass by pass (aminmax, sum, vector_norm, zero count, per-channel amax and
   amin), each summed over every capture of one ResNet-18-shaped forward, against that forward;
   and each kernel on one 1x64x112x112 map.
1. cProfile of ``capture`` on every leaf of the ResNet-18-shaped model (both modes), fvis
   functions only, by total and own time.
2. What-if: the same capture with ``fvis.session.tensor_stats`` replaced by (a) a 5-kernel
   prototype (aminmax, sum, norm of the centred values, per-channel count_nonzero; the current
   code as the fallback when a value is not finite) and (b) nothing at all (the floor of the
   hook machinery), and the capture of one layer only (``layer1.0.conv1``: every call is still
   traced), interleaved with a bare forward.
3. Fixed cost per capture call on a tiny model (5 modules) and scaling on a deep model.
4. cProfile of a whole in-process ``fvis dump --all`` (images) on a checkpoint.
5. ``inspect_model`` (what ``fvis layers`` runs) on a 1.14 GB checkpoint, CRC check on and off.

Nothing here changes fvis; the patches live only in this process.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import importlib
import io
import math
import os
import pstats
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, os.environ.get("FVIS_BENCH_SRC", str(HERE.parent)))

import models  # noqa: E402
import torch  # noqa: E402
from cases import leaves  # noqa: E402
from common import (  # noqa: E402
    STEADY_MALLOC,
    cpu_sample,
    fmt_s,
    interleaved,
    others_cores,
    steady_malloc_env,
    wait_quiet,
)


def profile_top(fn: object, calls: int, only: str = "fvis", n: int = 14) -> str:
    others = wait_quiet(max_wait=120)
    before = cpu_sample()
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
        if only in file or (only == "fvis" and file == "~" and "torch" in name):
            rows.append((ct, tt, nc, f"{Path(file).name}:{line}({name})" if file != "~" else name))
    rows.sort(reverse=True)
    during = others_cores(before, cpu_sample())
    lines = [
        f"    total {fmt_s(total / calls)} per call under cProfile ({calls} calls; other "
        f"processes: {others:.1f} cores before, {during:.1f} during)"
    ]
    lines.append(f"    {'cum/call':>10} {'own/call':>10} {'calls/call':>10}  function")
    for ct, tt, nc, label in rows[:n]:
        lines.append(
            f"    {fmt_s(ct / calls):>10} {fmt_s(tt / calls):>10} {nc / calls:>10.0f}  {label}"
        )
    return "\n".join(lines)


def fast_stats_factory():  # type: ignore[no-untyped-def]
    """A ``tensor_stats`` prototype with 5 cheap kernels (aminmax, sum, norm of the centred
    values, per-channel count_nonzero); fvis's own code when a value is not finite."""
    from fvis.stats import Stats, tensor_stats

    def fast_stats(tensor: torch.Tensor) -> Stats:
        data = tensor.detach()
        n = data.numel()
        if data.is_complex() or not data.is_floating_point() or n < 2:
            return tensor_stats(tensor)
        with torch.no_grad():
            lo, hi = (float(v) for v in torch.aminmax(data))  # NaN and Inf show up here
            if not (math.isfinite(lo) and math.isfinite(hi)):
                return tensor_stats(tensor)  # the careful path
            mean = data.sum() / n
            std = float(torch.linalg.vector_norm(data - mean)) / math.sqrt(n - 1)
            if data.dim() >= 3:
                nonzero = torch.count_nonzero(data, dim=[0, *range(2, data.dim())])
                zeros, dead, channels = (
                    n - int(nonzero.sum()),
                    int((nonzero == 0).sum()),
                    data.shape[1],
                )
            else:
                zeros, dead, channels = int((data == 0).sum()), 0, 0
        return Stats(n, lo, hi, float(mean), std, zeros / n, 0, 0, 0, int(channels), dead)

    return fast_stats


def whatif(reps: int) -> str:
    cap = importlib.import_module("fvis.session")  # where the hooks call tensor_stats
    from fvis.capture import Mode, capture
    from fvis.stats import Stats

    original = cap.tensor_stats
    fast = fast_stats_factory()
    nothing = Stats(1, 0.0, 0.0, 0.0, 0.0, 0.0, 0, 0, 0, 0, 0)
    model, x = models.resnet18ish(), torch.randn(models.RESNET_INPUT)
    layers = leaves(model)
    lines = []
    for mode, ctx in (("inference", torch.inference_mode), ("grad", torch.enable_grad)):

        def run(stats, mode=mode, layers=layers):  # type: ignore[no-untyped-def]
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
                "5-kernel stats": run(fast),
                "no stats": run(lambda _t: nothing),
                "one layer (layer1.0.conv1), stats as is": run(original, layers=["layer1.0.conv1"]),
            },
            reps,
        )
        base = t["bare"].median
        lines.append(
            f"  {mode}: bare {fmt_s(base)}; "
            + "; ".join(
                f"{k} {fmt_s(v.median)} = {v.median / base:.2f}x"
                for k, v in t.items()
                if k != "bare"
            )
        )
    # the prototype must agree with fvis on a finite tensor
    probe = torch.randn(2, 8, 5, 5).relu()
    a, b = original(probe), fast(probe)
    agree = all(
        math.isclose(getattr(a, f), getattr(b, f), rel_tol=1e-4, abs_tol=1e-6)
        for f in ("min", "max", "mean", "std", "zero_fraction", "dead_channels", "channels")
    )
    lines.append(f"  5-kernel prototype agrees with fvis.stats.tensor_stats on a probe: {agree}")
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
        f"{fmt_s(t['capture'].median)}: fixed cost "
        f"~{fmt_s(t['capture'].median - t['bare'].median)} per call"
    )
    lines.append(
        profile_top(
            lambda: capture(tiny, [tx], tiny_layers, mode=Mode.GRAD, keep_values=False), 300, n=12
        )
    )
    for depth in (50, 100, 200, 400):
        model, x = models.deep_narrow(depth), torch.randn(models.DEEP_INPUT)
        layers = leaves(model)
        for mode in (Mode.INFERENCE, Mode.GRAD):
            t = interleaved(
                {
                    "bare": lambda m=model, x=x, mode=mode: _bare(m, x, mode),
                    "capture": lambda m=model, x=x, mode=mode, ls=layers: capture(
                        m, [x], ls, mode=mode, keep_values=False
                    ),
                },
                max(3, reps // 3),
            )
            extra = t["capture"].median - t["bare"].median
            lines.append(
                f"  deep_narrow depth {depth} ({2 * depth} leaves), {mode.value}: "
                f"bare {fmt_s(t['bare'].median)}, capture {fmt_s(t['capture'].median)}, "
                f"extra per leaf {fmt_s(extra / (2 * depth))}"
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

            def one(extra: list[str] = extra, count: list[int] = [0]) -> None:  # noqa: B006
                count[0] += 1
                sys.argv = [
                    "fvis",
                    "dump",
                    str(ckpt),
                    "--arch",
                    f"{HERE / 'models.py'}:resnet18ish",
                    "--shape",
                    "1,3,224,224",
                    "-q",
                    "--out",
                    f"{tmp}/o{count[0]}",
                    *extra,
                ]
                with contextlib.suppress(SystemExit):
                    main()

            one()  # warm: imports happen once
            lines.append(f"  fvis dump {' '.join(extra)} (in process, imports already done):")
            lines.append(profile_top(one, 3, n=22))
    return "\n".join(lines)


def stat_kernels() -> str:
    """Each reduction fvis.stats runs, and cheaper ones, on a conv1-sized map (1x64x112x112)."""
    from fvis.stats import tensor_stats

    x = torch.randn(1, 64, 112, 112).relu()
    dims = [0, 2, 3]
    ops = {
        "fvis.stats.tensor_stats (all of it)": lambda: tensor_stats(x),
        "torch.isfinite(x).sum()": lambda: int(torch.isfinite(x).sum()),
        "torch.isnan(x).sum()": lambda: int(torch.isnan(x).sum()),
        "(x == inf).sum()": lambda: int((x == float("inf")).sum()),
        "(x == 0).sum()": lambda: int((x == 0).sum()),
        "x.min(); x.max()": lambda: (float(x.min()), float(x.max())),
        "x.mean(dtype=float64)": lambda: float(x.mean(dtype=torch.float64)),
        "x.double().std()": lambda: float(x.double().std()),
        "dead channels as fvis does (amax, amin per channel)": lambda: int(
            ((x.amax(dim=dims) == 0) & (x.amin(dim=dims) == 0)).sum()
        ),
        "x.bool().sum()": lambda: int(x.bool().sum()),
        "torch.linalg.vector_norm(x)": lambda: float(torch.linalg.vector_norm(x)),
        "torch.aminmax(x)": lambda: torch.aminmax(x),
        "x.sum()": lambda: float(x.sum()),
        "vector_norm(x - mean)": lambda: float(torch.linalg.vector_norm(x - x.mean())),
        "torch.std_mean(x)": lambda: torch.std_mean(x),
        "count_nonzero(x, dim=[0, 2, 3])": lambda: torch.count_nonzero(x, dim=dims),
        "count_nonzero(x) (no dim)": lambda: int(torch.count_nonzero(x)),
    }
    t = interleaved(ops, 7, max_spread=0.5)
    return "\n".join(f"  {fmt_s(v.median):>9}  {k}" for k, v in t.items()) + (
        f"\n  (other processes: {next(iter(t.values())).others:.1f} cores)"
    )


def stat_passes(reps: int, batch: int = 1) -> str:
    """Each pass the torch path of ``fvis.stats.tensor_stats`` makes, summed over every capture
    of a ResNet forward, against the whole function with and without the C extension.

    The captured outputs are copied once (in-place ReLUs would change them later), then every
    reduction the finite path runs is timed over all of them, interleaved with a bare forward.
    """
    from fvis.stats import tensor_stats

    model, x = models.resnet18ish(), torch.randn(batch, *models.RESNET_INPUT[1:])
    wanted = {id(model.get_submodule(n)) for n in leaves(model)}
    outs: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, _args: object, output: object) -> None:
        if id(module) in wanted and isinstance(output, torch.Tensor):
            outs.append(output.clone())

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    with torch.inference_mode():
        model(x)
    handle.remove()
    maps = [t for t in outs if t.dim() >= 3]
    with_zeros = [t for t in maps if int(t.bool().sum()) < t.numel()]

    def each(op, tensors=outs):  # type: ignore[no-untyped-def]
        def run() -> None:
            for t in tensors:
                op(t)

        return run

    def dead(t: torch.Tensor) -> None:
        dims = (0, *range(2, t.dim()))
        int(((t.amax(dim=dims) == 0) & (t.amin(dim=dims) == 0)).sum())

    def bare() -> None:
        with torch.inference_mode():
            model(x)

    from fvis import stats

    def torch_path(t: torch.Tensor) -> None:
        saved, stats._native = stats._native, None
        try:
            tensor_stats(t)
        finally:
            stats._native = saved

    ops = {
        "bare forward (inference)": bare,
        "tensor_stats, all of it (as installed)": each(tensor_stats),
        "tensor_stats, torch path (FVIS_NATIVE=0)": each(torch_path),
        "1 torch.aminmax": each(lambda t: torch.aminmax(t)),
        "2 sum": each(lambda t: float(t.sum())),
        "3 vector_norm": each(lambda t: float(torch.linalg.vector_norm(t))),
        "4 bool().sum() (zero count)": each(lambda t: int(t.bool().sum())),
        "4 what-if: bool().sum(dtype=torch.int32)": each(
            lambda t: int(t.bool().sum(dtype=torch.int32))
        ),
        "5+6 amax + amin per channel (dead channels; maps with zeros only)": each(dead, with_zeros),
        "5 amax per channel alone": each(lambda t: t.amax(dim=(0, *range(2, t.dim()))), with_zeros),
    }
    t = interleaved(ops, reps, max_spread=0.5)
    base = t["bare forward (inference)"].median
    mb = sum(o.nbytes for o in outs) / 1e6
    lines = [
        f"  batch {batch}: {len(outs)} captures, {len(maps)} of them (N,C,H,W) maps, "
        f"{len(with_zeros)} with zeros; {mb:.1f} MB read per pass over all captures"
    ]
    lines += [
        f"  {fmt_s(v.median):>9}  {v.median / base:6.1%} of the forward  {k}" for k, v in t.items()
    ]
    lines.append(f"  (other processes: {next(iter(t.values())).others:.1f} cores)")
    return "\n".join(lines)


def layers_crc() -> str:
    """``inspect_model`` on a 1.14 GB state dict with and without the zip CRC check."""
    import time

    from common import rchar

    from fvis.formats import Limits
    from fvis.loading import LoadOptions, inspect_model

    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "wide_mlp.pt"
        models.write_big_checkpoint(big)
        arch = f"{HERE / 'models.py'}:wide_mlp"
        for label, limits in (
            ("default (CRC verified)", Limits()),
            ("Limits(verify_crc=False)", Limits(verify_crc=False)),
        ):
            options = LoadOptions(arch=arch, limits=limits)
            inspect_model(big, options)  # warm: imports, page cache
            read0, start = rchar(), time.perf_counter()
            inspect_model(big, options)
            lines.append(
                f"  inspect_model, {label}: {fmt_s(time.perf_counter() - start)}, "
                f"read {(rchar() - read0) / 1e6:.1f} MB of a {big.stat().st_size / 1e9:.2f} GB "
                "file (warm cache)"
            )
    return "\n".join(lines)


def main() -> None:
    if any(os.environ.get(k) != v for k, v in STEADY_MALLOC.items()):
        # the same malloc settings as run.py's in-process timings (see common.STEADY_MALLOC)
        os.execve(sys.executable, [sys.executable, *sys.argv], steady_malloc_env())
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--only", default="passes,kernels,profile,whatif,fixed,dump,crc")
    args = parser.parse_args()
    torch.set_num_threads(2)
    only = args.only.split(",")
    model, x = models.resnet18ish(), torch.randn(models.RESNET_INPUT)
    layers = leaves(model)
    from fvis.capture import Mode, capture

    if "passes" in only:
        print("## tensor_stats pass by pass, over every capture of one ResNet-18-shaped forward")
        for batch in (1, 8):
            print(stat_passes(args.reps, batch))
    if "kernels" in only:
        print("## stat kernels on one 1x64x112x112 map (2 threads)")
        print(stat_kernels())
    if "profile" in only:
        for mode in (Mode.INFERENCE, Mode.GRAD):
            for _ in range(3):
                capture(model, [x], layers, mode=mode, keep_values=False)
            print(f"## capture, ResNet-18-shaped, every leaf ({len(layers)}), {mode.value}")
            print(
                profile_top(
                    lambda mode=mode: capture(model, [x], layers, mode=mode, keep_values=False), 20
                )
            )
        cap = importlib.import_module("fvis.session")  # where the hooks call tensor_stats
        from fvis.stats import Stats

        original = cap.tensor_stats
        cap.tensor_stats = lambda _t: Stats(1, 0.0, 0.0, 0.0, 0.0, 0.0, 0, 0, 0, 0, 0)
        try:
            print("## capture with tensor_stats stubbed out (the hook machinery alone), grad")
            print(
                profile_top(
                    lambda: capture(model, [x], layers, mode=Mode.GRAD, keep_values=False), 20, n=24
                )
            )
        finally:
            cap.tensor_stats = original
    if "whatif" in only:
        print("## what-if: tensor_stats replaced (ResNet-18-shaped, every leaf)")
        print(whatif(args.reps))
    if "fixed" in only:
        print("## fixed cost per call and per leaf")
        print(fixed_costs(args.reps))
    if "crc" in only:
        print("## fvis layers on a 1.14 GB checkpoint: what reads the tensor data")
        print(layers_crc())
    if "dump" in only:
        print("## whole dump, in process")
        print(dump_profile())


if __name__ == "__main__":
    main()
