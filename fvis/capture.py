"""Run the model once with hooks: ``Capture`` records out, hooks always removed, mode restored.

One pair of global module hooks (filtered to this model's modules) does two jobs during the
one forward pass:

- for every call of every module it records a ``CallRecord`` (grad mode, whether inputs,
  parameters and outputs require grad, output shapes, the enclosing call). That tells which
  modules ran, how often, where an autograd cut happened (``fvis.grads``), and which layers
  had run when forward failed;
- for the chosen modules it snapshots every tensor in the output at hook time (statistics, a
  float32 copy of the drawn sample when pictures are wanted, grad facts, ``_version``), so
  later in-place operations cannot change what is reported. The version is compared again at
  the end (grad mode, where the tensor is held) or after each later call while the tensor is
  alive (other modes, where it is held weakly so memory stays flat).

Hooks return ``None``: a forward hook that returns a value would replace the module's output.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from fvis.axes import Axis, channel_axis, decide, find_token_grid, prefix_tokens
from fvis.choices import Mode
from fvis.errors import ModelInputError, first_line, torchscript_refused
from fvis.outputs import describe_value, flatten_tensors
from fvis.stats import Stats, tensor_stats


@dataclass(frozen=True, slots=True)
class GradFacts:
    """Autograd state of one captured tensor, recorded at hook time."""

    grad_enabled: bool
    inference_mode: bool
    requires_grad: bool
    grad_fn: str | None
    is_leaf: bool
    is_inference: bool
    version: int | None  # None for inference tensors (they have no version counter)
    version_after: int | None = None  # at the end of forward, if the tensor was still alive
    grad_fn_after: str | None = None

    @property
    def modified_in_place(self) -> bool:
        return (
            self.version is not None
            and self.version_after is not None
            and self.version_after != self.version
        )


@dataclass(frozen=True, slots=True)
class Capture:
    """One tensor from one call of one module.

    ``values`` is a float32 copy of the shown sample (or the whole tensor if it has no batch
    dimension) taken at hook time; it is ``None`` once a streaming consumer dropped it.
    """

    layer: str
    call: int
    path: str  # "" for a plain tensor output, "[0]" or ".logits" inside containers
    shape: tuple[int, ...]
    dtype: str
    device: str
    grad: GradFacts
    stats: Stats
    values: np.ndarray | None = field(default=None, repr=False, compare=False)
    calls_total: int = 1
    batch: int | None = None  # which forward pass, when inputs ran in several batches
    call_id: int = -1  # links to the CallRecord of the call that produced it
    # (prefix tokens, grid height, grid width) for (N, T, D) ViT tokens made from a patch grid
    token_grid: tuple[int, int, int] | None = None

    @property
    def label(self) -> str:
        """``inner.relu``, ``relu#2`` for the second call of a shared module, plus the path;
        ``@batch1`` when the inputs ran in several batches."""
        call = f"#{self.call}" if self.calls_total > 1 else ""
        batch = f"@batch{self.batch}" if self.batch is not None else ""
        return f"{self.layer}{call}{self.path}{batch}"


class CallRecord(NamedTuple):
    """One call of any module of the model (the trace).

    Immutable like the dataclasses around it, but a ``NamedTuple``: one is built per module
    call inside the hook, about 5x faster than a frozen dataclass."""

    name: str
    class_name: str
    call: int
    grad_enabled: bool
    inference_mode: bool
    inputs_require_grad: bool
    params_require_grad: bool  # any parameter of the module or its children
    outputs_require_grad: bool
    has_float_output: bool
    output_shapes: tuple[tuple[int, ...], ...]
    call_id: int = -1  # order in which calls started
    parent_id: int | None = None  # the call this one ran inside (None for the outermost)
    constant: bool = False  # output unchanged when its inputs' values change (see _is_constant)
    has_params: bool = False  # the module holds parameters of its own (trainable or not)

    @property
    def is_cut(self) -> bool:
        """Grad on, inputs or parameters required grad, floating outputs did not, and the
        output depends on the input values (an anchor generator reads only shapes)."""
        return (
            self.grad_enabled
            and not self.inference_mode
            and self.has_float_output
            and (self.inputs_require_grad or self.params_require_grad)
            and not self.outputs_require_grad
            and not self.constant
        )

    @property
    def is_no_grad_inside(self) -> bool:
        """Ran with grad off although its inputs or parameters required grad."""
        return (
            not self.grad_enabled
            and self.has_float_output
            and (self.inputs_require_grad or self.params_require_grad)
        )


@dataclass(frozen=True)
class Detach:
    """A ``.detach()`` / ``.data`` / ``torch.detach`` of a tensor that required grad, seen
    during forward: the innermost module call under way and the detached tensor's edge."""

    call_id: int
    edge: tuple[Any, int] = field(repr=False, compare=False)


