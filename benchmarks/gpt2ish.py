"""A GPT-2-tiny-shaped transformer written like Hugging Face's GPT-2 (token and position
embeddings, ``Conv1D`` as ``addmm`` on a view, heads split with ``split``/``view``/
``transpose``, SDPA, ``gelu_new`` as seven functional ops, residual adds): 4 blocks of width
256 over ``GPT2_INPUT`` tokens. Shared by ``ops_overhead.py``, ``per_record.py`` and
``cuda_overhead.py``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
