"""What the op watch that records graph cuts with their source lines costs (issue 15).

Not a test: prints medians and ratios to a bare forward (grad mode, eval) for a
ResNet-18-shaped model at 224x224, the GPT-2-tiny-shaped transformer of ``gpt2ish.py``
(the one ``ops_overhead.py`` and ``per_record.py`` use) and a very small GPT-2 (2 blocks of
width 64, 64 tokens: a sub-millisecond forward where torch's per-op dispatch dominates), side
by side:

- ``empty mode``: a ``TorchFunctionMode`` that does nothing (what any such mode costs);
- ``watch (old ops)``: the watch as it was before cut sites (4 detach functions);
- ``watch (cut sites)``: ``fvis.cuts.DetachWatch`` with the cut table of ``fvis.cuts``;
- ``capture, no watch`` / ``capture + watch``: ``fvis.capture`` hooking no layer (the module
  trace only), without and with the watch: the second, watched pass the API runs when a
  verdict blames a cut.

    PYTHONPATH=. python benchmarks/cut_watch.py [--reps 15]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import fmt_s, interleaved
from benchmarks.gpt2ish import GPT2_INPUT, GPT2ish
from benchmarks.models import RESNET_INPUT, resnet18ish
from fvis.capture import capture
from fvis.cuts import DetachWatch
from fvis.session import _Session

_OLD = frozenset(
    {torch.Tensor.detach, torch.detach, torch.Tensor.data.__get__, torch.Tensor.detach_}
)


class _EmptyMode(TorchFunctionMode):
    """The floor of any Python function mode: every op dispatched to it, nothing done."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


class _OldWatch(TorchFunctionMode):
    """The watch before cut sites, for comparison (its session call is a no-op here)."""

    def __init__(self) -> None:
        super().__init__()
        self.in_place = False

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in _OLD and args:
            pass
        elif (kwargs and kwargs.get("inplace")) or getattr(func, "__name__", "").endswith("_"):
            self.in_place = True
        return func(*args, **(kwargs or {}))


class Block(nn.Module):
    """A GPT-2 block: pre-norm attention (fused qkv, SDPA) and a GELU MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.c_attn, self.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.c_fc, self.mlp_proj = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(dim, dim=2)
        q, k, v = (t.view(batch, tokens, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(att.transpose(1, 2).reshape(batch, tokens, dim))
        return x + self.mlp_proj(self.act(self.c_fc(self.ln_2(x))))


class GPT2Tiny(nn.Module):
    def __init__(self, vocab: int = 1000, dim: int = 64, heads: int = 2, depth: int = 2) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(128, dim)
        self.h = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.ln_f, self.lm_head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def _contenders(model: nn.Module, x: Tensor) -> dict[str, Any]:
    session = _Session({}, {}, None, False, None)

    def under(mode_factory: Any) -> Any:
        def run() -> object:
            with torch.enable_grad(), mode_factory():
                return model(x)

        return run

    def bare() -> object:
        with torch.enable_grad():
            return model(x)

    return {
        "bare forward": bare,
        "empty mode": under(_EmptyMode),
        "watch (old ops)": under(_OldWatch),
        "watch (cut sites)": under(lambda: DetachWatch(session)),
        "capture, no watch": lambda: capture(model, [x], [], keep_values=False),
        "capture + watch": lambda: capture(model, [x], [], keep_values=False, watch_ops=True),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=15)
    reps = parser.parse_args().reps
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cases = {
        "resnet18ish 1x3x224x224": (resnet18ish().eval(), torch.randn(RESNET_INPUT)),
        "gpt2-tiny-shaped 4x256d, 1x128 tokens": (
            GPT2ish().eval(),
            torch.randint(0, 5000, GPT2_INPUT),
        ),
        "very small gpt2 2x64d, 1x64 tokens": (GPT2Tiny().eval(), torch.randint(0, 1000, (1, 64))),
    }
    for name, (model, x) in cases.items():
        timings = interleaved(_contenders(model, x), reps)
        bare = timings["bare forward"].median
        print(f"## {name}")
        for label, timing in timings.items():
            spread = f"±{timing.spread / 2:.0%}"
            print(
                f"  {label:20s} {fmt_s(timing.median):>9s} ({spread})  {timing.median / bare:.2f}x"
            )


if __name__ == "__main__":
    main()
