"""A child process for the whole-process benchmarks; reports its own peak memory at exit.

    python benchmarks/child.py cli [--count-forwards] -- FVIS ARGS...
    python benchmarks/child.py bare CHECKPOINT FILE.py:CALLABLE 1,3,224,224 [grad|inference]

``cli`` runs ``fvis.cli.main`` with those arguments; ``bare`` only imports torch, loads the
state dict, builds the model and runs one forward (the baseline a user would write; grad mode
by default, the output and its graph alive when the peak is read; ``inference``: under
``torch.inference_mode()``).
If ``FVIS_BENCH_STATS`` names a file, a JSON line is written there at exit: ``VmHWM``
(``/proc/self/status``, kB), ``rchar`` (bytes read through read(), ``/proc/self/io``), the
exit code and, with ``--count-forwards``, how many module forward calls happened.
"""

from __future__ import annotations

import json
import os
import sys

from common import rchar, vm_hwm_kb  # stdlib only: the child's peak memory stays its own


def _report(rc: int, forwards: list[int] | None) -> None:
    target = os.environ.get("FVIS_BENCH_STATS")
    if not target:
        return
    stats = {
        "vm_hwm_kb": vm_hwm_kb(),
        "rchar": rchar(),
        "rc": rc,
        "forwards": None if forwards is None else forwards[0],
    }
    with open(target, "a") as fh:
        fh.write(json.dumps(stats) + "\n")


def _count_forwards() -> list[int]:
    import torch

    count = [0]

    def hook(module: object, args: object) -> None:
        count[0] += 1

    torch.nn.modules.module.register_module_forward_pre_hook(hook)
    return count


def run_cli(argv: list[str]) -> int:
    forwards = None
    if argv and argv[0] == "--count-forwards":
        forwards, argv = _count_forwards(), argv[1:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    from fvis.cli import main

    sys.argv = ["fvis", *argv]
    rc = 0
    try:
        main()
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    _report(rc, forwards)
    return rc


def run_bare(checkpoint: str, arch: str, shape: str, mode: str = "grad") -> int:
    import importlib.util

    import torch

    file, _, name = arch.rpartition(":")
    spec = importlib.util.spec_from_file_location("bench_arch", file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = getattr(module, name)()
    model.load_state_dict(torch.load(checkpoint, weights_only=True, map_location="cpu"))
    model.eval()
    x = torch.randn(*(int(d) for d in shape.split(",")))
    if mode == "inference":
        with torch.inference_mode():
            out = model(x)
    else:
        out = model(x)
    assert out.shape[0] >= 1
    _report(0, None)
    return 0


if __name__ == "__main__":
    what, rest = sys.argv[1], sys.argv[2:]
    sys.exit(run_cli(rest) if what == "cli" else run_bare(*rest))
