"""The hook session of one capture: what the module hooks record during forward.

``_Session`` holds the hook callbacks and their state (the trace of ``CallRecord`` s, the
captures being recorded as ``fvis.records._Live`` items, gradient edges, where cuts fed
later calls); the C hooks (``fvis.fasthooks``) do its usual calls. The records come from
``fvis.call_records``, the channel axis and token grid of a capture from
``fvis.session_axes``, the version check and the final ``CaptureResult`` from
``fvis.session_end``, and ``fvis.cuts.DetachWatch`` sees every ``.detach()`` during forward.
``fvis.capture`` runs the model inside one session.
"""

from __future__ import annotations

import os
import sys
import weakref
from collections.abc import Callable, Collection, Mapping
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from fvis import device_stats
from fvis.attention import missing_probabilities
from fvis.axes import Axis
from fvis.call_records import call_record
from fvis.choices import What
from fvis.cuts import SET_GRAD_ENABLED, block_entry, cut_record, grad_entry
from fvis.device_stats import (
    DEFERRED_DEVICES,
    HostCopies,
    reduce_on_device,
    sample_on_device,
    stats_from,
)
from fvis.fasthooks import Base, hooks, native_session, wrap_forwards
from fvis.outputs import describe_value, flatten_tensors
from fvis.records import (
    CallRecord,
    Capture,
    Detach,
    _Frame,
    _Live,
)
from fvis.session_axes import AxisDecisions
from fvis.session_end import SessionEnd
from fvis.stats import _channel_dim as channel_dim
from fvis.stats import tensor_stats
from fvis.tensor_facts import (
    _device,
    _dtype,
    _storages,
    gradient_edge,
    perturbed,
    same_tensors,
    sample_values,
)


