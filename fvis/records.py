"""The records a capture produces: frozen, and apart from the tensors they describe.

``GradFacts`` (autograd state of one captured tensor), ``Capture`` (one tensor from one call
of one module), ``CallRecord`` (one call of any module: the trace), ``Detach`` (a graph cut
seen during forward, with its source line), ``NotCalled`` (a requested module that never ran)
and ``CaptureResult`` (everything one forward pass produced). ``fvis.capture`` re-exports them.

``OpRecord`` is one tensor op seen inside a forward with ``ops=True`` (``fvis.ops``).

``_Live`` is a capture while it is being recorded (made by the hook session, turned into a
frozen ``Capture`` once at the end), kept here next to the records it builds positionally,
and ``_Frame`` a module call under way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from fvis.choices import Mode
from fvis.fastbuild import builder
from fvis.sources import CutSite
from fvis.stats import Stats

if TYPE_CHECKING:
    from fvis.tensor_facts import _RawFacts


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
    # The whole captured tensor (every sample) in its own dtype, on the CPU: --save-tensors
    tensor: Any = field(default=None, repr=False, compare=False)

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
    op: bool = False  # a tensor op inside the module call ``parent_id`` (``fvis.ops``)

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


class OpRecord(NamedTuple):
    """One tensor op seen during forward with ``ops=True`` (``fvis.ops``): named by the
    innermost module call it ran in, the op, and its index among that call's ops of that name.
    """

    name: str  # "inner:add#1"; ops of a module's later calls read "inner#2:add#1"
    op: str  # "add", "add_" (in place), "softmax", "scaled_dot_product_attention"
    kind: str  # "compute", "view" (aliases an input) or "in-place"
    module: str  # the innermost module call's dotted name ("" for the model itself)
    call: int  # that module's call number
    shapes: tuple[tuple[int, ...], ...]  # of the tensors it returned
    captured: bool  # statistics, pictures and a verdict were made for it


@dataclass(frozen=True)
class Detach:
    """A cut seen during forward: a ``.detach()`` / ``.data`` / ``.item()`` /
    ``requires_grad_(False)`` ... of a tensor that required grad (``edge``: its gradient edge),
    or the entry into a no_grad / inference_mode block (``edge`` None); ``call_id`` is the
    innermost module call under way, ``op`` what cut, ``site`` the source line that did it."""

    call_id: int
    edge: tuple[Any, int] | None = field(repr=False, compare=False)
    op: str = ".detach()"
    site: CutSite | None = None


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
    checkpointed: frozenset[int] = frozenset()  # call_ids run inside a reentrant checkpoint
    ops: tuple[OpRecord, ...] = ()  # every tensor op seen with ``ops=True`` (``fvis.ops``)
    op_calls: Mapping[int, CallRecord] = field(default_factory=dict, repr=False, compare=False)
    # call_id -> the record of a captured op (its parent is the module call it ran in)
    grad_off_blocks: Mapping[int, Detach] = field(default_factory=dict, repr=False, compare=False)
    # call_id of a call made first inside a no_grad block of a grad-on parent -> its entry


class _Frame(NamedTuple):
    """A module call under way (a NamedTuple: one is made per module call)."""

    module_id: int
    name: str
    call_id: int
    parent_id: int | None
    grad_off: bool = False  # grad mode was off when the call started


class _Live:
    """A capture being recorded: what the hook saw, plus a reference to its tensor to compare
    ``_version`` later (``ref``: the tensor itself in grad mode, a ``weakref.ref`` otherwise,
    None for an inference tensor; ``referent`` reads it). A plain slotted class: one is
    made per captured tensor inside the hook, and the frozen ``Capture`` only once at the end."""

    __slots__ = (
        "call",
        "call_id",
        "device",
        "dtype",
        "facts",
        "key",
        "last_grad_fn",
        "last_version",
        "layer",
        "path",
        "ref",
        "saved",
        "seq",
        "shape",
        "stats",
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
        ref: torch.Tensor | Callable[[], torch.Tensor | None] | None,
        seq: int,
    ) -> None:
        self.key, self.layer, self.call, self.path = key, layer, call, path
        self.shape, self.dtype, self.device = tensor_info  # three slots: no tuple kept per item
        self.facts, self.stats, self.values = facts, stats, values
        self.call_id, self.ref, self.seq = call_id, ref, seq
        self.token_grid: tuple[int, int, int] | None = None
        self.saved: torch.Tensor | None = None
        self.last_grad_fn, self.last_version = facts[3], facts[6]

    def capture(self, batch: int | None, calls_total: int = 1, final: bool = False) -> Capture:
        after = (self.last_version, self.last_grad_fn) if final else (None, None)
        return _new_capture(
            (
                self.layer,
                self.call,
                self.path,
                self.shape,
                self.dtype,
                self.device,
                _new_grad_facts((*self.facts, *after)),
                self.stats,
                self.values,
                calls_total,
                batch,
                self.call_id,
                self.token_grid,
                self.saved,
            )
        )


def referent(ref: torch.Tensor | Callable[[], torch.Tensor | None] | None) -> torch.Tensor | None:
    """The tensor a ``_Live.ref`` holds: itself (held), a weak reference's, or None."""
    if ref is None or isinstance(ref, torch.Tensor):
        return ref
    return ref()


# Built once per captured tensor: without the frozen dataclasses' __init__ (fvis.fastbuild).
_new_capture = builder(Capture)
_new_grad_facts = builder(GradFacts)
