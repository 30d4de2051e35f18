"""The issue 7 benchmark: what fvis costs, measured against baselines in the same run.

    python benchmarks/run.py [--quick] [--peers] [--out BENCHMARKS.md]

Builds its own models (``benchmarks/models.py``, nothing downloaded), times each case after a
warm-up with contenders interleaved (medians, ``torch.set_num_threads(2)``), and prints a
Markdown report: capture overhead against a bare forward, fvis against torchlens / captum /
torchinfo (``--peers``: installed into ``benchmarks/.venv-peers`` only), whole ``fvis``
processes against a process that only loads and runs the model, start-up time, and peak
memory (``VmHWM``, read by the child itself at exit: ``benchmarks/child.py``).
With ``--out``, the report is also written there; a hand-written section that starts with
``ANALYSIS_MARKER`` in the existing file is kept.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import models  # noqa: E402
import torch  # noqa: E402
from common import Timing, fmt_s, interleaved, steady_malloc_env, wait_quiet  # noqa: E402

ANALYSIS_MARKER = "<!-- hand-written analysis: benchmarks/run.py keeps everything below -->"
ARCH = f"{HERE / 'models.py'}:resnet18ish"
BIG_ARCH = f"{HERE / 'models.py'}:wide_mlp"
VENV = HERE / ".venv-peers"
PEERS = ("torchlens", "captum", "torchinfo")
ONE_LAYER = "layer1.0.conv1"


@dataclass
class Report:
    """Everything measured, as Markdown sections, plus the numbers the targets need."""

    sections: list[str] = field(default_factory=list)
    numbers: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def table(self, title: str, header: list[str], rows: list[list[str]], note: str = "") -> None:
        lines = [f"### {title}", ""]
        if note:
            lines += [note, ""]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" for _ in header) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        self.sections.append("\n".join(lines))
        print(self.sections[-1] + "\n", flush=True)


@dataclass(frozen=True)
class Settings:
    reps: int
    proc_reps: int
    mem_reps: int
    tmp: Path


# --------------------------------------------------------------------------- 1. capture


def bench_capture(report: Report, s: Settings) -> None:
    from cases import capture_cases

    rows = []
    for label in capture_cases():
        for mode in ("inference", "grad"):
            cmd = [sys.executable, str(HERE / "capture_case.py"), label, mode, str(s.reps)]
            done = subprocess.run(
                cmd, capture_output=True, text=True, check=False, env=steady_malloc_env()
            )
            if done.returncode != 0:
                report.errors.append(f"capture {label} {mode}: {_tail(done.stderr)}")
                continue
            data = json.loads(done.stdout)
            t = {k: _timing(data[k]) for k in ("bare", "fvis")}
            ratio = t["fvis"].median / t["bare"].median
            report.numbers[f"capture {label} {mode}"] = ratio
            faults = data["faults"]
            rows.append(
                [
                    label,
                    str(data["leaves"]),
                    mode,
                    _ms(t["bare"]),
                    _ms(t["fvis"]),
                    f"**{ratio:.2f}x**",
                    f"{faults['bare']:.0f} / {faults['fvis']:.0f}",
                ]
            )
    report.table(
        "1. Capture overhead: `fvis.capture.capture` on every leaf vs a bare forward",
        ["model", "leaves hooked", "mode", "bare forward", "fvis capture", "ratio", "page faults"],
        rows,
        "Stats + snapshot, no images (`keep_values=False`, no `on_capture`); the bare forward "
        "runs under the same grad mode (`torch.inference_mode()` / `torch.enable_grad()`), "
        "model in eval mode. Each row is its own process (`benchmarks/capture_case.py`) with "
        "`MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824`: with glibc's "
        "adaptive defaults the allocator state left by earlier work decides whether a grad-mode "
        "forward re-faults ~5000 pages per call (ResNet-18: 25 ms instead of 15 ms), for the bare "
        "forward and fvis alike, so ratios swung by a third from run to run. Median per call "
        "(± half the interquartile range, relative; 'N tries': the set was measured again "
        "because it was noisy or other processes were busy, the quietest kept; 'others': CPU "
        "cores other processes used during the kept set). 'page faults': minor faults per call, "
        "bare / fvis (memory the allocator had to get back from the kernel).",
    )


def _timing(row: dict[str, Any]) -> Timing:
    return Timing(row["median"], tuple(row["reps"]), row["attempts"], row["others"])


def _ms(t: Timing) -> str:
    """``15.1 ms (±3%)``, plus the tries and the other processes' load when they matter."""
    extra = f", {t.attempts} tries" if t.attempts > 1 else ""
    extra += f", others {t.others:.1f} cores" if t.others >= 0.1 else ""
    return f"{fmt_s(t.median)} (±{t.spread / 2:.0%}{extra})"


