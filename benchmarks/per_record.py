"""Per-record cost of module capture (issue 15): every leaf captured, ``--ops`` off.

    python benchmarks/per_record.py [--reps 15] [--only deep,resnet,gpt2] [--modes grad,inference]

For each model and grad mode, timed interleaved in one process (``common.interleaved``):

- ``bare``: the forward alone, under the same grad mode;
- ``hooks``: the forward with one empty global forward pre-hook and one empty global forward
  hook (``with_kwargs=True``), each doing the dict lookup fvis does: the floor any tool that
  sees every module call through hooks pays;
- ``fvis``: ``fvis.capture.capture`` of every leaf, ``keep_values=False`` (statistics,
  snapshot facts, trace; no pictures).

"per record" is the extra time over the bare forward divided by the captures (one per leaf
call here). Models: ``deep_narrow`` (400 small leaves, 16x64), the ResNet-18-shaped CNN at
1x3x224x224, and a GPT-2-tiny-shaped transformer (``GPT2ish``: 4 blocks of width 256 over 128
tokens, Hugging Face's names and ``Conv1D``; the same shape as ``ops_overhead.py``'s).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, os.environ.get("FVIS_BENCH_SRC", str(HERE.parent)))
sys.path.insert(0, str(HERE))

import models  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from cases import leaves  # noqa: E402
from common import fmt_s, interleaved  # noqa: E402
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


def _fvis(model: nn.Module, x: Tensor, mode: str, layers: list[str]) -> Callable[[], object]:
    from fvis.capture import Mode, capture

    chosen = Mode.INFERENCE if mode == "inference" else Mode.GRAD

    def run() -> object:
        return capture(model, [x], layers, mode=chosen, keep_values=False)

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--only", default="deep,resnet,gpt2")
    parser.add_argument("--modes", default="inference,grad")
    args = parser.parse_args()
    torch.set_num_threads(2)
    chosen = args.only.split(",")
    for name, (model, x) in cases().items():
        if name not in chosen:
            continue
        layers = leaves(model)
        for mode in args.modes.split(","):
            records = len(_fvis(model, x, mode, layers)().captures)  # type: ignore[attr-defined]
            t = interleaved(
                {
                    "bare": _bare(model, x, mode),
                    "hooks": _hooks(model, x, mode),
                    "fvis": _fvis(model, x, mode, layers),
                },
                args.reps,
            )
            bare, hooks, fv = t["bare"].median, t["hooks"].median, t["fvis"].median
            print(
                f"{name:6} {mode:9} {records:3} captures: bare {fmt_s(bare)} "
                f"(±{t['bare'].spread / 2:.0%}), empty hooks {hooks / bare:.3f}x "
                f"({(hooks - bare) / records * 1e6:.1f} us/record), fvis {fmt_s(fv)} "
                f"{fv / bare:.3f}x ({(fv - bare) / records * 1e6:.1f} us/record, "
                f"{(fv - hooks) / records * 1e6:.1f} us over the empty hooks); "
                f"others {t['bare'].others:.1f} cores",
                flush=True,
            )


if __name__ == "__main__":
    main()