@dataclass(frozen=True)
class NotCalled:
    """A requested module whose ``__call__`` never happened, and what can be said of it."""

    name: str
    class_name: str
    container: bool  # no forward of its own (ModuleList, ModuleDict): it can never be called
    params: tuple[torch.Tensor, ...] = field(repr=False, compare=False)  # trainable ones
    exported: bool = False  # a module of an unflattened torch.export program
    has_params: bool = False  # any parameter at all, trainable or frozen


@dataclass(frozen=True)
class CaptureResult:
    """Everything one forward pass produced."""

    captures: tuple[Capture, ...]
    trace: tuple[CallRecord, ...]
    never_ran: tuple[str, ...]  # requested layers whose __call__ never happened
    output: Any = field(repr=False, compare=False)  # the model's output (graph alive in grad mode)
    edges: Mapping[tuple[str, int, str], tuple[Any, int]] = field(
        default_factory=dict, repr=False, compare=False
    )  # capture key -> (grad node, output_nr)
    mode: Mode = Mode.GRAD
    cut_inputs: Mapping[int, tuple[tuple[Any, int], ...]] = field(
        default_factory=dict, repr=False, compare=False
    )  # call_id of a cut -> gradient edges of its inputs that required grad
    fed_by_cut: Mapping[int, int] = field(default_factory=dict, repr=False, compare=False)
    # call_id -> call_id of the cut whose (detached) output reached this call's inputs
    output_notes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # captured layer -> what its output held that could not be captured (no tensor, an
    # object that could not be followed)
    detaches: tuple[Detach, ...] = field(default=(), repr=False, compare=False)
    not_called: Mapping[str, NotCalled] = field(default_factory=dict, repr=False, compare=False)
    classes: Mapping[str, type] = field(default_factory=dict, repr=False, compare=False)
    # dotted name -> the module's class (to find the source of a cut)
    in_place_ops: bool = False  # an in-place op ran during forward (grad mode only)