# --------------------------------------------------------------------------- 2. peers


def _run_quiet(
    cmd: list[str], timeout: float = 1800, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, check=False, env=env
    )


def ensure_peers_venv() -> tuple[Path | None, str]:
    """``benchmarks/.venv-peers`` with the peers (created if missing); or None and why not."""
    python = VENV / "bin" / "python"
    probe = [str(python), "-c", "import " + ", ".join(PEERS)]
    if python.exists() and _run_quiet(probe).returncode == 0:
        return python, "existing benchmarks/.venv-peers"
    with tempfile.TemporaryDirectory() as dl:
        check = _run_quiet(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", dl, *PEERS]
        )
    if check.returncode != 0:
        return None, f"`pip download --no-deps {' '.join(PEERS)}` failed: {_tail(check.stderr)}"
    _exclude_from_git(VENV)
    made = _run_quiet([sys.executable, "-m", "venv", "--system-site-packages", str(VENV)])
    if made.returncode != 0:
        return None, f"venv creation failed: {_tail(made.stderr)}"
    pip = _run_quiet([str(python), "-m", "pip", "install", "-q", *PEERS, "py-spy"])
    if pip.returncode != 0 or _run_quiet(probe).returncode != 0:
        return None, f"pip install into {VENV} failed: {_tail(pip.stderr)}"
    return python, "created benchmarks/.venv-peers"


def _exclude_from_git(path: Path) -> None:
    exclude = ROOT / ".git" / "info" / "exclude"
    line = str(path.relative_to(ROOT)) + "/"
    text = exclude.read_text() if exclude.exists() else ""
    if line not in text.splitlines() and exclude.parent.is_dir():
        exclude.write_text(text + ("" if text.endswith("\n") or not text else "\n") + line + "\n")


def _tail(text: str, n: int = 300) -> str:
    lines = [ln for ln in text.strip().splitlines() if "is ignored" not in ln]
    return (lines[-1] if lines else "").strip()[:n]


def bench_peers(report: Report, s: Settings, checkpoint: Path) -> None:
    python, how = ensure_peers_venv()
    if python is None:
        report.errors.append(f"peers not measured: {how}")
        return
    cmd = [
        str(python),
        str(HERE / "peers.py"),
        "--reps",
        str(s.reps),
        "--checkpoint",
        str(checkpoint),
    ]
    done = _run_quiet(cmd, env=steady_malloc_env())
    if done.returncode != 0:
        report.errors.append(f"peers.py failed: {_tail(done.stderr)}")
        return
    data = json.loads(done.stdout)
    timings = {k: _timing(v) for k, v in data["timings"].items()}
    report.errors += [f"peers.py {k}: {v}" for k, v in data["errors"].items()]
    _peer_tables(report, data, timings)


TL = "torchlens full trace (every op, values saved)"
FV = "fvis capture, every leaf, grad, no values"
WRAPPED = " (torch wrapped by torchlens)"