class _Session(AxisDecisions, SessionEnd, Base):  # type: ignore[misc]  # fvis.fasthooks: a C type, or object
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
        keep_tensors: bool = False,
        what: str = "output",
    ) -> None:
        self.by_name = by_name or {}
        self.keep_tensors = keep_tensors
        self.want_inputs = what in (What.INPUT, What.BOTH)
        self.want_outputs = what in (What.OUTPUT, What.BOTH)
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
        # every dotted name: the walk's by_name holds each one already
        every = by_name or {name for aliases in names.values() for name in aliases}
        self.all_names: Collection[str] = every
        self.grids: dict[tuple[int, ...], tuple[int, int, int] | None] = {}
        self.detaches: list[Detach] = []
        self.replaying = False  # re-running a module to test whether its output is constant
        self.in_hook = False
        self.in_place_ops = False
        self.checkpointed: set[int] = set()
        self.grad_entry: Detach | None = None  # the no_grad block under way, if the watch saw it
        self.grad_off_blocks: dict[int, Detach] = {}
        self.decided: dict[tuple[int, tuple[int, ...]], Axis | None] = {}
        self.host = HostCopies()  # captures on accelerators, read back at the end (once)
        self.defer_cpu = device_stats.DEFER_ON_CPU  # the accelerator path, run on the CPU
        self.native = False  # the C hooks run this session (fvis.fasthooks), set at install

    def install(
        self, model: nn.Module, stack: ExitStack, modules: Collection[nn.Module] = ()
    ) -> None:
        """The hooks for ``model`` (whose every module is in ``modules``) until ``stack``
        closes: the C hooks around each forward where they can be (fvis.fasthooks), else one
        pair of global hooks, filtered to this model's modules (installing per-module hooks
        cost ~0.2 ms on a ResNet-18, these ~3 us)."""
        self.native = native_session(self)
        if self.native and modules and wrap_forwards(self, modules, stack):
            return
        pre, post = hooks(self)
        module = torch.nn.modules.module
        stack.enter_context(module.register_module_forward_pre_hook(pre))
        stack.enter_context(module.register_module_forward_hook(post, with_kwargs=True))

    def _pre(self, module: nn.Module, args: Any) -> None:
        names = self.names.get(id(module))
        if names is None or self.replaying:  # a module of another model, or a re-run
            return
        parent = self.stack[-1].call_id if self.stack else None
        grad_off = not torch.is_grad_enabled()
        if grad_off and self.hold:  # rare in grad mode: a no_grad block, or a checkpoint
            self._note_checkpoint(parent)
            if parent is not None and not self.stack[-1].grad_off:  # a block's first call
                self.grad_off_blocks[self.next_call_id] = block_entry(self.grad_entry, parent)
        self.stack.append(_Frame(id(module), names[0], self.next_call_id, parent, grad_off))
        self.next_call_id += 1
        if self.want_inputs and id(module) in self.targets:
            self.in_hook = True  # our own .detach() calls (snapshots) are not the model's
            try:
                self._snapshot_inputs(module, args)
            finally:
                self.in_hook = False

    def _snapshot_inputs(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """The call's positional tensor inputs as the module receives them, before it runs
        (so an in-place op inside the module cannot change them): ``layer:input``,
        ``layer:input[1]``, ... Keyword arguments are not visible to a global pre-hook."""
        key = id(module)
        frame = self.stack[-1]
        record = CallRecord(
            frame.name,
            type(module).__qualname__,
            self.calls.get(key, 0) + 1,  # the number _record gives this call when it returns
            torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(),
            False,
            False,
            False,
            False,
            (),
            frame.call_id,
            frame.parent_id,
        )
        layer = self.targets[key][0]
        parts = list(flatten_tensors(args[0] if len(args) == 1 else args))
        for path, tensor in parts:
            self._snapshot(key, layer, record, ":input" + path, tensor)
        if not parts:
            self._add_note(layer, "input: no positional tensor (keyword inputs are not captured)")

    def _add_note(self, layer: str, note: str) -> None:
        known = self.notes.setdefault(layer, [])
        if note not in known:
            known.append(note)

    def _note_checkpoint(self, parent: int | None) -> None:
        """A reentrant ``torch.utils.checkpoint`` runs its first forward under no_grad by design
        (backward recomputes it with grad): remember the calls made inside one."""
        if parent in self.checkpointed or _inside_reentrant_checkpoint():
            self.checkpointed.add(self.next_call_id)

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
        # The hot path: once per module call. Flags are computed once, locally, instead of
        # through CallRecord's properties (is_cut, is_no_grad_inside).
        key = id(module)
        stack = self.stack
        frame = stack.pop() if stack and stack[-1].module_id == key else self._pop(key)
        calls = self.calls
        call = calls[key] = calls.get(key, 0) + 1
        inputs = (args, kwargs) if kwargs else args
        params_grad = self.params_grad.get(key)
        if params_grad is None:
            params_grad = self._params_grad(module)
        record = call_record(
            frame,
            type(module).__qualname__,
            call,
            params_grad,
            inputs,
            output,
            bool(module._parameters),
        )
        grad_enabled, needs_grad, floating = record[3], record[5] or params_grad, record[8]
        is_cut = grad_enabled and floating and needs_grad and not record[4] and not record[7]
        if is_cut and not params_grad and self._is_constant(module, args, kwargs, output):
            record = record._replace(constant=True)
            is_cut = False
        self.trace.append(record)
        if module.__dict__.get("inplace") is True:  # ReLU(inplace=True) and kin, seen cheaply
            self.in_place_ops = True
        # _follow_cuts does nothing for a no_grad call inside a parent without grad (every
        # call in inference mode), so that is not even called. Nearly always none of these.
        if (
            self.cut_outputs
            or is_cut
            or (not grad_enabled and floating and needs_grad and self._parent_grad_on())
        ):
            self._follow_cuts(record, inputs, output)
        if not self.hold and self.live:
            self._check_versions()
        target = self.targets.get(key)
        if target is None or not self.want_outputs:
            return
        if isinstance(output, torch.Tensor):  # the usual case, without the generator
            self._snapshot(key, target[0], record, "", output)
            return
        self._snapshot_parts(key, target[0], record, output, module)

    def _snapshot_parts(
        self, key: int, layer: str, record: CallRecord, output: Any, module: nn.Module
    ) -> None:
        """Every tensor inside a container or object output, and a note on what was not."""
        notes: list[str] = []
        missing = missing_probabilities(module, output)
        if missing and record.call == 1:
            notes.append(missing)
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
            self._add_note(layer, note)

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
            known = False  # loops, not any() over generators: this runs once per module
            for param in module._parameters.values():
                if param is not None and param.requires_grad:
                    known = True
                    break
            else:
                for child in module._modules.values():
                    if child is not None and self._params_grad(child):
                        known = True
                        break
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
                again = module(*perturbed(args), **perturbed(kwargs or {}))
        except Exception:  # the module needs its real values: not constant
            return False
        finally:
            self.replaying = False
        return same_tensors(output, again)

    def on_cut(self, func: Any, args: tuple[Any, ...], kwargs: Any) -> Detach | None:
        """The record of the cut ``func`` is about to make (``fvis.cuts``), with its source
        line; None for nearly every call (nothing there requires grad)."""
        if self.in_hook or not self.stack:
            return None
        if func is SET_GRAD_ENABLED:  # entering or leaving a no_grad block
            self.grad_entry = grad_entry(bool(args[0]), self.stack[-1].call_id, self.grad_entry)
            return None
        return cut_record(func, args, kwargs, self.stack[-1].call_id)

    def _snapshot(
        self, key: int, layer: str, record: CallRecord, path: str, tensor: torch.Tensor
    ) -> None:
        # The hot path: once per captured tensor. The grad facts (GradFacts' first seven
        # fields, fvis.tensor_facts._grad_facts) are read inline.
        call, call_id, grad_enabled = record[2], record[10], record[3]
        inference = tensor.is_inference()
        node = tensor.grad_fn
        requires_grad = tensor.requires_grad
        facts = (
            grad_enabled,  # the grad mode of the call that returned the tensor
            record[4],
            requires_grad,
            node.name() if node is not None else None,
            tensor.is_leaf,
            inference,
            None if inference else tensor._version,
        )
        on_host = (
            not self.defer_cpu if tensor.is_cpu else tensor.device.type not in DEFERRED_DEVICES
        )
        want_values = self.keep_values or self.callback_values
        values = sample_values(tensor, self.sample) if want_values and on_host else None
        if requires_grad and grad_enabled:
            edge = (node, tensor.output_nr) if node is not None else gradient_edge(tensor)
            if edge is not None:
                self.edges[(layer, call, path)] = edge
        ref: torch.Tensor | Callable[[], torch.Tensor | None] | None = None  # records.referent
        if not inference:
            ref = tensor if self.hold else weakref.ref(tensor)
        shape = tuple(tensor.shape)
        device = "cpu" if tensor.is_cpu else _device(tensor.device)
        info = (shape, _dtype(tensor.dtype), device)
        seq = len(self.live) + len(self.done)
        ndim = len(shape)
        axis = self._channel_dim(key, record, shape) if ndim >= 3 else 1
        stats = tensor_stats(tensor, axis) if on_host else None
        item = _Live(key, layer, call, path, info, facts, stats, values, call_id, ref, seq)
        if ndim == 3 and axis == 2:
            item.token_grid = self._token_grid(record, shape)
        if self.keep_tensors:  # every sample, own dtype: what was captured, reloadable exactly
            item.saved = tensor.detach().to("cpu", copy=True)
        if not on_host:  # reduced on its device; read back with the rest (fvis.device_stats)
            self._defer(item, tensor, axis, want_values, inference)
        else:
            self._deliver(item)
        # An inference tensor has no version counter and no reference to check: it is done.
        (self.live if ref is not None else self.done).append(item)

    def _deliver(self, item: _Live) -> None:
        """Hand a finished capture to the callback (pictures are drawn there)."""
        if self.on_capture is not None:
            self.on_capture(item.capture(self.batch))
        if not self.keep_values:
            item.values = None

    def _defer(
        self, item: _Live, tensor: torch.Tensor, axis: int, want_values: bool, inference: bool
    ) -> None:
        """Statistics reduced on the tensor's device and the drawn sample cloned there, both
        copied to the host at the end of the forward in one transfer (no host sync per
        hooked call); in inference mode at once, so that nothing piles up on the device."""
        dim = channel_dim(tensor, axis)
        vector = reduce_on_device(tensor, dim)
        sample = sample_on_device(tensor, self.sample) if want_values else None
        channels = int(tensor.shape[dim]) if dim is not None else 0
        self.host.add((item, dim, channels, tensor.numel()), vector, sample)
        if inference:
            self._read_back()

    def _read_back(self) -> None:
        for (item, dim, channels, numel), vector, sample in self.host.resolve():
            item.stats = stats_from(vector, numel, channels, dim)
            item.values = sample
            self._deliver(item)


def _inside_reentrant_checkpoint() -> bool:
    """Whether the Python stack holds ``CheckpointFunction.forward`` (torch.utils.checkpoint
    with ``use_reentrant=True``)."""
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "forward" and code.co_filename.endswith(_CHECKPOINT_FILE):
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


_CHECKPOINT_FILE = os.path.join("torch", "utils", "checkpoint.py")