class _Held:
    """A strong reference with the call shape of ``weakref.ref``."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def __call__(self) -> torch.Tensor:
        return self.tensor


class _Live:
    """A capture being recorded: what the hook saw, plus a reference to its tensor (strong in
    grad mode, weak otherwise) to compare ``_version`` later. A plain slotted class: one is
    made per captured tensor inside the hook, and the frozen ``Capture`` only once at the end."""

    __slots__ = (
        "call",
        "call_id",
        "facts",
        "key",
        "last_grad_fn",
        "last_version",
        "layer",
        "path",
        "ref",
        "seq",
        "stats",
        "tensor_info",
        "token_grid",
        "values",
    )

    def __init__(
        self,
        key: int,
        layer: str,
        call: int,
        path: str,
        tensor_info: tuple[tuple[int, ...], str, str],
        facts: _RawFacts,
        stats: Stats,
        values: np.ndarray | None,
        call_id: int,
        ref: Callable[[], torch.Tensor | None] | None,
        seq: int,
    ) -> None:
        self.key, self.layer, self.call, self.path = key, layer, call, path
        self.tensor_info, self.facts, self.stats, self.values = tensor_info, facts, stats, values
        self.call_id, self.ref, self.seq = call_id, ref, seq
        self.token_grid: tuple[int, int, int] | None = None
        self.last_grad_fn, self.last_version = facts[3], facts[6]

    def capture(self, batch: int | None, calls_total: int = 1, final: bool = False) -> Capture:
        after = (self.last_version, self.last_grad_fn) if final else (None, None)
        facts = GradFacts(*self.facts, *after)
        shape, dtype, device = self.tensor_info
        return Capture(
            self.layer,
            self.call,
            self.path,
            shape,
            dtype,
            device,
            facts,
            self.stats,
            self.values,
            calls_total,
            batch,
            self.call_id,
            self.token_grid,
        )


def capture(
    model: nn.Module,
    inputs: Sequence[Any] | Mapping[str, Any],
    layers: Sequence[str],
    *,
    mode: Mode = Mode.GRAD,
    train: bool = False,
    sample: int | None = 0,
    keep_values: bool = True,
    on_capture: Callable[[Capture], None] | None = None,
    batch: int | None = None,
    callback_values: bool = True,
    kwargs: Mapping[str, Any] | None = None,
) -> CaptureResult:
    """Run ``model`` once and capture the outputs of the dotted ``layers``.

    >>> result = capture(model, [x], ["inner.relu"])          # doctest: +SKIP
    >>> [c.label for c in result.captures]
    ['inner.relu']

    ``inputs`` are positional (a sequence) or keyword (a mapping); ``kwargs`` adds keyword
    inputs to positional ones: ``capture(model, [ids], layers, kwargs={"mask": mask})``.

    ``sample`` picks the batch element whose values are kept for pictures (``None``: all).
    ``on_capture`` sees each capture as soon as its call returns (for streaming rendering:
    ``calls_total`` and the in-place facts are not known yet at that moment); with
    ``callback_values=False`` it gets no values (a progress display needs none: no copy).
    """
    _refuse_script(model, layers)
    tree = _walk(model)
    targets = _targets(tree, layers)
    session = _Session(
        tree.names,
        targets,
        sample,
        keep_values,
        on_capture,
        batch,
        hold=mode is Mode.GRAD,
        callback_values=callback_values,
        by_name=tree.by_name,
    )
    with train_mode(model, train, tree), ExitStack() as stack:
        stack.enter_context(_grad_context(mode))
        session.install(model, stack)
        if mode is Mode.GRAD:  # only a graph can be cut; the watch costs ~10 us per op
            stack.enter_context(_DetachWatch(session))
        output = _run(model, inputs, kwargs or {}, session)
        session.finish()
    exported = type(model).__name__ == "UnflattenedModule"
    return session.result(output, mode, exported, tree)


@contextmanager
def train_mode(model: nn.Module, train: bool, tree: _Tree | None = None) -> Iterator[None]:
    """``model.train(train)`` inside, every module's own flag restored after.

    Restored per module, and only where a flag changed (Module.__setattr__ is slow):
    model.train(x) would flip a frozen BatchNorm a user had put in eval, and a forward may
    flip flags. Wrap the backward pass too: activation checkpointing recomputes the forward
    then, and must see the same modes (``fvis.api`` does).
    """
    modules = (tree or _walk(model)).modules.values()
    modes = {module: module.training for module in modules}
    if _needs_train_call(modes, train):
        model.train(train)
    try:
        yield
    finally:
        for module, training in modes.items():
            if module.training != training:
                module.training = training


def _refuse_script(model: nn.Module, layers: Sequence[str]) -> None:
    """A ScriptModule never calls Python hooks: every layer would be reported "never ran"."""
    if isinstance(model, torch.jit.ScriptModule):
        raise torchscript_refused(f"the model ({type(model).__name__})")
    for layer in layers:
        parts = layer.split(".") if layer else []
        module: nn.Module | None = model
        for depth, part in enumerate(parts):
            module = getattr(module, "_modules", {}).get(part)
            if isinstance(module, torch.jit.ScriptModule):
                raise torchscript_refused(f"layer {'.'.join(parts[: depth + 1])!r}")


@dataclass(frozen=True)
class _Tree:
    names: dict[int, list[str]]  # id -> every dotted name (shared modules have several)
    modules: dict[int, nn.Module]  # id -> module
    by_name: dict[str, nn.Module]


def _needs_train_call(modes: Mapping[nn.Module, bool], train: bool) -> bool:
    """``model.train(train)`` walks and sets every module; skip it when every flag already
    matches, unless a module overrides ``train`` (models that keep BatchNorm frozen in
    training do it there)."""
    return any(
        training != train or type(module).train is not nn.Module.train
        for module, training in modes.items()
    )


def _walk(model: nn.Module) -> _Tree:
    """Every module and every dotted name, walking ``_modules`` so shared modules keep all."""
    names: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    by_name: dict[str, nn.Module] = {}
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        prefix, module = stack.pop()
        by_name[prefix] = module
        seen = id(module) in names
        names.setdefault(id(module), []).append(prefix)
        if seen:
            continue
        modules[id(module)] = module
        children = [
            (f"{prefix}.{n}" if prefix else n, m)
            for n, m in module._modules.items()
            if m is not None
        ]
        stack.extend(reversed(children))
    return _Tree(names, modules, by_name)


def _targets(tree: _Tree, layers: Sequence[str]) -> dict[int, tuple[str, nn.Module]]:
    targets: dict[int, tuple[str, nn.Module]] = {}
    for layer in layers:
        module = tree.by_name.get(layer)
        if module is None:
            raise ModelInputError(f"no layer {layer!r} in the loaded model")
        targets.setdefault(id(module), (layer, module))
    return targets


@contextmanager
def _grad_context(mode: Mode) -> Iterator[None]:
    if mode is Mode.INFERENCE:
        with torch.inference_mode():
            yield
    elif mode is Mode.NO_GRAD:
        with torch.no_grad():
            yield
    else:
        with torch.enable_grad():
            yield


def _run(
    model: nn.Module,
    inputs: Sequence[Any] | Mapping[str, Any],
    kwargs: Mapping[str, Any],
    session: _Session,
) -> Any:
    if isinstance(inputs, Mapping):
        inputs, kwargs = (), {**inputs, **kwargs}
    try:
        return model(*inputs, **kwargs)
    except Exception as exc:
        first = first_line(exc)
        failed_in = session.stack[-1].name if session.stack else ""  # innermost unfinished
        where = f" in {failed_in!r}" if failed_in else " in the model's own forward"
        ran = session.ran_summary()
        raise ModelInputError(
            f"forward failed{where}: {type(exc).__name__}: {first[:300]}",
            hint=f"layers that ran before the failure: {ran}"
            if ran
            else "no layer ran: check the input shape against the first layer",
        ) from exc


class _Session:
    """State of one capture run: hook callbacks and what they recorded."""

    def __init__(
        self,
        names: dict[int, list[str]],
        targets: dict[int, tuple[str, nn.Module]],
        sample: int | None,
        keep_values: bool,
        on_capture: Callable[[Capture], None] | None,
        batch: int | None = None,
        hold: bool = False,
        callback_values: bool = True,
        by_name: Mapping[str, nn.Module] | None = None,
    ) -> None:
        self.by_name = by_name or {}
        self.callback_values = on_capture is not None and callback_values
        self.batch = batch
        # Grad mode: the graph keeps most captured tensors alive anyway, so hold them and
        # compare versions once at the end. Otherwise hold them weakly (memory stays flat) and
        # compare after every module call, while each is still alive: a later in-place op is
        # seen even when the tensor is freed before forward ends.
        self.hold = hold
        self.names = names
        self.targets = targets
        self.sample = sample
        self.keep_values = keep_values
        self.on_capture = on_capture
        self.calls: dict[int, int] = {}
        self.trace: list[CallRecord] = []
        self.live: list[_Live] = []
        self.done: list[_Live] = []
        self.edges: dict[tuple[str, int, str], tuple[Any, int]] = {}
        self.stack: list[_Frame] = []  # calls under way, outermost first
        self.params_grad: dict[int, bool] = {}  # module -> any parameter in it requires grad
        self.next_call_id = 0
        self.cut_inputs: dict[int, tuple[tuple[Any, int], ...]] = {}
        self.cut_outputs: dict[int, int] = {}  # storage pointer -> call_id of the cut
        self.fed_by_cut: dict[int, int] = {}
        self.notes: dict[str, list[str]] = {}  # layer -> what its output held that was not kept
        self.all_names = {name for aliases in names.values() for name in aliases}
        self.grids: dict[tuple[int, ...], tuple[int, int, int] | None] = {}
        self.detaches: list[Detach] = []
        self.replaying = False  # re-running a module to test whether its output is constant
        self.in_hook = False
        self.in_place_ops = False

    def install(self, model: nn.Module, stack: ExitStack) -> None:
        # One pair of global hooks (filtered to this model's modules) instead of a pair per
        # module: installing per-module hooks cost ~0.2 ms on a ResNet-18, these ~3 us.
        hooks = torch.nn.modules.module
        stack.enter_context(hooks.register_module_forward_pre_hook(self._pre))
        stack.enter_context(hooks.register_module_forward_hook(self._post, with_kwargs=True))

    def _pre(self, module: nn.Module, _args: Any) -> None:
        names = self.names.get(id(module))
        if names is None or self.replaying:  # a module of another model, or a re-run
            return
        parent = self.stack[-1].call_id if self.stack else None
        grad_off = not torch.is_grad_enabled()
        self.stack.append(_Frame(id(module), names[0], self.next_call_id, parent, grad_off))
        self.next_call_id += 1

    def _pop(self, key: int) -> _Frame:
        # Frames above ours belong to calls that raised and were caught by their parent.
        stack = self.stack
        while stack and stack[-1].module_id != key:
            stack.pop()
        return stack.pop() if stack else _Frame(key, self.names[key][0], -1, None)

    def _post(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if id(module) not in self.names or self.replaying:
            return
        self.in_hook = True  # our own .detach() calls (snapshots) are not the model's
        try:
            self._record(module, args, kwargs, output)
        finally:
            self.in_hook = False

    def _record(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        key = id(module)
        frame = self._pop(key)
        call = self.calls[key] = self.calls.get(key, 0) + 1
        inputs = (args, kwargs) if kwargs else args
        params_grad = self._params_grad(module)
        record = _call_record(
            frame,
            type(module).__qualname__,
            call,
            params_grad,
            inputs,
            output,
            bool(module._parameters),
        )
        if record.is_cut and not params_grad and self._is_constant(module, args, kwargs, output):
            record = record._replace(constant=True)
        self.trace.append(record)
        if self.cut_outputs or record.is_cut or record.is_no_grad_inside:  # nearly always none
            self._follow_cuts(record, inputs, output)
        if not self.hold:
            self._check_versions()
        target = self.targets.get(key)
        if target is None:
            return
        if isinstance(output, torch.Tensor):  # the usual case, without the generator
            self._snapshot(key, target[0], record, "", output)
            return
        self._snapshot_parts(key, target[0], record, output)

    def _snapshot_parts(self, key: int, layer: str, record: CallRecord, output: Any) -> None:
        """Every tensor inside a container or object output, and a note on what was not."""
        notes: list[str] = []
        parts = list(flatten_tensors(output, notes=notes))
        # `head.loc` would read as the child module `head.loc`: write `head->loc` (and so
        # every attribute of that output, for one notation per output).
        clash = any(self._clashes(layer, path) for path, _ in parts)
        for path, tensor in parts:
            if clash and path.startswith("."):
                path = "->" + path[1:]
            self._snapshot(key, layer, record, path, tensor)
        if not parts:
            notes.append(f"returned {describe_value(output)}: no tensor to capture")
        for note in notes:
            self.notes.setdefault(layer, [])
            if note not in self.notes[layer]:
                self.notes[layer].append(note)

    def _clashes(self, layer: str, path: str) -> bool:
        """Whether ``layer`` + an attribute path starts like the name of a module."""
        if not path.startswith("."):
            return False
        first = path[1:].split(".", 1)[0].split("[", 1)[0]
        return f"{layer}.{first}" in self.all_names

    def _params_grad(self, module: nn.Module) -> bool:
        """Whether any parameter of ``module`` or its children requires grad, memoized per
        module (``module.parameters()`` would walk the subtree again for every container)."""
        key = id(module)
        known = self.params_grad.get(key)
        if known is None:
            self.params_grad[key] = False  # a module that contains itself stops here
            known = any(
                p is not None and p.requires_grad for p in module._parameters.values()
            ) or any(self._params_grad(c) for c in module._modules.values() if c is not None)
            self.params_grad[key] = known
        return known

    def _follow_cuts(self, record: CallRecord, args: Any, output: Any) -> None:
        """Remember where detached values came from, so a later layer fed by one is blamed on
        the cut and not called frozen. Only module boundaries are seen: a functional op between
        a cut and a layer hides the link."""
        if record.is_cut:
            edges = (gradient_edge(t) for _, t in flatten_tensors(args) if t.requires_grad)
            self.cut_inputs[record.call_id] = tuple(e for e in edges if e is not None)
            origin = record.call_id
        elif record.is_no_grad_inside and self._parent_grad_on():
            origin = record.call_id  # the outermost call of a no_grad block in its parent
        elif self.cut_outputs and not record.outputs_require_grad:
            origin = next(
                (self.cut_outputs[p] for p in _storages(args) if p in self.cut_outputs), -1
            )
            if origin < 0:
                return
            self.fed_by_cut[record.call_id] = origin
        else:
            return
        for pointer in _storages(output):
            self.cut_outputs[pointer] = origin

    def _parent_grad_on(self) -> bool:
        # The parent's call is under way (its frame is on the stack): its grad mode now is the
        # one around this call, unless the parent itself runs inside a no_grad block.
        return bool(self.stack) and not self.stack[-1].grad_off

    def _is_constant(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> bool:
        """Whether a parameter-free module returns the same output for other input values:
        then its output is computed from shapes or positions (anchors, rotary tables), not a
        cut. Re-runs the module once, under no_grad, on random inputs of the same shapes."""
        self.replaying = True
        try:
            with torch.no_grad():
                again = module(*_perturbed(args), **_perturbed(kwargs or {}))
        except Exception:  # the module needs its real values: not constant
            return False
        finally:
            self.replaying = False
        return _same_tensors(output, again)

    def on_detach(self, tensor: Any) -> None:
        if self.in_hook or not isinstance(tensor, torch.Tensor) or not tensor.requires_grad:
            return
        edge = gradient_edge(tensor)
        if edge is not None and self.stack:
            self.detaches.append(Detach(self.stack[-1].call_id, edge))

    def _snapshot(
        self, key: int, layer: str, record: CallRecord, path: str, tensor: torch.Tensor
    ) -> None:
        call, call_id = record.call, record.call_id
        facts = _grad_facts(tensor, record)
        values = (
            sample_values(tensor, self.sample) if self.keep_values or self.callback_values else None
        )
        if tensor.requires_grad and record.grad_enabled:
            edge = gradient_edge(tensor)
            if edge is not None:
                self.edges[(layer, call, path)] = edge
        ref: Callable[[], torch.Tensor | None] | None = None
        if not tensor.is_inference():
            ref = _Held(tensor) if self.hold else weakref.ref(tensor)
        device = "cpu" if tensor.is_cpu else _device(tensor.device)
        info = (tuple(tensor.shape), _dtype(tensor.dtype), device)
        seq = len(self.live) + len(self.done)
        axis = self._axis(key, record, info[0]).dim if tensor.dim() >= 3 else 1
        stats = tensor_stats(tensor, axis)
        item = _Live(key, layer, call, path, info, facts, stats, values, call_id, ref, seq)
        if tensor.dim() == 3 and axis == 2:
            item.token_grid = self._token_grid(record, info[0])
        if self.on_capture is not None:
            self.on_capture(item.capture(self.batch))
        if not self.keep_values:
            item.values = None
        self.live.append(item)

    def _axis(self, key: int, record: CallRecord, shape: tuple[int, ...]) -> Axis:
        """The channel dim of this output (``fvis.axes``), from its module or its producer."""

        def producer() -> Axis | None:
            # Calls that finished before this one started, newest first, with this shape.
            checked = 0
            for earlier in reversed(self.trace):
                if earlier.call_id >= record.call_id or shape not in earlier.output_shapes:
                    continue
                module = self.by_name.get(earlier.name)
                found = decide(module, shape) if module is not None else None
                checked += 1
                if found is not None:
                    return Axis(found.dim, f"{found.reason} (in {earlier.name or 'the model'})")
                if checked >= 16:
                    break
            return None

        return channel_axis(self.targets[key][1], shape, producer)

    def _token_grid(
        self, record: CallRecord, shape: tuple[int, ...]
    ) -> tuple[int, int, int] | None:
        """Where ``(N, T, D)`` tokens came from a ``(N, D, H, W)`` patch embedding that ran
        earlier, with ``T = prefix + H * W`` and the prefix (class, distillation, register)
        tokens found as parameters of the model: ``(prefix, H, W)``; else None."""
        key = shape
        if key not in self.grids:
            self.grids[key] = find_token_grid(self.trace, record.call_id, shape, self.prefix(shape))
        return self.grids[key]

    def prefix(self, shape: tuple[int, ...]) -> int:
        root = self.by_name.get("")
        return prefix_tokens(root, shape[-1]) if root is not None else 0

    def _check_versions(self) -> None:
        # Called after every module call: an in-place op by a later module (ReLU(inplace=True))
        # is seen while the tensor is still alive, even if it is freed before forward ends.
        still: list[_Live] = []
        for item in self.live:
            tensor = item.ref() if item.ref is not None else None
            if tensor is None:
                self.done.append(item)
                continue
            version = tensor._version
            if version != item.last_version:  # the rare case: only then name the new grad_fn
                item.last_version = version
                item.last_grad_fn = _grad_fn_name(tensor)
            still.append(item)
        self.live = still

    def finish(self) -> None:
        self._check_versions()
        self.done.extend(self.live)
        self.live = []

    def ran_summary(self, limit: int = 5) -> str:
        names = list(dict.fromkeys(r.name for r in self.trace if r.name))
        shown = ", ".join(names[-limit:])
        return (f"... {shown}" if len(names) > limit else shown) + (
            f" ({len(names)} in all)" if len(names) > limit else ""
        )

    def result(self, output: Any, mode: Mode, exported: bool, tree: _Tree) -> CaptureResult:
        captures = tuple(
            item.capture(self.batch, self.calls.get(item.key, 1), final=True)
            for item in sorted(self.done, key=lambda it: it.seq)
        )
        not_called = {
            name: _not_called(name, module, exported)
            for key, (name, module) in self.targets.items()
            if key not in self.calls
        }
        # A container (ModuleList, ModuleDict) has no forward: it can never run, so it never
        # "never ran"; its items are what runs.
        never = tuple(name for name, info in not_called.items() if not info.container)
        classes = {names[0]: type(tree.modules[key]) for key, names in self.names.items()}
        return CaptureResult(
            captures,
            tuple(self.trace),
            never,
            output,
            self.edges,
            mode,
            self.cut_inputs,
            self.fed_by_cut,
            {layer: tuple(notes) for layer, notes in self.notes.items()},
            tuple(self.detaches),
            not_called,
            classes,
            self.in_place_ops,
        )


class _Frame(NamedTuple):
    """A module call under way (a NamedTuple: one is made per module call)."""

    module_id: int
    name: str
    call_id: int
    parent_id: int | None
    grad_off: bool = False  # grad mode was off when the call started


class _DetachWatch(TorchFunctionMode):
    """Sees every ``.detach()`` / ``.data`` during forward (hooks see only module
    boundaries), so a value detached inside a parent's forward is not called unused."""

    def __init__(self, session: _Session) -> None:
        super().__init__()
        self.session = session

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in _DETACHING and args:
            self.session.on_detach(args[0])
        elif (kwargs and kwargs.get("inplace")) or getattr(func, "__name__", "").endswith("_"):
            self.session.in_place_ops = True  # then a saved tensor may have changed
        return func(*args, **(kwargs or {}))


