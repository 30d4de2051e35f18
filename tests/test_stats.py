"""Statistics: the native one-pass path and the torch path against a float64 numpy reference."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from fvis import stats
from fvis.stats import Stats, tensor_stats

NATIVE = stats._native is not None


@contextmanager
def torch_path() -> Iterator[None]:
    saved, stats._native = stats._native, None
    try:
        yield
    finally:
        stats._native = saved


def reference(t: torch.Tensor, axis: int = 1) -> dict[str, float | int | None]:
    """What the report should say, computed in float64 with numpy, one definition at a time."""
    a = t.detach().to(torch.float64).numpy()
    finite = a[np.isfinite(a)]
    dead = 0
    if a.ndim >= 3:
        per_channel = np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)
        dead = int((per_channel == 0).all(axis=1).sum())
    return {
        "min": float(finite.min()) if finite.size else None,
        "max": float(finite.max()) if finite.size else None,
        "mean": float(finite.mean()) if finite.size else None,
        "std": float(finite.std(ddof=1)) if finite.size > 1 else (0.0 if finite.size else None),
        "zero_fraction": float((a == 0).sum() / a.size),
        "nan": int(np.isnan(a).sum()),
        "posinf": int(np.isposinf(a).sum()),
        "neginf": int(np.isneginf(a).sum()),
        "dead_channels": dead,
    }


def assert_matches(s: Stats, want: dict[str, float | int | None]) -> None:
    for key in ("min", "max", "zero_fraction", "nan", "posinf", "neginf", "dead_channels"):
        assert getattr(s, key) == want[key], key
    for key in ("mean", "std"):
        got, exp = getattr(s, key), want[key]
        if exp is None:
            assert got is None, key
        else:  # float32 sums: relative to the spread, since mean can be ~0
            scale = abs(exp) + (want["std"] or 0.0) + 1e-30
            assert got == pytest.approx(exp, abs=2e-6 * scale), key


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cases() -> dict[str, torch.Tensor]:
    g = _gen(0)
    relu = torch.randn(2, 5, 7, 9, generator=g).relu()
    relu[:, 1] = 0.0  # dead in both samples
    relu[0, 3] = 0.0  # zero in one sample only: alive
    signed_zero = torch.randn(1, 4, 33, generator=g)
    signed_zero[0, 2] = -0.0
    nonfinite = torch.randn(3, 2, 17, generator=g)
    nonfinite[0, 0, 3] = float("nan")
    nonfinite[1, 1, 0] = float("inf")
    nonfinite[2, 0, 16] = float("-inf")
    nonfinite[2, 1, 5] = 0.0
    return {
        "scalar": torch.tensor(3.5),
        "one value": torch.tensor([-2.0]),
        "tail of 15": torch.randn(15, generator=g),
        "several blocks": torch.randn(3 * 4096 + 37, generator=g),
        "(N, D)": torch.randn(4, 129, generator=g) * 100 + 5,
        "(N, T, D)": torch.randn(2, 6, 31, generator=g),
        "conv map": torch.randn(1, 64, 28, 28, generator=g),
        "relu with dead channels": relu,
        "negative zero": signed_zero,
        "nan and inf": nonfinite,
        "all nan": torch.full((2, 3), float("nan")),
        "only inf": torch.tensor([float("inf"), float("-inf")]),
        "constant offset (cancellation)": torch.full((1, 2, 50), 1000.0)
        + torch.arange(100.0).view(1, 2, 50) * 1e-4,
        "constant": torch.full((1, 3, 4, 4), 7.0),
        "all zero": torch.zeros(2, 3, 4),
        "denormals": torch.full((40,), 1e-40),
        "float32 sum overflows": torch.tensor([3e38, 3e38, -1.0, 0.0]),
        "squares overflow": torch.tensor([2e19, -3e19, 1.0]),
        "5-D": torch.randn(1, 3, 2, 5, 5, generator=g),
    }


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_native_and_torch_paths_match_the_reference(name: str) -> None:
    t = CASES[name]
    want = reference(t)
    assert_matches(tensor_stats(t), want)
    with torch_path():
        assert_matches(tensor_stats(t), want)


@pytest.mark.parametrize("name", list(CASES))
def test_channels_on_the_last_dim_match_the_reference_on_both_paths(name: str) -> None:
    t = CASES[name]
    want = reference(t, axis=-1)
    got = tensor_stats(t, axis=-1)
    assert_matches(got, want)
    with torch_path():
        assert_matches(tensor_stats(t, axis=-1), want)
    assert got.channels == (t.shape[-1] if t.dim() >= 3 else 0)
    assert got.channel_axis == (t.dim() - 1 if t.dim() >= 3 else None)


def test_dead_units_of_a_sequence_are_counted_on_the_last_dim() -> None:
    # A BERT-sized MLP activation: 64 of 128 units dead for every token; no token is all zero.
    t = torch.randn(2, 16, 128, generator=_gen(3)).abs() + 0.1
    t[..., ::2] = 0.0
    for path in (contextlib.nullcontext(), torch_path()):
        with path:
            last, first = tensor_stats(t, axis=2), tensor_stats(t, axis=1)
        assert (last.channels, last.dead_channels, last.channel_axis) == (128, 64, 2)
        assert (first.channels, first.dead_channels) == (16, 0)  # what dim 1 said before


@pytest.mark.parametrize(
    "make",
    [
        lambda t: t.transpose(1, 2),  # not contiguous: torch path
        lambda t: t.to(torch.float16),  # converted to float32 first
        lambda t: t.to(torch.bfloat16),
        lambda t: t.to(torch.float64),
        lambda t: (t * 10).to(torch.int32),
        lambda t: t.contiguous(memory_format=torch.channels_last),
    ],
    ids=["transposed", "float16", "bfloat16", "float64", "int32", "channels_last"],
)
def test_other_layouts_and_dtypes_match_the_reference(make) -> None:  # type: ignore[no-untyped-def]
    base = torch.randn(2, 3, 5, 6, generator=_gen(1)).relu()
    base[:, 2] = 0
    t = make(base)
    assert_matches(tensor_stats(t), reference(t))


def test_random_shapes_agree_between_paths() -> None:
    g = _gen(7)
    for _ in range(60):
        dims = int(torch.randint(1, 5, (1,), generator=g))
        shape = tuple(int(v) for v in torch.randint(1, 40, (dims,), generator=g))
        t = torch.randn(shape, generator=g)
        t[t.abs() < 0.3] = 0.0  # plenty of exact zeros
        native = tensor_stats(t)
        with torch_path():
            slow = tensor_stats(t)
        assert (native.min, native.max, native.zero_fraction, native.dead_channels) == (
            slow.min,
            slow.max,
            slow.zero_fraction,
            slow.dead_channels,
        ), shape
        assert native.mean == pytest.approx(slow.mean, abs=1e-6)
        assert native.std == pytest.approx(slow.std, rel=1e-5, abs=1e-7)


def test_requires_grad_and_inference_tensors_are_read_without_a_graph() -> None:
    leaf = torch.randn(1, 2, 8, generator=_gen(3), requires_grad=True)
    out = leaf * 2
    assert_matches(tensor_stats(out), reference(out))
    with torch.inference_mode():
        frozen = torch.randn(1, 2, 8, generator=_gen(4))
    assert_matches(tensor_stats(frozen), reference(frozen))


def test_empty_tensor_has_no_statistics() -> None:
    s = tensor_stats(torch.zeros(0, 3))
    assert s.numel == 0 and s.min is None and s.mean is None and s.zero_fraction == 0.0


@pytest.mark.skipif(not NATIVE, reason="fvis._moments was not built")
def test_native_rejects_invalid_layouts() -> None:
    native = stats._native
    assert native is not None
    with pytest.raises(ValueError):
        native.moments(0, 1, 1, 4)
    t = torch.ones(4)
    with pytest.raises(ValueError):
        native.moments(t.data_ptr(), 1, 0, 4)
    with pytest.raises(TypeError):
        native.moments(t.data_ptr(), 1, 1)


def test_native_extension_is_built_where_a_compiler_exists() -> None:
    """The fast path must not silently go missing from a normal install."""
    if os.environ.get("FVIS_NATIVE") == "0":
        pytest.skip("FVIS_NATIVE=0 turns the extension off")
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler: fvis uses the torch path")
    assert NATIVE, "fvis._moments is missing: reinstall with `pip install -e .`"


class _Sub(torch.Tensor):
    """A subclass fvis does not know: its memory may not hold its values."""


def test_tensors_whose_memory_is_not_their_values_take_the_torch_path() -> None:
    base = torch.tensor([[[1.0, -2.0, 3.0, 0.0]]])
    negated = torch._neg_view(base)  # lazily negated: the memory holds the values unnegated
    assert_matches(tensor_stats(negated), reference(-base))
    assert_matches(tensor_stats(base.as_subclass(_Sub)), reference(base))


def test_zero_tensor_without_storage() -> None:
    z = torch._efficientzerotensor(2, 3, 4)
    s = tensor_stats(z)
    assert (s.min, s.max, s.mean, s.zero_fraction, s.dead_channels) == (0.0, 0.0, 0.0, 1.0, 3)


def test_tiny_values_keep_their_spread() -> None:
    """Squares of values near 1e-22 are float32 subnormals: the float64 pass takes over."""
    t = torch.tensor([1e-22, -2e-22, 3e-22, 0.0, 5e-23])
    want = reference(t)
    assert_matches(tensor_stats(t), want)
    with torch_path():
        assert_matches(tensor_stats(t), want)


@pytest.mark.skipif(not NATIVE, reason="fvis._moments was not built")
def test_portable_loop_matches_the_simd_one() -> None:
    native = stats._native
    assert native is not None
    g = _gen(11)
    for shape in [(1, 1, 1), (1, 3, 7), (2, 5, 17), (3, 2, 4096 + 9), (1, 64, 49)]:
        t = torch.randn(shape, generator=g)
        t[t.abs() < 0.5] = 0.0
        t[:, 0] = 0.0
        simd = native.moments(t.data_ptr(), *shape)
        plain = native.moments(t.data_ptr(), *shape, False)
        assert simd[:2] == plain[:2] and simd[4:] == plain[4:], shape  # min, max, zeros, dead
        assert simd[2] == pytest.approx(plain[2], rel=1e-5, abs=1e-4)
        assert simd[3] == pytest.approx(plain[3], rel=1e-5)


def test_extension_without_simd_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its portable loop runs on one thread: slower than torch on large maps."""

    class NoSimd:
        SIMD = 0

    monkeypatch.setattr(stats.importlib, "import_module", lambda name: NoSimd())
    monkeypatch.delenv("FVIS_NATIVE", raising=False)
    assert stats._load_native() is None
    monkeypatch.setenv("FVIS_NATIVE", "0")
    assert stats._load_native() is None
