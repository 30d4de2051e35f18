"""The per-capture setup in C (fvis/_walk.c, fvis/_wrap.c) and what it keeps out of the
cycle collector: the same module tree as the Python walk, wrappers that are put back and
never tracked, and a capture that leaves no per-module object for the collector to move to
its oldest generation (which made CPython run a full collection every ~20 captures)."""

from __future__ import annotations

import collections
import functools
import gc
import sys
import types
import weakref

import pytest
import torch
from torch import nn

from fvis import fasthooks
from fvis.capture import Mode, _python_walk, _walk, capture
from sample_models.zoo import SAMPLES, build
from tests.hook_paths import assert_same, run_capture

pytestmark = pytest.mark.skipif(not fasthooks.enabled(), reason="fvis._moments not built or off")


class Shared(nn.Module):
    """One module under three names, a ``None`` child, nested containers."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.again = self.block
        self.items = nn.ModuleList([self.block[0], nn.Identity()])
        self.nothing = None
        self.heads = nn.ModuleDict({"a": nn.Linear(4, 2), "b c": nn.Linear(4, 2)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads["a"](self.items[1](self.again(x)))


def tree_fields(tree: object) -> tuple[object, ...]:
    return (tree.names, tree.modules, tree.by_name, tree.classes)  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", [*SAMPLES, "shared"])
def test_the_c_walk_builds_the_python_tree(name: str) -> None:
    model = Shared() if name == "shared" else build(name)
    fast, slow = _walk(model), _python_walk(model)
    assert tree_fields(fast) == tree_fields(slow)
    assert list(fast.by_name) == list(slow.by_name)  # the same order: names are listed in it
    assert list(fast.names) == list(slow.names)


def test_the_walk_names_a_shared_module_under_every_name() -> None:
    model = Shared()
    tree = _walk(model)
    assert tree.names[id(model.block)] == ["block", "again"]
    assert tree.names[id(model.block[0])] == ["block.0", "items.0"]  # its subtree walked once
    assert "heads.b c" in tree.by_name and "nothing" not in tree.by_name


def test_an_odd_modules_table_is_walked_in_python(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``_modules`` that is not a dict: the C walk declines and Python walks it."""
    model = Shared()
    assert fasthooks._native.walk_modules(model) is not None
    object.__setattr__(model.heads, "_modules", _ModulesTable(model.heads._modules))
    assert fasthooks._native.walk_modules(model) is None
    assert "heads.a" in _walk(model).by_name


class _ModulesTable:
    def __init__(self, items: dict[str, nn.Module]) -> None:
        self._items = dict(items)

    def items(self) -> object:
        return self._items.items()

    def values(self) -> object:
        return self._items.values()

    def __bool__(self) -> bool:
        return bool(self._items)

    def __iter__(self) -> object:
        return iter(self._items)

    def __getitem__(self, key: str) -> nn.Module:
        return self._items[key]


def test_wrapped_forwards_are_untracked_and_put_back() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    seen: list[tuple[bool, bool]] = []

    def look(module: nn.Module, args: object, output: object) -> None:
        wrapper = model[1].__dict__.get("forward")
        seen.append((wrapper is not None, wrapper is not None and gc.is_tracked(wrapper)))

    model[0].register_forward_hook(look)
    capture(model, [torch.ones(1, 4)], ["0", "1"])
    assert seen == [(True, False)]
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert model[1].forward.__func__ is nn.ReLU.forward


def test_a_capture_leaves_nothing_per_module_for_the_collector() -> None:
    """Before: a wrapper, a bound method, two tuples and a list per module were alive and
    tracked mid-capture (every collection then moved them to the oldest generation)."""
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(200)])
    last = model[-1]
    found: list[int] = []
    before: set[int] = set()

    def count(module: nn.Module, args: object, output: object) -> None:
        found.append(sum(1 for o in gc.get_objects() if id(o) not in before))

    last.register_forward_hook(count)
    layers = [str(k) for k in range(200)]
    capture(model, [torch.ones(2, 8)], layers, mode=Mode.INFERENCE, keep_values=False)  # warm
    found.clear()
    gc.collect()
    before.update(id(o) for o in gc.get_objects())
    capture(model, [torch.ones(2, 8)], layers, mode=Mode.INFERENCE, keep_values=False)
    assert found and found[0] < 100, found  # ~50 (the capture's own frames); was over 1,000


def test_untrack_takes_only_plain_containers() -> None:
    items = [[1], (object(),), {"a": []}, nn.Linear(1, 1)]
    fasthooks.untrack(items)
    assert [gc.is_tracked(item) for item in items] == [False, False, False, True]