_DETACHING = frozenset(
    {torch.Tensor.detach, torch.detach, torch.Tensor.data.__get__, torch.Tensor.detach_}
)


def _not_called(name: str, module: nn.Module, exported: bool) -> NotCalled:
    container = type(module).forward is nn.Module.forward  # ModuleList, ModuleDict
    every = list(module.parameters())
    params = tuple(p for p in every if p.requires_grad)
    return NotCalled(name, type(module).__qualname__, container, params, exported, bool(every))


def _perturbed(value: Any) -> Any:
    """``value`` with every floating tensor (in tuples, lists, dicts) replaced by random values
    of the same shape, dtype and device; a fixed seed keeps runs repeatable."""
    if isinstance(value, torch.Tensor):
        if not (value.is_floating_point() or value.is_complex()) or value.device.type == "meta":
            return value
        generator = torch.Generator(device=value.device).manual_seed(1234)
        scale = float(value.detach().abs().max()) + 1.0 if value.numel() else 1.0
        noise = torch.randn(value.shape, generator=generator, device=value.device)
        return (noise * scale).to(value.dtype)
    if type(value) in (tuple, list):
        return type(value)(_perturbed(v) for v in value)
    if isinstance(value, dict):
        return {k: _perturbed(v) for k, v in value.items()}
    return value


