"""The edge-case zoo: tiny seeded models, each named after the case it shows.

Every model builds in milliseconds, has weights that depend only on a seed, is returned in
eval mode (so BatchNorm uses its stored statistics and a forward mutates no buffer) and
scripts with ``torch.jit.script``. The classes live here, not in ``__main__``, because a
pickled module (``NAME.module.pt``) records each class by its import path.

>>> model = build("nested_cnn")
>>> model(example_input("nested_cnn")).shape
torch.Size([1, 3])
>>> SAMPLES["nested_cnn"].layer
'backbone.layer1.0.conv1'
"""

# No `from __future__ import annotations` in this file: TorchScript evaluates the string
# annotations of methods, but reads class-level attribute annotations as written, so
# `intermediate_output: Tensor | None` on StoresInplace fails to script with
# "Unknown type annotation: 'Tensor | None'".

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fvis.sample import InnerModel, OuterModel, build_sample

__all__ = [
    "SAMPLES",
    "Attention",
    "Backbone",
    "BasicBlock",
    "ChunkUnused",
    "Classifier",
    "DeadBranch",
    "DetachOuter",
    "DetachingInner",
    "EncoderLayer",
    "FeatureEncoder",
    "FrozenBackbone",
    "FrozenTransfer",
    "InnerModel",
    "NeverRuns",
    "OuterModel",
    "SampleSpec",
    "SharedBlock",
    "SharedMixed",
    "Splitter",
    "StoresInplace",
    "TinyTransformer",
    "TransformerEncoder",
    "TransformerMLP",
    "build",
    "example_input",
]


# --- nested_cnn: ResNet-style backbone with an in-place ReLU and a reused ReLU module --------


class BasicBlock(nn.Module):
    """torchvision's BasicBlock shape: ONE ``relu`` module called twice, ``out += identity``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity  # modifies bn2's output in place, as torchvision does
        return self.relu(out)


class Backbone(nn.Module):
    """Stem conv -> BN -> in-place ReLU (it rewrites the BN output), then ``layer1``."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(width))

    def forward(self, x: Tensor) -> Tensor:
        return self.layer1(self.relu(self.bn1(self.conv1(x))))


class Classifier(nn.Module):
    """A nested CNN: ``backbone`` (a ``Backbone``) then a pool-flatten-linear ``head``."""

    def __init__(self, width: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.backbone = Backbone(width)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


# --- detach_inner: the inner model cuts the graph ---------------------------------------------


class DetachingInner(nn.Module):
    """An inner model whose forward returns ``out.detach()``."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(10, 8)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.linear(x))
        return out.detach()


class DetachOuter(nn.Module):
    """``inner`` (which detaches) then a ``head`` Linear: the head still gets gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = DetachingInner()
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.inner(x))


# --- frozen_nograd: transfer learning, frozen backbone run under no_grad ----------------------


class FrozenBackbone(nn.Module):
    """A feature extractor whose parameters the outer model freezes."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(10, 8)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.linear(x))


class FrozenTransfer(nn.Module):
    """Backbone params ``requires_grad_(False)`` and called inside ``torch.no_grad()``."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = FrozenBackbone()
        self.backbone.requires_grad_(False)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            feats = self.backbone(x)
        return self.head(feats)


# --- dead_branch: a branch computed and thrown away -------------------------------------------


class DeadBranch(nn.Module):
    """Computes ``self.aux(h)`` and never uses it."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(10, 8)
        self.relu = nn.ReLU()
        self.aux = nn.Sequential(nn.Linear(8, 4), nn.ReLU())
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.relu(self.trunk(x))
        self.aux(h)  # computed, then dropped: not connected to the output
        return self.head(h)


# --- never_runs: a branch not taken and a direct .forward call --------------------------------


class NeverRuns(nn.Module):
    """``skipped`` sits behind a false condition; ``direct`` is called as ``.forward(h)``."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(10, 8)
        self.relu = nn.ReLU()
        self.skipped = nn.Linear(8, 8)
        self.direct = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.relu(self.trunk(x))
        if x.shape[-1] > 1000:
            h = self.skipped(h)
        return self.direct.forward(h)  # bypasses __call__, so hooks on `direct` never fire


# --- chunk_unused: split outputs where one part is never used ---------------------------------


class Splitter(nn.Module):
    """Returns both halves of the last dimension as a tuple."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        left, right = x.chunk(2, dim=-1)
        return left, right


class ChunkUnused(nn.Module):
    """``proj`` output is chunked and half dropped; ``splitter`` returns a tuple, half unused."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(10, 16)
        self.mid = nn.Linear(8, 8)
        self.act = nn.ReLU()
        self.splitter = Splitter()
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        a, _b = self.proj(x).chunk(2, dim=-1)  # _b: half of proj's output, never used
        left, _right = self.splitter(self.act(self.mid(a)))  # _right: tuple element 1, unused
        return self.head(left)


# --- shared_mixed: one module called with and without grad ------------------------------------


class SharedBlock(nn.Module):
    """A small block the outer model calls twice."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.act = nn.Tanh()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.linear(x))


class SharedMixed(nn.Module):
    """``shared`` runs twice: call 0 with grad, call 1 under ``torch.no_grad()``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(10, 8)
        self.shared = SharedBlock()
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        tracked = self.shared(h)
        with torch.no_grad():
            untracked = self.shared(h)
        return self.head(tracked + untracked)


# --- stores_inplace: a stored intermediate modified in place afterwards -----------------------


