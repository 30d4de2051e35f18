"""--ops: tensor ops inside forward, named module:op#index (issue 15, op capture).

Ground truth: an independent ``TorchFunctionMode`` written here (with its own per-module
hooks for the innermost call), clones of what it saw, and torch.autograd.grad."""

from __future__ import annotations

import gc
import json
import tracemalloc
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from fvis.capture import Mode, capture
from fvis.grads import diagnose
from sample_models.zoo import SAMPLES, build, example_input


class Inner(nn.Module):
    """Functional ops around one Linear: residual add, softmax, chunk, slicing."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x + self.linear(x)
        p = torch.softmax(s, dim=-1)
        a, b = p.chunk(2, dim=-1)
        return a * b + s[:, :2]


class Seed(nn.Module):
    """The seed's nested layout: ``inner`` then ``linear_out``."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Inner()
        self.linear_out = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_out(self.inner(x))


SEED_OPS = [
    ("inner.linear:linear#1", "compute"),
    ("inner:add#1", "compute"),
    ("inner:softmax#1", "compute"),
    ("inner:chunk#1", "view"),
    ("inner:mul#1", "compute"),
    ("inner:getitem#1", "view"),
    ("inner:add#2", "compute"),
    ("linear_out:linear#1", "compute"),
]


class Block(nn.Module):
    """A small transformer block: SDPA, softmax, residual add, chunk, in-place add_, GELU."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ln = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(self.ln(x)).chunk(3, dim=-1)
        q, k, v = (z.reshape(n, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(n, t, d))
        gate, up = self.fc(x).chunk(2, dim=-1)
        h = F.gelu(gate) * torch.softmax(up, dim=-1)
        h.add_(x)
        return x + h


class _Recorder(TorchFunctionMode):
    """Independent op record: innermost module (own hooks), function, cloned outputs."""

    def __init__(self, model: nn.Module, live: bool = False) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.seen: list[tuple[str, Any, list[torch.Tensor]]] = []
        self.live = live
        self.handles = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._push(name)))
            self.handles.append(module.register_forward_hook(self._pop))

    def _push(self, name: str) -> Any:
        return lambda _m, _a: self.stack.append(name)

    def _pop(self, *_: Any) -> None:
        self.stack.pop()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        parts = [out] if isinstance(out, torch.Tensor) else None
        if isinstance(out, tuple) and out and all(isinstance(t, torch.Tensor) for t in out):
            parts = list(out)
        if parts is not None and self.stack:
            kept = parts if self.live else [p.detach().clone() for p in parts]
            self.seen.append((self.stack[-1], func, kept))
        return out

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


_NAMES = {  # x + y reaches a function mode as Tensor.add in torch 2.13
    torch.Tensor.add: "add",
    torch.Tensor.__add__: "add",
    torch.Tensor.mul: "mul",
    torch.Tensor.__mul__: "mul",
    torch.Tensor.__getitem__: "getitem",
    torch.Tensor.chunk: "chunk",
    torch.softmax: "softmax",
    F.linear: "linear",
}


def _independent(model: nn.Module, x: torch.Tensor, live: bool = False) -> tuple[Any, list]:
    recorder = _Recorder(model, live)
    try:
        with recorder:
            out = model(x)
    finally:
        recorder.close()
    counts: dict[tuple[str, str], int] = {}
    named = []
    for module, func, parts in recorder.seen:
        op = _NAMES[func]
        counts[(module, op)] = counts.get((module, op), 0) + 1
        named.append((f"{module}:{op}#{counts[(module, op)]}", parts))
    return out, named


def _seed(seed: int = 0) -> tuple[Seed, torch.Tensor]:
    torch.manual_seed(seed)
    return Seed().eval(), torch.randn(3, 4)


def test_names_match_an_independent_function_mode() -> None:
    model, x = _seed()
    _, truth = _independent(model, x)
    result = capture(model, [x], [], ops=True)
    assert [(o.name, o.kind) for o in result.ops] == SEED_OPS
    assert [name for name, _ in truth] == [name for name, _ in SEED_OPS]
    assert [o.shapes for o in result.ops] == [
        tuple(tuple(p.shape) for p in parts) for _, parts in truth
    ]


def test_captured_values_equal_the_independent_record() -> None:
    model, x = _seed(1)
    _, truth = _independent(model, x)
    result = capture(model, [x], [], ops=True, sample=None)
    got = {c.label: c for c in result.captures}
    compute = [name for name, kind in SEED_OPS if kind == "compute"]
    assert list(got) == compute  # views are listed, not captured
    for name, parts in truth:
        if name in got:
            assert torch.equal(torch.from_numpy(got[name].values), parts[0].float())
            assert got[name].stats.max == pytest.approx(float(parts[0].max()))


def test_views_and_in_place_ops_are_captured_only_when_spelled_out() -> None:
    torch.manual_seed(2)
    model, x = Block().eval(), torch.randn(1, 5, 8)
    result = capture(model, [x], [":*"], ops=True)
    kinds = {o.name: o.kind for o in result.ops}
    assert kinds[":add_#1"] == "in-place" and kinds[":chunk#1"] == "view"
    assert kinds[":scaled_dot_product_attention#1"] == "compute"
    assert {c.label for c in result.captures} == {
        n for n, k in kinds.items() if k == "compute" and n.startswith(":")
    }
    spelled = capture(model, [x], [":chunk#2", "*:add_*"], ops=True)
    assert [c.label for c in spelled.captures] == [":chunk#2[0]", ":chunk#2[1]", ":add_#1"]


def test_globs_select_op_names() -> None:
    model, x = _seed(3)
    inner = capture(model, [x], ["inner:*"], ops=True)
    want = ["inner:add#1", "inner:softmax#1", "inner:mul#1", "inner:add#2"]
    assert [c.label for c in inner.captures] == want
    linears = capture(model, [x], ["*:linear*", "inner.linear"], ops=True)
    assert [c.label for c in linears.captures] == [
        "inner.linear:linear#1",
        "inner.linear",  # the module output, chosen by name as without --ops
        "linear_out:linear#1",
    ]
    first_call = capture(model, [x], ["inner#1:add#2"], ops=True)
    assert [c.label for c in first_call.captures] == ["inner:add#2"]


def test_names_are_stable_across_runs_and_weights() -> None:
    (a, x), (b, y) = _seed(4), _seed(5)
    first = [(o.name, o.shapes) for o in capture(a, [x], [], ops=True).ops]
    again = [(o.name, o.shapes) for o in capture(a, [x], [], ops=True).ops]
    other = [(o.name, o.shapes) for o in capture(b, [y], [], ops=True).ops]
    assert first == again == other
    block = [o.name for o in capture(Block(), [torch.randn(1, 5, 8)], [], ops=True).ops]
    assert block == [o.name for o in capture(Block(), [torch.randn(1, 5, 8)], [], ops=True).ops]


def test_off_by_default_installs_no_mode() -> None:
    seen: list[int] = []

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(torch._C._len_torch_function_stack())
            return x + 1

    assert capture(Probe(), [torch.ones(2)], []).ops == ()
    capture(Probe(), [torch.ones(2)], [], ops=True)
    assert seen == [0, 1]


def _zoo_and_block() -> list[tuple[str, nn.Module, torch.Tensor]]:
    cases = [(name, build(name), example_input(name)) for name in SAMPLES]
    torch.manual_seed(6)
    return [*cases, ("block", Block().eval(), torch.randn(2, 5, 8))]


@pytest.mark.parametrize("mode", [Mode.GRAD, Mode.NO_GRAD, Mode.INFERENCE])
def test_outputs_are_bit_identical_with_and_without_ops(mode: Mode) -> None:
    for name, model, x in _zoo_and_block():
        plain = capture(model, [x.clone()], [], mode=mode).output
        traced = capture(model, [x.clone()], [], mode=mode, ops=True)
        a = plain if isinstance(plain, dict) else {"": plain}
        b = traced.output if isinstance(traced.output, dict) else {"": traced.output}
        assert a.keys() == b.keys(), name
        for key in a:
            assert torch.equal(a[key].detach(), b[key].detach()), (name, key)
        assert traced.ops, name


class _Long(nn.Module):
    """10,000 compute ops on a 64 KiB tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(128, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        for _ in range(5000):
            x = torch.tanh(x * 1.0001)
        return x


def test_ten_thousand_ops_in_inference_mode_keep_no_tensor() -> None:
    model, x = _Long().eval(), torch.randn(128, 128)
    refs: list[weakref.ref] = []

    class Refs(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                refs.append(weakref.ref(out))
            return out

    gc.collect()
    tracemalloc.start()
    try:
        with Refs():
            result = capture(model, [x], [], mode=Mode.INFERENCE, ops=True, keep_values=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len([c for c in result.captures if c.label.startswith(":")]) == 10_000
    output = result.output
    gc.collect()
    alive = [r() for r in refs if r() is not None]
    assert len(refs) > 10_000 and all(t is output for t in alive)
    assert all(c.values is None for c in result.captures)
    assert peak < 40 * 2**20, peak  # records and statistics only: ~2 KiB per op


class _Cuts(nn.Module):
    """An op result used, one detached and used again, one computed from a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x)
        s = torch.exp(h)  # on the graph
        dead = torch.sin(h)  # requires grad, never used
        t = s.detach() * 2  # mul of a detached value: no graph
        mask = torch.ones(4) * 3  # constant
        return s + t * mask + 0 * dead.sum().detach()


def test_op_verdicts_match_autograd() -> None:
    torch.manual_seed(7)
    model, x = _Cuts(), torch.randn(2, 4)
    out, truth = _independent_live(model, x)
    result = capture(model, [x], [":*"], ops=True)
    verdicts = diagnose(result)
    for name, tensor in truth.items():
        reachable = tensor.requires_grad and (
            torch.autograd.grad(out.sum(), tensor, retain_graph=True, allow_unused=True)[0]
            is not None
        )
        assert verdicts[name].connected is reachable, (name, verdicts[name].summary)
    assert verdicts[":exp#1"].connected and not verdicts[":sin#1"].connected
    assert verdicts[":sin#1"].cause == "unused"
    assert verdicts[":mul#1"].cause == "constant"  # its input carries no graph: not a cut here


def _independent_live(model: nn.Module, x: torch.Tensor) -> tuple[Any, dict[str, torch.Tensor]]:
    recorder = _Recorder(model, live=True)
    try:
        with torch.enable_grad(), recorder:
            out = model(x)
    finally:
        recorder.close()
    counts: dict[str, int] = {}
    names = {}
    for module, func, parts in recorder.seen:
        if module or func in (torch.Tensor.detach, F.linear) or func is torch.Tensor.sum:
            continue
        op = func.__name__.strip("_")
        counts[op] = counts.get(op, 0) + 1
        names[f":{op}#{counts[op]}"] = parts[0]
    return out, names


# --------------------------------------------------------------------------- CLI

ARCH = "tests.test_ops:Seed"


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    path = tmp_path / "seed.pt"
    torch.save(_seed()[0].state_dict(), path)
    return path


def test_cli_dump_inner_ops_writes_pictures(cli: Any, tmp_path: Path, weights: Path) -> None:
    out = tmp_path / "out"
    args = ["dump", weights, "--arch", ARCH, "--shape", "2,4", "--ops", "--layer", "inner:*"]
    code, stdout, stderr = cli(*args, "-o", out)
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    labels = [c["label"] for c in report["captures"]]
    assert labels == ["inner:add#1", "inner:softmax#1", "inner:mul#1", "inner:add#2"]
    for capture_ in report["captures"]:
        assert capture_["layer"] == "inner" and capture_["verdict"]["connected"] is True
        assert capture_["images"] and (out / capture_["images"][0]["file"]).is_file()
    assert "inner:softmax#1" in stdout
    assert [(o["name"], o["kind"]) for o in report["ops"]] == SEED_OPS  # captured or not


def test_cli_layers_lists_ops(cli: Any, weights: Path) -> None:
    code, stdout, stderr = cli("layers", weights, "--arch", ARCH, "--shape", "2,4", "--ops")
    assert code == 0, stderr
    for name, _ in SEED_OPS:
        assert name in stdout
    code, stdout, _ = cli(
        "layers", weights, "--arch", ARCH, "--shape", "2,4", "--ops", "--filter", "inner:*"
    )
    assert "inner:softmax#1" in stdout and "linear_out:linear#1" not in stdout
    code, stdout, _ = cli("layers", weights, "--arch", ARCH, "--shape", "2,4", "--ops", "--json")
    ops = json.loads(stdout)["ops"]
    assert [(o["name"], o["kind"]) for o in ops] == SEED_OPS
    assert ops[2] == {
        "name": "inner:softmax#1",
        "op": "softmax",
        "kind": "compute",
        "module": "inner",
        "call": 1,
        "shapes": [[2, 4]],
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("dump", "--layer", "inner:*"), "add --ops"),
        (("dump", "--ops", "--layer", "inner:nothing*"), "no op matched 'inner:nothing*'"),
    ],
)
def test_cli_bad_op_use_is_one_line(
    cli: Any, weights: Path, tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    extra = ("--shape", "2,4", "-o", str(tmp_path / "o")) if args[0] == "dump" else ()
    code, _, stderr = cli(args[0], weights, "--arch", ARCH, *args[1:], *extra)
    assert code == 2 and message in stderr and "Traceback" not in stderr


def test_layers_ops_without_an_input_synthesizes_one(cli: Any, weights: Path) -> None:
    code, stdout, stderr = cli("layers", weights, "--arch", ARCH, "--ops")
    assert code == 0, stderr
    assert "inner:softmax#1" in stdout and "synthesized from the first layer" in stdout


def test_an_op_glob_on_a_module_without_own_ops_names_its_childrens(
    cli: Any, tmp_path: Path, chdir: Path
) -> None:
    # the bundled sample: inner = Linear then ReLU, no functional op in inner's own forward
    code, _, stderr = cli("dump", "--ops", "--layer", "inner:*", "-o", tmp_path / "o")
    assert code == 2
    assert "fvis: error: no op matched 'inner:*'" in stderr.splitlines()
    assert stderr.splitlines()[-1] == (
        "hint: inner's forward runs no tensor op of its own; its children's ops are named by "
        "them (inner.linear:linear#1, inner.relu:relu#1): try 'inner.*:*'"
    )
    # ground truth for those names: the children's own F.linear / relu calls
    code, _, stderr = cli("dump", "--ops", "--layer", "inner.*:*", "-o", tmp_path / "p")
    assert code == 0, stderr
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert [c["label"] for c in report["captures"]] == [
        "inner.linear:linear#1",
        "inner.relu:relu#1",
    ]


def test_check_gates_see_op_captures(cli: Any, weights: Path) -> None:
    code, stdout, stderr = cli(
        "check", weights, "--arch", ARCH, "--shape", "2,4", "--ops", "--layer", "inner:*"
    )
    assert code == 0, stdout + stderr
    assert "4 captures" in stdout


def test_default_skips_ops_inside_captured_leaves() -> None:
    from fvis.api import DumpOptions, check_module

    model, x = _seed(8)
    result = check_module(model, [x], DumpOptions(ops=True, images=False))
    labels = [c["label"] for c in result.dump.report["captures"]]
    # inner.linear's own F.linear is inner.linear's output: not captured twice
    ops = ["inner:add#1", "inner:softmax#1", "inner:mul#1", "inner:add#2"]
    assert labels == ["inner.linear", *ops, "linear_out"]
    assert result.passed


def test_dump_names_a_detach_after_an_op_as_the_cut() -> None:
    from fvis.api import DumpOptions, check_module

    torch.manual_seed(9)
    options = DumpOptions(ops=True, images=False, layers=(":*",))
    result = check_module(_Cuts(), [torch.randn(2, 4)], options)
    verdicts = {c["label"]: c["verdict"] for c in result.dump.report["captures"]}
    assert verdicts[":exp#1"]["connected"] and verdicts[":add#2"]["connected"]
    assert verdicts[":sin#1"]["cause"] == "cut-downstream"  # the op watch found the detach
    assert "detaches a value computed from it" in verdicts[":sin#1"]["summary"]
    assert {f.layer for f in result.failures} == {":sin#1", ":sum#1"}


@pytest.mark.parametrize("mode", [Mode.GRAD, Mode.NO_GRAD, Mode.INFERENCE])
def test_fused_transformer_fast_path_is_kept(mode: Mode) -> None:
    # Any active function mode makes nn.TransformerEncoderLayer and nn.MultiheadAttention
    # skip their fused kernel (other values, within 1e-6): the op watch steps aside there.
    torch.manual_seed(10)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    attention = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    for model, args in ((encoder, [x]), (attention, [x, x, x])):
        plain = _outputs_of(capture(model, args, [], mode=mode).output)
        traced = _outputs_of(capture(model, args, [], mode=mode, ops=True).output)
        assert torch.equal(plain, traced)
    assert torch._C._len_torch_function_stack() == 0


def test_mode_and_hooks_removed_when_forward_raises_inside_a_fast_path_module() -> None:
    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 1, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x[:, :, :3])[0]  # a bad value shape: raises inside attn

    from fvis.errors import ModelInputError

    with pytest.raises(ModelInputError):
        capture(Boom().eval(), [torch.randn(1, 3, 4)], [], mode=Mode.INFERENCE, ops=True)
    assert torch._C._len_torch_function_stack() == 0
    model, x = _seed(11)
    assert [o.name for o in capture(model, [x], [], ops=True).ops] == [n for n, _ in SEED_OPS]


def _outputs_of(value: Any) -> torch.Tensor:
    return (value[0] if isinstance(value, tuple) else value).detach()