class Double(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad * 2


class Triple(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x * 3

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad * 3


class Custom(nn.Module):
    def __init__(self, function: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.function = function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function.apply(x)


def test_grad_fn_names_of_every_kind_of_node() -> None:
    """Generated nodes and Python autograd.Functions (two classes, one name each), as each
    output's own ``grad_fn.name()`` says (an independent forward hook reads it)."""
    model = nn.Sequential(nn.Linear(3, 3), Custom(Double), Custom(Triple), Custom(Double))
    names: dict[str, str] = {}
    for name, module in model.named_children():
        module.register_forward_hook(
            lambda m, a, out, name=name: names.__setitem__(name, out.grad_fn.name())
        )
    x = torch.ones(1, 3, requires_grad=True)
    for _ in range(2):  # the second run reads the names remembered per node class
        result = capture(model, [x], ["0", "1", "2", "3"])
        assert {c.layer: c.grad.grad_fn for c in result.captures} == names
    assert names == {
        "0": "AddmmBackward0",
        "1": "DoubleBackward",
        "2": "TripleBackward",
        "3": "DoubleBackward",
    }


class AnswersForward(nn.Module):
    """Its own ``__getattribute__`` answers ``forward`` without looking at the instance."""

    def __getattribute__(self, name: str) -> object:
        if name == "forward":
            return lambda x: x * 3
        return super().__getattribute__(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


class PartialForward(nn.Module):
    """A ``forward`` on the class that is not a plain function."""

    def _scaled(self, x: torch.Tensor, factor: float) -> torch.Tensor:
        return x * factor

    forward = functools.partialmethod(_scaled, factor=5.0)


@pytest.mark.parametrize("cls", [AnswersForward, PartialForward])
def test_odd_forwards_are_captured_as_a_plain_call_runs_them(cls: type[nn.Module]) -> None:
    """Each capture holds what the module's own call returns (3x, 5x), wrapped or not."""
    model = nn.Sequential(cls())
    x = torch.ones(1, 2)
    expected = model(x)
    result = capture(model, [x], ["0"])
    assert [c.stats.max for c in result.captures] == [float(expected.max())]
    assert fasthooks.wrappable(list(model.modules())) is (cls is PartialForward)
    assert "forward" not in model[0].__dict__


class PropertyForward(nn.Module):
    """``forward`` is a property: a data descriptor, which the instance dict cannot shadow."""

    @property
    def forward(self) -> object:  # type: ignore[override]
        return lambda x: x * 7


def test_a_property_forward_keeps_the_global_hooks() -> None:
    model = nn.Sequential(PropertyForward())
    assert not fasthooks.wrappable(list(model.modules()))
    result = capture(model, [torch.ones(1, 2)], ["0"])
    assert [c.stats.max for c in result.captures] == [7.0]


def backward_hooked() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
    model[2].register_full_backward_hook(lambda module, grad_in, grad_out: None)
    return model


@pytest.mark.parametrize("what", ["input", "output"])
def test_backward_hooks_keep_the_global_hooks(what: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full backward hook swaps a module's arguments for BackwardHookFunction outputs after
    the global pre-hooks ran: wrapped, the inputs' grad_fn would differ from what the global
    hooks record (the Python session is the reference)."""
    model = backward_hooked()
    assert not fasthooks.wrappable(list(model.modules()))
    x = torch.ones(1, 3, requires_grad=True)
    fast, _, _ = run_capture(model, x, True, monkeypatch, what=what)
    slow, _, _ = run_capture(model, x, False, monkeypatch, what=what)
    assert_same(fast, slow)


class KeepsForward(nn.Module):
    """Keeps a partial of its child's ``forward``, or its own ``forward`` (``own``): the
    wrapper, during a capture; a cycle module -> kept -> wrapper (-> module, when its own)."""

    def __init__(self, own: bool) -> None:
        super().__init__()
        self.inner = nn.Linear(2, 2)
        self.own = own
        self.kept: object = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kept is None:  # the capture's wrapper, and only it
            self.kept = self.forward if self.own else functools.partial(self.inner.forward)
        return self.inner(x)


@pytest.mark.parametrize(("own", "layer"), [(False, "inner"), (True, "")])
def test_a_kept_wrapper_lets_the_capture_go(own: bool, layer: str) -> None:
    """After the capture the kept wrapper is a plain forward, records nothing, and the model
    is collected. The wrapper of a captured module carries its target entry ((name, module),
    kept out of the collector): a kept one must let it go too, or the cycle through its
    module could never be collected."""
    model = KeepsForward(own)
    result = capture(model, [torch.ones(1, 2)], [layer])
    assert len(result.captures) == 1
    kept = model.kept
    assert torch.equal(kept(torch.ones(1, 2)), model.inner(torch.ones(1, 2)))  # type: ignore[operator]
    gone = weakref.ref(model)
    del model, kept, result
    gc.collect()
    assert gone() is None


def test_an_ordered_modules_table_is_walked_in_its_own_order() -> None:
    """An OrderedDict ``_modules`` (old pickles) iterates in its own order, which may not be
    the dict's insertion order: Python walks it."""
    model = nn.Sequential(nn.ReLU(), nn.Tanh(), nn.Sigmoid())
    object.__setattr__(model, "_modules", collections.OrderedDict(model._modules))
    model._modules.move_to_end("0")
    assert fasthooks._native.walk_modules(model) is None
    assert list(_walk(model).by_name) == ["", "1", "2", "0"] == list(_python_walk(model).by_name)


def test_a_stale_build_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """An in-place build from before the wrapped forwards has a Tracer but not the rest."""
    old = types.SimpleNamespace(Tracer=object, slot_offsets=None)
    monkeypatch.setattr(fasthooks.importlib, "import_module", lambda name: old)
    assert fasthooks._load() is None


def test_tensor_facts_follow_a_patched_tensor_class(monkeypatch: pytest.MonkeyPatch) -> None:
    """The descriptors read in C are looked up again when torch.Tensor changes."""
    model = nn.Sequential(nn.Linear(2, 2))
    x = torch.ones(1, 2)
    assert [c.grad.is_leaf for c in capture(model, [x], ["0"]).captures] == [False]
    monkeypatch.setattr(torch.Tensor, "_version", property(lambda self: 41))
    (patched,) = capture(model, [x], ["0"]).captures
    assert patched.grad.version == 41


def test_an_inference_tensor_out_of_inference_mode_is_told_without_a_version() -> None:
    """Out of inference mode the C path reads the version first and asks is_inference() only
    where that read fails: a cached inference tensor must still be reported as one."""
    with torch.inference_mode():
        table = torch.ones(2, 3)

    class Table(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return table

    model = nn.Sequential(Table(), nn.Identity())
    for mode in (Mode.GRAD, Mode.NO_GRAD):
        (got,) = capture(model, [torch.zeros(1)], ["0"], mode=mode).captures
        assert got.grad.is_inference is table.is_inference() is True
        assert got.grad.version is None and got.grad.grad_fn is None and got.grad.is_leaf


def test_captures_keep_their_order_when_one_was_done_before_the_end() -> None:
    """An inference tensor's capture is done at once, the held ones at the end: the C path
    sorts them back into the order the captures were made, as the Python path does."""
    from tests.test_fast_hooks import CachedNet

    model = CachedNet().eval()
    result = capture(model, [torch.randn(2, 4)], ["proj", "table"], mode=Mode.GRAD)
    assert [c.layer for c in result.captures] == ["proj", "table"]
    assert [c.grad.is_inference for c in result.captures] == [False, True]


def test_the_c_targets_are_the_python_targets() -> None:
    """fasthooks.targets_of (C) and the Python fallback pick the same (name, module) per module,
    the first name of a shared module, and name the same missing layer."""
    from fvis.capture import _python_targets

    model = Shared()
    tree = _walk(model)
    layers = ["again", "block", "items.0", "heads.a"]
    assert fasthooks.targets_of(tree.by_name, layers) == _python_targets(tree, layers)
    assert fasthooks.targets_of(tree.by_name, layers)[0][id(model.block)][0] == "again"
    missing = ["block", "nope", "also.nope"]
    assert fasthooks.targets_of(tree.by_name, missing) == (None, "nope")
    assert _python_targets(tree, missing) == (None, "nope")


def test_same_shaped_outputs_in_a_row_share_a_shape_and_others_do_not() -> None:
    """The C path reuses the previous call's shape tuple for an equal shape: each record must
    still carry its own output's shape (checked against the tensors themselves)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3), nn.Linear(3, 4), nn.ReLU())
    x = torch.randn(2, 4)
    seen: list[tuple[int, ...]] = []
    hooks = [
        m.register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape))) for m in model
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    result = capture(model, [x], [str(i) for i in range(5)])
    assert [c.shape for c in result.captures] == seen == [(2, 4), (2, 4), (2, 3), (2, 4), (2, 4)]
    records = [r for r in result.trace if r.name]
    assert [r.output_shapes for r in records] == [(s,) for s in seen]
    assert result.captures[0].shape is result.captures[1].shape  # shared, as intended


class Chain(nn.Module):
    """A chain of nested modules, deeper than the C walk of parameters goes (200), whose only
    trainable parameter is at the bottom; forward does not call the chain."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.child: nn.Module = Chain(depth - 1) if depth > 1 else nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def test_a_tree_too_deep_for_c_is_decided_by_python_without_stale_marks() -> None:
    """Past 200 levels the C code leaves params_require_grad to the Python code; the marks it
    set on the way down must not stay behind for Python to trust (they said False)."""
    model = Chain(205)
    truth = any(p.requires_grad for p in model.parameters())
    result = capture(model, [torch.ones(1, 2)], [""])
    (top,) = [r for r in result.trace if r.name == ""]
    assert top.params_require_grad is truth is True


@pytest.mark.skipif(
    not (3, 11) <= sys.version_info[:2] <= (3, 12), reason="read in place only on 3.11 and 3.12"
)
def test_the_running_frames_code_is_read_without_a_frame_object() -> None:
    """configure_wrap found where the interpreter frame keeps its code object (checked against
    PyEval_GetFrame once), so a wrapped call makes no frame object; what it decides is tested
    by the direct-forward cases of tests/test_fast_hooks.py."""
    assert fasthooks._native.code_slot() == (4 if sys.version_info[:2] == (3, 11) else 0)