def _same_tensors(first: Any, second: Any) -> bool:
    a, b = _tensors(first), _tensors(second)
    return (
        bool(a)
        and len(a) == len(b)
        and all(
            x.shape == y.shape and x.dtype == y.dtype and torch.equal(x.detach(), y.detach())
            for x, y in zip(a, b, strict=True)
        )
    )


def _call_record(
    frame: _Frame,
    class_name: str,
    call: int,
    params_grad: bool,
    args: Any,
    output: Any,
    has_params: bool = False,
) -> CallRecord:
    if isinstance(output, torch.Tensor):  # the usual case, without building lists
        floating = output.is_floating_point() or output.is_complex()
        outputs_require_grad = floating and output.requires_grad
        output_shapes: tuple[tuple[int, ...], ...] = (tuple(output.shape),)
    else:
        outputs = _tensors(output)
        floats = [t for t in outputs if t.is_floating_point() or t.is_complex()]
        floating = bool(floats)
        outputs_require_grad = any(t.requires_grad for t in floats)
        output_shapes = tuple(tuple(t.shape) for t in outputs)
    return CallRecord(
        frame.name,
        class_name,
        call,
        torch.is_grad_enabled(),
        torch.is_inference_mode_enabled(),
        _any_requires_grad(args),
        params_grad,
        outputs_require_grad,
        floating,
        output_shapes,
        frame.call_id,
        frame.parent_id,
        has_params=has_params,
    )