def _peer_tables(report: Report, data: dict[str, Any], timings: dict[str, Timing]) -> None:
    listing_words = ("torchinfo", "list_layers", "trace_runs")
    t = {name: timing.median for name, timing in timings.items()}
    rows = []
    for name, median in t.items():
        if any(w in name for w in listing_words):
            continue
        wrapped = name.endswith(WRAPPED) or name.startswith("torchlens")
        bare = t.get("bare forward (grad)" + (WRAPPED if wrapped else ""))
        fvis = t.get(FV + (WRAPPED if wrapped else ""))
        rows.append(
            [
                name,
                _ms(timings[name]),
                f"{median / bare:.2f}x" if bare else "-",
                f"{median / fvis:.2f}x" if fvis else "-",
            ]
        )
    if TL in t and FV + WRAPPED in t:
        report.numbers["torchlens / fvis"] = t[TL] / t[FV + WRAPPED]
    if TL in t and FV in t:
        report.numbers["torchlens / fvis (unwrapped fvis)"] = t[TL] / t[FV]
    versions = ", ".join(f"{k} {v}" for k, v in data.get("versions", {}).items())
    first = data.get("torchlens_first_call_s")
    report.table(
        "2a. Against peers: every layer of the ResNet-18-shaped model, grad mode, one process",
        ["what", "median", "vs bare forward (grad)", "vs fvis capture (grad, no values)"],
        rows,
        f"Peers from `benchmarks/.venv-peers` ({versions}), in one process with the same malloc "
        "settings as table 1. torchlens is called as "
        f"`torchlens.{data.get('torchlens_entry', '?')}(model, x)` with its defaults (every "
        "operation logged, values saved; 2.x renamed `log_forward_pass` to `trace`)"
        + (f"; its first call (wrapping torch) took {fmt_s(first)}" if first else "")
        + ". torchlens leaves torch's functions wrapped, which slows every later forward, so it "
        "is timed last, interleaved with fvis and a bare forward that now run on wrapped torch "
        "too (rows marked 'torch wrapped'; ratios within that phase compare like with like). "
        "captum's `LayerActivation` gets the same leaf modules fvis hooks.",
    )
    listing = [[n, _ms(timings[n])] for n in t if any(w in n for w in listing_words)]
    if listing:
        report.table(
            "2b. torchinfo `summary` vs `fvis layers --shape` (in process)",
            ["what", "median"],
            listing,
            "Both run one forward to get output shapes; fvis's `list_layers` also sniffs, "
            "checks and loads the checkpoint (torchinfo is handed a built model); "
            "`trace_runs` is the part comparable to torchinfo.",
        )


# --------------------------------------------------------------------------- processes


def fvis_command() -> list[str]:
    script = Path(sys.executable).with_name("fvis")
    return [str(script)] if script.exists() else [sys.executable, "-m", "fvis"]