class FeatureEncoder(nn.Module):
    """Linear then GELU (GELU saves its input, so a later in-place edit keeps backward valid)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(10, 8)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.linear(x))


class StoresInplace(nn.Module):
    """Stores ``inner``'s output on ``self``, then edits it in place with ``mul_``."""

    intermediate_output: Tensor | None

    def __init__(self) -> None:
        super().__init__()
        self.inner = FeatureEncoder()
        self.head = nn.Linear(8, 2)
        self.intermediate_output = None

    def forward(self, x: Tensor) -> Tensor:
        inner_out = self.inner(x)
        self.intermediate_output = inner_out
        inner_out.mul_(2)  # the stored tensor (and any hook capture of it) changes too
        return self.head(inner_out)


# --- tiny_transformer: tuple-returning attention, ModuleList, dict output ---------------------


class Attention(nn.Module):
    """Hand-written multi-head self-attention returning ``(out, attn_weights)``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        batch, tokens, dim = x.size(0), x.size(1), x.size(2)
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (batch, heads, tokens, head_dim)
        weights = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj(out), weights


class TransformerMLP(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-norm block; the attention weights (tuple element 1) are dropped."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = TransformerMLP(dim, 2 * dim)

    def forward(self, x: Tensor) -> Tensor:
        attended, _weights = self.attn(self.norm1(x))
        x = x + attended
        return x + self.mlp(self.norm2(x))


class TransformerEncoder(nn.Module):
    """``layers`` (a ModuleList of EncoderLayer) then a final ``norm``."""

    def __init__(self, dim: int, heads: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class TinyTransformer(nn.Module):
    """Float tokens (batch, 6, 16) in, ``{"logits": (batch, 4), "hidden": (batch, 6, 16)}`` out."""

    def __init__(self, dim: int = 16, heads: int = 2, depth: int = 2, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(dim, dim)
        self.encoder = TransformerEncoder(dim, heads, depth)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        hidden = self.encoder(self.embed(x))
        return {"logits": self.head(hidden.mean(dim=1)), "hidden": hidden}


# --- registry ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleSpec:
    """One sample: how to build it, what to feed it, and which layer users ask for."""

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    layer: str
    about: str


def _seeded(factory: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """Build ``factory()`` under a fixed seed, without touching the global RNG; eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory()
        # Fresh BatchNorm stats are mean 0 / var 1, which makes eval-mode BN near-identity;
        # seeded non-trivial stats make its output look like a trained model's.
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                if module.running_mean is not None and module.running_var is not None:
                    module.running_mean.normal_(0.0, 0.2)
                    module.running_var.uniform_(0.5, 1.5)
                nn.init.uniform_(module.weight, 0.5, 1.5)
                nn.init.normal_(module.bias, 0.0, 0.2)
    return model.eval()


def _spec(
    name: str, build: Callable[[], nn.Module], shape: tuple[int, ...], layer: str, about: str
) -> SampleSpec:
    """Positional shorthand for the table below."""
    return SampleSpec(name=name, build=build, input_shape=shape, layer=layer, about=about)


SAMPLES: dict[str, SampleSpec] = {
    spec.name: spec
    for spec in (
        _spec(
            "inner_outer",
            build_sample,
            (1, 10),
            "inner.relu",
            "the bundled default: a nested model two levels deep",
        ),
        _spec(
            "nested_cnn",
            lambda: _seeded(Classifier),
            (1, 3, 32, 32),
            "backbone.layer1.0.conv1",
            "ResNet-style CNN: in-place ReLU rewrites the BN output; one ReLU module fires twice",
        ),
        _spec(
            "detach_inner",
            lambda: _seeded(DetachOuter),
            (1, 10),
            "inner.relu",
            "the inner model returns out.detach(): its layers are cut off from the output",
        ),
        _spec(
            "frozen_nograd",
            lambda: _seeded(FrozenTransfer),
            (1, 10),
            "backbone.relu",
            "transfer learning: frozen backbone run under torch.no_grad(), trainable head",
        ),
        _spec(
            "dead_branch",
            lambda: _seeded(DeadBranch),
            (1, 10),
            "aux",
            "an auxiliary branch runs every forward but its output is never used",
        ),
        _spec(
            "never_runs",
            lambda: _seeded(NeverRuns),
            (1, 10),
            "skipped",
            "a branch not taken and a submodule called as .forward(): hooks never fire",
        ),
        _spec(
            "chunk_unused",
            lambda: _seeded(ChunkUnused),
            (1, 10),
            "splitter",
            "chunked outputs: one half of a split and one element of a tuple output unused",
        ),
        _spec(
            "shared_mixed",
            lambda: _seeded(SharedMixed),
            (1, 10),
            "shared",
            "one module called twice: once with grad, once under torch.no_grad()",
        ),
        _spec(
            "stores_inplace",
            lambda: _seeded(StoresInplace),
            (1, 10),
            "inner",
            "forward stores an intermediate on self, then edits it in place with mul_",
        ),
        _spec(
            "tiny_transformer",
            lambda: _seeded(TinyTransformer),
            (1, 6, 16),
            "encoder.layers.0.attn",
            "2-layer encoder: attention returns (out, weights), ModuleList, dict output",
        ),
    )
}


def _lookup(name: str) -> SampleSpec:
    """The spec for ``name``, or a ValueError that lists the names there are."""
    try:
        return SAMPLES[name]
    except KeyError:
        choices = ", ".join(SAMPLES)
        raise ValueError(f"no sample {name!r}; choose from: {choices}") from None


def build(name: str) -> nn.Module:
    """Build sample ``name`` with its fixed seed, in eval mode.

    >>> type(build("tiny_transformer")).__name__
    'TinyTransformer'
    """
    return _lookup(name).build()


def example_input(name: str, seed: int = 0) -> Tensor:
    """A standard-normal input of the sample's shape, from its own generator (no global RNG).

    >>> example_input("nested_cnn").shape
    torch.Size([1, 3, 32, 32])
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(_lookup(name).input_shape, generator=generator)
