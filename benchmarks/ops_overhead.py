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
import math
import os
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, os.environ.get("FVIS_BENCH_SRC", str(HERE.parent)))
sys.path.insert(0, str(HERE))

import models  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from cases import leaves  # noqa: E402
from common import STEADY_MALLOC, interleaved, steady_malloc_env  # noqa: E402
from torch import Tensor, nn  # noqa: E402

GPT2_INPUT = (1, 128)


class Conv1D(nn.Module):
    """GPT-2's linear layer: ``addmm`` on a 2-D view, weights stored (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))
        self.nf = nf

    def forward(self, x: Tensor) -> Tensor:
        size_out = (*x.size()[:-1], self.nf)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class NewGELU(nn.Module):
    """GPT-2's ``gelu_new``: the tanh approximation, written out."""

    def forward(self, x: Tensor) -> Tensor:
        inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))
        return 0.5 * x * (1.0 + torch.tanh(inner))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.dim = heads, dim
        self.c_attn, self.c_proj = Conv1D(3 * dim, dim), Conv1D(dim, dim)

    def _split(self, x: Tensor) -> Tensor:
        n, t, _ = x.shape
        return x.view(n, t, self.heads, self.dim // self.heads).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.c_attn(x).split(self.dim, dim=2)
        out = F.scaled_dot_product_attention(
            self._split(q), self._split(k), self._split(v), is_causal=True
        )
        n, _, t, _ = out.shape
        return self.c_proj(out.transpose(1, 2).contiguous().view(n, t, self.dim))


class MLP(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.c_fc, self.act, self.c_proj = Conv1D(4 * dim, dim), NewGELU(), Conv1D(dim, 4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.ln_2, self.mlp = nn.LayerNorm(dim), MLP(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2ish(nn.Module):
    """``transformer.h.N.attn``-style names, as in Hugging Face's GPT2LMHeadModel."""

    def __init__(
        self, vocab: int = 5000, dim: int = 256, heads: int = 4, depth: int = 4, ctx: int = 128
    ) -> None:
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(vocab, dim)
        self.transformer.wpe = nn.Embedding(ctx, dim)
        self.transformer.h = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.transformer.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        t = self.transformer
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        x = t.wte(ids) + t.wpe(positions)
        for block in t.h:
            x = block(x)
        return self.lm_head(t.ln_f(x))


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