def _any_requires_grad(args: Any) -> bool:
    if type(args) is tuple and len(args) == 1 and isinstance(args[0], torch.Tensor):
        return args[0].requires_grad  # the usual call: one tensor in
    return any(t.requires_grad for t in _tensors(args))


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors in a call's arguments or output, without building path names (hot path)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if type(value) is tuple and all(isinstance(v, torch.Tensor) for v in value):
        return list(value)
    return [t for _, t in flatten_tensors(value)]


def gradient_edge(tensor: torch.Tensor) -> tuple[Any, int] | None:
    """The autograd edge a gradient would flow into, or None where there is none to follow."""
    node = tensor.grad_fn
    if node is not None:  # what get_gradient_edge returns, without its cost (a hot path)
        return (node, tensor.output_nr)
    try:  # a leaf: its AccumulateGrad node
        edge = torch.autograd.graph.get_gradient_edge(tensor)
    except (RuntimeError, AssertionError, AttributeError):
        # requires_grad without grad_fn and not a leaf that autograd can reach: a view of a
        # parameter made under no_grad, or a parameter returned as is in inference mode
        return None
    return (edge.node, edge.output_nr)


def _storages(value: Any) -> list[int]:
    """Storage addresses of the floating tensors in ``value`` (views share their base's)."""
    pointers = []
    for _, tensor in flatten_tensors(value):
        if tensor.is_floating_point() and tensor.device.type != "meta":
            pointer = tensor.untyped_storage().data_ptr()
            if pointer:
                pointers.append(pointer)
    return pointers


# GradFacts' first seven fields, read in the hook; the dataclass is built once, at the end.
_RawFacts = tuple[bool, bool, bool, str | None, bool, bool, int | None]


def _grad_facts(tensor: torch.Tensor, record: CallRecord) -> _RawFacts:
    inference = tensor.is_inference()
    node = tensor.grad_fn
    return (
        record.grad_enabled,  # the grad mode of the call that returned the tensor
        record.inference_mode,
        tensor.requires_grad,
        node.name() if node is not None else None,
        tensor.is_leaf,
        inference,
        None if inference else tensor._version,
    )


def _grad_fn_name(tensor: torch.Tensor) -> str | None:
    return tensor.grad_fn.name() if tensor.grad_fn is not None else None


@functools.cache
def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@functools.cache
def _device(device: torch.device) -> str:
    return str(device)


def sample_values(tensor: torch.Tensor, sample: int | None) -> np.ndarray:
    """A float32 numpy copy of one batch element (dim 0), or of everything."""
    with torch.no_grad():
        data = tensor.detach()
        if sample is not None and data.dim() >= 2:
            data = data[min(sample, data.shape[0] - 1)]
        if data.is_complex():
            data = data.abs()
        return data.to("cpu", torch.float32, copy=True).numpy()