def _proc(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... exited {done.returncode}: {_tail(done.stderr)}")


class Outs:
    """A fresh output folder for every ``fvis dump`` run."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.n = tmp, 0

    def __call__(self) -> str:
        self.n += 1
        path = self.tmp / f"out{self.n}"
        shutil.rmtree(path, ignore_errors=True)
        return str(path)


def _dump_args(checkpoint: Path, *extra: str, shape: str = "1,3,224,224") -> list[str]:
    return ["dump", str(checkpoint), "--arch", ARCH, "--shape", shape, "-q", *extra]


def bench_processes(report: Report, s: Settings, checkpoint: Path) -> None:
    fvis, outs, cwd = fvis_command(), Outs(s.tmp), s.tmp
    bare = [sys.executable, str(HERE / "child.py"), "bare", str(checkpoint), ARCH, "1,3,224,224"]
    cmds: dict[str, Callable[[], None]] = {
        "bare process: import torch, load, one forward": lambda: _proc(bare, cwd),
        "fvis dump --all --no-images": lambda: _proc(
            [*fvis, *_dump_args(checkpoint, "--all", "--no-images", "--out", outs())], cwd
        ),
        "fvis dump --all (images)": lambda: _proc(
            [*fvis, *_dump_args(checkpoint, "--all", "--out", outs())], cwd
        ),
        f"fvis dump --layer {ONE_LAYER} (images)": lambda: _proc(
            [*fvis, *_dump_args(checkpoint, "--layer", ONE_LAYER, "--out", outs())], cwd
        ),
    }
    t = interleaved(cmds, s.proc_reps, warmup=1)
    base = t["bare process: import torch, load, one forward"].median
    rows = [
        [f"`{k}`" if k.startswith("fvis") else k, _ms(v), f"{v.median / base:.2f}x"]
        for k, v in t.items()
    ]
    report.numbers["dump --all --no-images / bare"] = t["fvis dump --all --no-images"].median / base
    report.numbers["dump --all / bare"] = t["fvis dump --all (images)"].median / base
    report.table(
        "3. Whole processes on the ResNet-18-shaped checkpoint (state dict, 46 MB)",
        ["process", "median wall", "vs bare process"],
        rows,
        f"`{' '.join(fvis)} dump CKPT --arch benchmarks/models.py:resnet18ish --shape 1,3,224,224 "
        "-q --out NEW_DIR ...` (default `--mode grad`) against `python benchmarks/child.py bare "
        "CKPT ...` (imports torch and the model file, `torch.load(weights_only=True)`, "
        "`load_state_dict`, one forward). Run interleaved.",
    )


def bench_startup(report: Report, s: Settings, checkpoint: Path) -> None:
    fvis, cwd = fvis_command(), s.tmp
    cmds: dict[str, Callable[[], None]] = {
        "python -c pass": lambda: _proc([sys.executable, "-c", "pass"], cwd),
        'python -c "import torch"': lambda: _proc([sys.executable, "-c", "import torch"], cwd),
        "fvis --help": lambda: _proc([*fvis, "--help"], cwd),
        "fvis layers (bundled sample)": lambda: _proc([*fvis, "layers"], cwd),
        "fvis layers CKPT --arch ... (ResNet-18-shaped)": lambda: _proc(
            [*fvis, "layers", str(checkpoint), "--arch", ARCH], cwd
        ),
    }
    t = interleaved(cmds, s.proc_reps * 2, warmup=1)
    report.numbers["fvis --help s"] = t["fvis --help"].median
    report.table(
        "4. Start-up: `fvis --help` and `fvis layers` without input, as processes",
        ["process", "median wall"],
        [[f"`{k}`", _ms(v)] for k, v in t.items()],
        f"fvis is run as `{' '.join(fvis)}` (the console script; a pyenv shim would add its own "
        "start-up), from an empty folder (no pyproject.toml).",
    )


# --------------------------------------------------------------------------- 5. memory


def child_stats(
    args: list[str] | Callable[[], list[str]],
    s: Settings,
    reps: int,
    cli: bool = True,
    evict: Path | None = None,
) -> dict[str, float]:
    """Median wall, VmHWM (MB) and rchar of ``benchmarks/child.py`` runs.

    ``evict``: drop that file from the page cache before each run (a cold read).
    """
    stats_file = s.tmp / "stats.jsonl"
    walls, rows = [], []
    for _ in range(reps):
        stats_file.unlink(missing_ok=True)
        if evict is not None:
            _evict(evict)
        wait_quiet()
        argv = args() if callable(args) else args
        cmd = [sys.executable, str(HERE / "child.py"), "cli" if cli else "bare", *argv]
        start = time.perf_counter()
        _proc(cmd, s.tmp, {**os.environ, "FVIS_BENCH_STATS": str(stats_file)})
        walls.append(time.perf_counter() - start)
        rows.append(json.loads(stats_file.read_text().splitlines()[-1]))
    return {
        "wall": statistics.median(walls),
        "hwm_mb": statistics.median(r["vm_hwm_kb"] for r in rows) / 1024,
        "rchar_mb": statistics.median(r["rchar"] for r in rows) / 1e6,
        "forwards": rows[-1]["forwards"] if rows[-1]["forwards"] is not None else -1,
    }


def _evict(path: Path) -> None:
    """Drop a file's clean pages from the page cache (no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def bench_memory(report: Report, s: Settings, checkpoint: Path) -> None:
    outs, r = Outs(s.tmp), s.mem_reps

    def dump(*extra: str) -> Callable[[], list[str]]:
        """Arguments for one run, with a fresh output folder each time they are asked for."""
        return lambda: [
            "--",
            *_dump_args(checkpoint, "--mode", "inference", *extra, "--out", outs()),
        ]

    cases = {
        "bare process: import torch, load, one forward": (
            [str(checkpoint), ARCH, "1,3,224,224"],
            False,
        ),
        "fvis dump --all --mode inference": (dump("--all"), True),
        f"fvis dump --layer {ONE_LAYER} --mode inference": (dump("--layer", ONE_LAYER), True),
        "fvis dump --all --mode inference --no-images": (dump("--all", "--no-images"), True),
        f"fvis dump --layer {ONE_LAYER} --mode inference --no-images": (
            dump("--layer", ONE_LAYER, "--no-images"),
            True,
        ),
        "fvis layers CKPT --arch (no input), forwards counted": (
            ["--count-forwards", "--", "layers", str(checkpoint), "--arch", ARCH],
            True,
        ),
    }
    stats = {name: child_stats(args, s, r, cli) for name, (args, cli) in cases.items()}
    big = s.tmp / "wide_mlp.pt"
    try:
        size = models.write_big_checkpoint(big)
        big_args = ["--count-forwards", "--", "layers", str(big), "--arch", BIG_ARCH]
        label = f"fvis layers BIG --arch (wide_mlp, {size / 1e9:.2f} GB), forwards counted"
        stats[label] = child_stats(big_args, s, max(r, 3))
        stats[label.replace("BIG", "BIG cold cache")] = child_stats(
            big_args, s, max(r, 3), evict=big
        )
    finally:
        big.unlink(missing_ok=True)
    _memory_table(report, stats, checkpoint)


def _memory_table(report: Report, stats: dict[str, dict[str, float]], checkpoint: Path) -> None:
    one = stats[f"fvis dump --layer {ONE_LAYER} --mode inference"]["hwm_mb"]
    one_ni = stats[f"fvis dump --layer {ONE_LAYER} --mode inference --no-images"]["hwm_mb"]
    bare = stats["bare process: import torch, load, one forward"]["hwm_mb"]
    rows = []
    for name, st in stats.items():
        vs_one = one_ni if "--no-images" in name else one
        rows.append(
            [
                f"`{name}`" if name.startswith("fvis") else name,
                f"{st['hwm_mb']:.0f} MB",
                f"{st['hwm_mb'] / vs_one:.2f}x" if name.startswith("fvis dump") else "-",
                f"{st['hwm_mb'] - bare:+.0f} MB",
                f"{st['rchar_mb']:.1f} MB",
                str(int(st["forwards"])) if st["forwards"] >= 0 else "-",
                fmt_s(st["wall"]),
            ]
        )
    report.numbers["dump --all mem / one layer"] = (
        stats["fvis dump --all --mode inference"]["hwm_mb"] / one
    )
    big_key = next(k for k in stats if "BIG --arch" in k)
    cold_key = next(k for k in stats if "BIG cold" in k)
    report.numbers["big layers cold s"] = stats[cold_key]["wall"]
    small_key = "fvis layers CKPT --arch (no input), forwards counted"
    report.numbers["big layers s"] = stats[big_key]["wall"]
    report.numbers["big layers MB"] = stats[big_key]["hwm_mb"]
    report.numbers["layers forwards"] = stats[big_key]["forwards"] + stats[small_key]["forwards"]
    report.numbers["layers extra rchar MB"] = (
        stats[big_key]["rchar_mb"] - stats[small_key]["rchar_mb"]
    )
    report.numbers["layers small rchar MB"] = stats[small_key]["rchar_mb"]
    report.numbers["ckpt MB"] = checkpoint.stat().st_size / 1e6
    report.table(
        "5. Peak memory (VmHWM, read by the child at exit) and bytes read",
        [
            "process",
            "VmHWM",
            "vs one-layer dump",
            "vs bare process",
            "rchar",
            "module forwards",
            "wall",
        ],
        rows,
        "Run through `python benchmarks/child.py cli -- ARGS` (runs `fvis.cli.main`, then reads "
        "`/proc/self/status` VmHWM and `/proc/self/io` rchar). rchar counts every read() "
        "(Python files too), so what matters is the difference between the 46 MB and the "
        "1.14 GB checkpoint. 'module forwards' counts global forward pre-hook calls. "
        "The big checkpoint is timed warm (just written, in the page cache) and cold "
        "(`posix_fadvise(DONTNEED)` before each run); it is deleted afterwards. Wall times here "
        "include the wrapper and one run each (median of the runs).",
    )


# --------------------------------------------------------------------------- 6. grad mode


GRAD_BATCHES = (1, 8)


def bench_grad(report: Report, s: Settings, checkpoint: Path) -> None:
    """Peak memory of ``dump --all`` in grad vs inference mode; the verdicts' time."""
    outs, r = Outs(s.tmp), s.mem_reps
    mem: dict[tuple[int, str], tuple[dict[str, float], dict[str, float]]] = {}
    for batch in GRAD_BATCHES:
        shape = f"{batch},3,224,224"
        for mode in ("inference", "grad"):

            def dump(mode: str = mode, shape: str = shape) -> list[str]:
                return [
                    "--",
                    *_dump_args(checkpoint, "--all", "--mode", mode, "--out", outs(), shape=shape),
                ]

            bare = child_stats([str(checkpoint), ARCH, shape, mode], s, r, cli=False)
            mem[(batch, mode)] = (bare, child_stats(dump, s, r))
    timing = {}
    for batch in GRAD_BATCHES:
        cmd = [sys.executable, str(HERE / "grad_case.py"), str(batch), str(s.reps)]
        done = _run_quiet(cmd, env=steady_malloc_env())
        if done.returncode != 0:
            report.errors.append(f"grad_case {batch}: {_tail(done.stderr)}")
            continue
        timing[batch] = json.loads(done.stdout)
    _grad_tables(report, mem, timing)


def _grad_tables(
    report: Report,
    mem: dict[tuple[int, str], tuple[dict[str, float], dict[str, float]]],
    timing: dict[int, dict[str, Any]],
) -> None:
    rows = []
    for (batch, mode), (bare, fv) in mem.items():
        other = mem[(batch, "inference")][1]["hwm_mb"]
        rows.append(
            [
                str(batch),
                mode,
                f"{bare['hwm_mb']:.0f} MB",
                f"{fv['hwm_mb']:.0f} MB",
                f"{fv['hwm_mb'] - bare['hwm_mb']:+.0f} MB",
                "-" if mode == "inference" else f"{fv['hwm_mb'] - other:+.0f} MB",
                fmt_s(fv["wall"]),
            ]
        )
        report.numbers[f"dump --all {mode} batch {batch} MB"] = fv["hwm_mb"]
    saved = "; ".join(
        f"batch {b}: {d['saved_mb']:.0f} MB saved for backward, {d['captured_mb']:.0f} MB of "
        f"captured leaf outputs (distinct storages), input {d['input_mb']:.1f} MB"
        for b, d in timing.items()
    )
    report.table(
        "6a. Grad mode vs inference mode: peak memory of `dump --all` (ResNet-18-shaped)",
        [
            "batch",
            "mode",
            "bare process VmHWM",
            "`fvis dump --all` VmHWM",
            "fvis - bare",
            "grad - inference (fvis)",
            "fvis wall",
        ],
        rows,
        "Through `python benchmarks/child.py` as in table 5 (median of the runs, default malloc); "
        "`fvis dump CKPT --arch ... --shape B,3,224,224 --all --mode MODE` (images on) against "
        "`child.py bare CKPT ... B,3,224,224 MODE` (one forward under `torch.inference_mode()`, "
        "or with grad on and its output, so its graph, alive when the peak is read). Only sample "
        "0 is drawn at batch 8 (`--sample` default), so the pictures do not grow with the batch. "
        "What autograd keeps for backward, counted once per storage with "
        "`saved_tensors_hooks` in `benchmarks/grad_case.py` (parameters excluded): "
        + (saved or "not measured")
        + ".",
    )
    if not timing:
        return
    names = list(next(iter(timing.values()))["timings"])
    rows = []
    for name in names:
        row = [name]
        for batch in GRAD_BATCHES:
            d = timing.get(batch)
            if d is None:
                row += ["-", "-"]
                continue
            t = _timing(d["timings"][name])
            base = d["timings"]["bare forward (grad)"]["median"]
            ratio = t.median / base
            row += [_ms(t), f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.2%}"]
        rows.append(row)
    d = next(iter(timing.values()))
    for batch, data in timing.items():
        base = data["timings"]["bare forward (grad)"]["median"]
        for key, name in (("walk", names[3]), ("diagnose", names[4])):
            report.numbers[f"grad {key} / forward batch {batch}"] = (
                data["timings"][name]["median"] / base
            )
    report.table(
        "6b. The verdicts' own cost: graph walk and diagnosis vs the forward (in process)",
        ["what"]
        + [x for b in GRAD_BATCHES for x in (f"batch {b}", f"vs bare forward (grad), batch {b}")],
        rows,
        "`benchmarks/grad_case.py BATCH REPS` (own process, malloc settings of table 1): one "
        f"grad-mode capture of every leaf ({d['leaves']} leaves, {d['captures']} captures, "
        f"{d['verdicts']} verdicts) is kept, then `reachable_edges` on its output (the walk over "
        f"{d['graph_nodes']} autograd nodes, {d['graph_edges']} gradient edges) and `diagnose` "
        "on the whole result (the walk included) are timed, interleaved with bare forwards and "
        "the capture itself. `dump` runs `diagnose` once per forward pass.",
    )


# --------------------------------------------------------------------------- targets


def targets(report: Report) -> None:
    n, rows = report.numbers, []

    def add(
        target: str,
        key: str,
        limit: float,
        show: Callable[[float], str],
        lower_is_better: bool = True,
    ) -> None:
        if key not in n:
            rows.append([target, "not measured", "-"])
            return
        value = n[key]
        ok = value <= limit if lower_is_better else value >= limit
        off = value / limit if lower_is_better else limit / value
        rows.append([target, show(value), "met" if ok else f"**missed** by {off:.2f}x"])

    ratio = lambda v: f"{v:.2f}x"  # noqa: E731
    for issue, limit in (("issue 3", 1.2), ("issue 7", 1.15)):
        for mode in ("inference", "grad"):
            add(
                f"capture overhead <= {limit}x a bare forward, every leaf hooked "
                f"(ResNet-18-shaped, {mode}; {issue})",
                f"capture resnet18ish 1x3x224x224 {mode}",
                limit,
                ratio,
            )
    add(
        "whole `dump --all --no-images` <= 2x the bare load-and-forward process",
        "dump --all --no-images / bare",
        2.0,
        ratio,
    )
    add(
        "whole `dump --all` (images) <= 2x the bare load-and-forward process",
        "dump --all / bare",
        2.0,
        ratio,
    )
    add(
        ">= 10x faster than torchlens full trace",
        "torchlens / fvis",
        10.0,
        lambda v: f"{v:.1f}x faster",
        False,
    )
    add("`fvis --help` < 0.3 s", "fvis --help s", 0.3, fmt_s)
    if "layers forwards" in n:
        extra = n["layers extra rchar MB"]
        ok = n["layers forwards"] == 0 and extra < 10
        rows.append(
            [
                "`fvis layers` without input does no forward and reads no tensor data",
                f"{int(n['layers forwards'])} module forwards; the 1.14 GB file made it read "
                f"{extra:+.1f} MB more than the {n['ckpt MB']:.0f} MB one "
                f"({n['layers small rchar MB']:.1f} MB in all there, Python files included)",
                "met" if ok else "**missed**",
            ]
        )
    add(
        "`fvis layers --arch` on a >= 1 GB checkpoint < 3 s (file in page cache)",
        "big layers s",
        3.0,
        fmt_s,
    )
    add(
        "`fvis layers --arch` on a >= 1 GB checkpoint < 3 s (cold: evicted before each run)",
        "big layers cold s",
        3.0,
        fmt_s,
    )
    add(
        "`fvis layers --arch` on a >= 1 GB checkpoint < 300 MB",
        "big layers MB",
        300.0,
        lambda v: f"{v:.0f} MB",
    )
    add(
        "memory of `dump --all --mode inference` <= 1.3x a one-layer dump",
        "dump --all mem / one layer",
        1.3,
        ratio,
    )
    report.table("Targets of issues 3 and 7", ["target", "measured", "verdict"], rows)


# --------------------------------------------------------------------------- header, main


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return done.stdout.rstrip()


def snapshot(ref: str, tmp: Path) -> Path:
    """``git archive REF`` into ``tmp/src``: a fixed fvis while others edit the working tree."""
    src = tmp / "src"
    src.mkdir()
    archive = subprocess.run(["git", "archive", ref], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True)
    if (src / "setup.py").exists():  # the optional C extension, built as `pip install` would
        subprocess.run(
            [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
            cwd=src,
            capture_output=True,
            check=False,
        )
    return src


def _stats_path() -> str:
    """Which statistics path the measured fvis takes (in this process: same sys.path)."""
    from fvis import stats

    native = getattr(stats, "_native", None)
    return (
        f"native, one pass (`{Path(native.__file__).name}`)"
        if native is not None
        else "torch ops (the C extension `fvis._moments` is not built or FVIS_NATIVE=0)"
    )


def _fvis_version(ref: str | None, commit: str | None = None) -> str:
    if ref:
        # ``commit``: what REF named when the snapshot was taken (others may commit meanwhile)
        short = _git("rev-parse", "--short", commit or ref)
        return (
            f"- fvis commit `{short}` (`--fvis-ref {ref}`: a "
            "`git archive` snapshot of that commit, taken at the start; working-tree changes "
            "are not measured)"
        )
    dirty = sorted(
        {ln[3:] for ln in _git("status", "--porcelain", "--", "fvis", "sample_models").splitlines()}
    )
    return f"- fvis commit `{_git('rev-parse', '--short', 'HEAD')}`" + (
        f" plus uncommitted changes in the working tree: {', '.join(dirty)}"
        if dirty
        else " (clean)"
    )


def machine_header(
    argv: list[str], started: float, ref: str | None, commit: str | None = None
) -> str:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor() or "?",
    )
    mem = next(
        ln.split()[1]
        for ln in Path("/proc/meminfo").read_text().splitlines()
        if ln.startswith("MemTotal")
    )
    import numpy
    import PIL

    return "\n".join(
        [
            "## Machine and versions",
            "",
            f"- machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu}, "
            f"{int(mem) / 1024**2:.1f} GiB RAM; {platform.platform()}",
            f"- python {platform.python_version()}, torch {torch.__version__} "
            f"(`torch.set_num_threads(2)` in process), numpy {numpy.__version__}, "
            f"Pillow {PIL.__version__}",
            _fvis_version(ref, commit),
            f"- statistics: {_stats_path()}",
            f"- load average at start: {Path('/proc/loadavg').read_text().split()[:3]}; "
            f"run took {time.time() - started:.0f} s",
            f"- command: `python benchmarks/{Path(argv[0]).name} {' '.join(argv[1:])}`".replace(
                "  ", " "
            ),
        ]
    )


def write_out(path: Path, text: str) -> None:
    kept = ""
    if path.exists():
        old = path.read_text()
        if ANALYSIS_MARKER in old:
            kept = old[old.index(ANALYSIS_MARKER) :]
    path.write_text(text + "\n\n" + (kept or ANALYSIS_MARKER + "\n"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (smoke check)")
    parser.add_argument("--peers", action="store_true", help="also torchlens, captum, torchinfo")
    parser.add_argument("--out", type=Path, help="write the Markdown report here too")
    parser.add_argument(
        "--fvis-ref",
        metavar="REF",
        help="measure fvis as committed at REF (git archive snapshot), not the working tree",
    )
    parser.add_argument(
        "--only", default="capture,peers,process,startup,memory,grad", help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    started = time.time()
    torch.set_num_threads(2)
    report = Report()
    with tempfile.TemporaryDirectory(prefix="fvis-bench-") as tmp_name:
        tmp = Path(tmp_name)
        commit = None
        if args.fvis_ref:
            commit = _git("rev-parse", "--verify", args.fvis_ref + "^{commit}")
            if not commit:
                parser.error(f"--fvis-ref {args.fvis_ref}: not a commit")
            src = snapshot(commit, tmp)
            sys.path.insert(0, str(src))
            os.environ["FVIS_BENCH_SRC"] = str(src)
            os.environ["PYTHONPATH"] = os.pathsep.join(
                [str(src), *filter(None, [os.environ.get("PYTHONPATH")])]
            )
        s = Settings(3 if args.quick else 15, 2 if args.quick else 7, 1 if args.quick else 3, tmp)
        checkpoint = tmp / "resnet18ish.pt"
        torch.manual_seed(0)
        torch.save(models.resnet18ish().state_dict(), checkpoint)
        steps = {
            "capture": lambda: bench_capture(report, s),
            "peers": lambda: bench_peers(report, s, checkpoint) if args.peers else None,
            "process": lambda: bench_processes(report, s, checkpoint),
            "startup": lambda: bench_startup(report, s, checkpoint),
            "memory": lambda: bench_memory(report, s, checkpoint),
            "grad": lambda: bench_grad(report, s, checkpoint),
        }
        for name in args.only.split(","):
            with _step(report, name):
                steps[name]()
    targets(report)
    header = machine_header(sys.argv, started, args.fvis_ref, commit)
    errors = ["### Errors", "", *[f"- {e}" for e in report.errors]] if report.errors else []
    text = "\n\n".join(
        ["# fvis benchmarks (issue 7)", header, *report.sections, "\n".join(errors)]
    ).rstrip()
    if args.out:
        write_out(args.out, text)
    print(header)
    for e in report.errors:
        print("error:", e)


@contextlib.contextmanager
def _step(report: Report, name: str) -> Iterator[None]:
    start = time.perf_counter()
    print(f"[{name}] ...", file=sys.stderr, flush=True)
    try:
        yield
    except Exception as exc:  # one broken step must not hide the others' numbers
        report.errors.append(f"step {name}: {type(exc).__name__}: {str(exc)[:400]}")
    print(f"[{name}] {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
