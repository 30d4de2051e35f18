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

The parts live by concern: the records in ``fvis.records``, the hook session in
``fvis.session``, the tensor helpers in ``fvis.tensor_facts``. This module runs the model
(walk the module tree, set modes, install the session's hooks, run forward) and re-exports
the names other modules import from ``fvis.capture``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from fvis import collector, fasthooks
from fvis.choices import Mode, What
from fvis.cuts import DetachWatch
from fvis.errors import ModelInputError, UsageError, first_line, torchscript_refused
from fvis.ops import OpWatch, split_patterns
from fvis.outputs import flatten_tensors
from fvis.records import CallRecord, Capture, CaptureResult, Detach, GradFacts, NotCalled
from fvis.session import _Session
from fvis.tensor_facts import _dtype as _dtype  # re-exported: fvis.watching reads it here
from fvis.tensor_facts import gradient_edge, sample_values

__all__ = [
    "CallRecord",
    "Capture",
    "CaptureResult",
    "Detach",
    "GradFacts",
    "Mode",
    "NotCalled",
    "capture",
    "flatten_tensors",
    "gradient_edge",
    "sample_values",
    "train_mode",
]


_WHATS = frozenset(What)


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
    watch_ops: bool = False,
    keep_tensors: bool = False,
    what: str = "output",
    ops: bool = False,
    every_op: bool = True,
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

    ``watch_ops`` (grad mode) also watches every tensor op for ``.detach()`` / ``.data`` and
    in-place ops, which module hooks cannot see; it costs ~10 us per op (a ResNet-18 forward
    +25%), so ``fvis.api`` turns it on only for a second pass when a capture is unreachable.

    ``keep_tensors`` also keeps each captured tensor whole (every sample) in its own dtype, on
    the CPU, as ``Capture.tensor`` (what ``--save-tensors`` writes).

    ``what`` is ``"output"``, ``"input"`` (each chosen module's positional tensor inputs,
    snapshot when the call starts, labelled ``layer:input``, ``layer:input[1]``) or ``"both"``.

    ``ops`` also records every tensor op inside the forward (``fvis.ops``): ``layers`` entries
    with a ``:`` are op patterns (``"inner:*"``, ``"*:softmax#1"``); with none, every compute op
    is captured (``every_op=False``: none, they are only listed). ``CaptureResult.ops`` lists
    them; captured ones are ``Capture`` s labelled ``module:op#index``. Off, no mode is
    installed and nothing is paid.
    """
    if what not in _WHATS:
        raise UsageError(f"what={what!r}: choose one of {', '.join(What)}")
    tree = _walk(model)
    op_patterns: list[str] = []
    if ops:
        layers, op_patterns = split_patterns(layers)
    _refuse_script(model, layers, tree)
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
        keep_tensors=keep_tensors,
        what=what,
    )
    with collector.room_for(len(tree.modules)):
        with train_mode(model, train, tree), ExitStack() as stack:
            stack.enter_context(_grad_context(mode))
            session.install(model, stack, tree.modules)
            if watch_ops and mode is Mode.GRAD:  # only a graph can be cut
                stack.enter_context(DetachWatch(session))
            watch = stack.enter_context(OpWatch(session, op_patterns, every_op)) if ops else None
            output = _run(model, inputs, kwargs or {}, session)
            session.finish()
        exported = type(model).__name__ == "UnflattenedModule"
        result = session.result(output, mode, exported, tree)
        del session  # its held outputs go before the collector's threshold comes back down
    if watch is None:
        return result
    return replace(result, ops=tuple(watch.records), op_calls=watch.calls)


@contextmanager
def train_mode(model: nn.Module, train: bool, tree: _Tree | None = None) -> Iterator[None]:
    """``model.train(train)`` inside, every module's own flag restored after.

    Restored per module, and only where a flag changed (Module.__setattr__ is slow):
    model.train(x) would flip a frozen BatchNorm a user had put in eval, and a forward may
    flip flags. Wrap the backward pass too: activation checkpointing recomputes the forward
    then, and must see the same modes (``fvis.api`` does).
    """
    tree = tree or _walk(model)
    modules = tree.modules
    flags = fasthooks.training_flags(modules)
    if flags is None:  # no extension: the same in Python
        flags = bytes(bool(module.training) for module in modules)
    if _needs_train_call(flags, train, tree.classes):
        model.train(train)
    try:
        yield
    finally:
        if not fasthooks.restore_training(modules, flags):
            for module, training in zip(modules, flags, strict=True):
                if module.training != bool(training):
                    module.training = bool(training)


def _refuse_script(model: nn.Module, layers: Sequence[str], tree: _Tree) -> None:
    """A ScriptModule never calls Python hooks: every layer would be reported "never ran"."""
    if isinstance(model, torch.jit.ScriptModule):
        raise torchscript_refused(f"the model ({type(model).__name__})")
    if not any(issubclass(c, torch.jit.ScriptModule) for c in tree.classes):
        return  # the usual case: no scripted submodule anywhere
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
    modules: tuple[nn.Module, ...]  # every module once, in walk order
    by_name: dict[str, nn.Module]
    classes: frozenset[type]  # every module's class (the checks of a class made once)
    kinds: dict[str, type]  # each module's first name -> its class (CaptureResult.classes)


def _needs_train_call(flags: bytes, train: bool, classes: Iterable[type]) -> bool:
    """``model.train(train)`` walks and sets every module; skip it when every flag (one byte
    per module) already matches, unless a module's class overrides ``train`` (models that
    keep BatchNorm frozen in training do it there)."""
    return (not train) in flags or any(c.train is not nn.Module.train for c in classes)


def _walk(model: nn.Module) -> _Tree:
    """Every module and every dotted name, walking ``_modules`` so shared modules keep all
    (in C where the extension is built: ``fasthooks.walk``, the same dicts)."""
    walked = fasthooks.walk(model)
    return _Tree(*walked) if walked is not None else _python_walk(model)


def _python_walk(model: nn.Module) -> _Tree:
    names: dict[int, list[str]] = {}
    modules: list[nn.Module] = []
    by_name: dict[str, nn.Module] = {}
    kinds: dict[str, type] = {}
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:  # once per capture call, over every module: kept lean
        prefix, module = stack.pop()
        by_name[prefix] = module
        key = id(module)
        aliases = names.get(key)
        if aliases is not None:  # a shared module, seen again under another name
            aliases.append(prefix)
            continue
        names[key] = [prefix]
        modules.append(module)
        kinds[prefix] = type(module)
        if module._modules:
            dot = prefix + "." if prefix else ""
            children = [(dot + n, m) for n, m in module._modules.items() if m is not None]
            stack.extend(reversed(children))
    fasthooks.untrack(names.values())  # lists of names: never part of a cycle
    return _Tree(names, tuple(modules), by_name, frozenset(map(type, modules)), kinds)


def _targets(tree: _Tree, layers: Sequence[str]) -> dict[int, tuple[str, nn.Module]]:
    found = fasthooks.targets_of(tree.by_name, layers) or _python_targets(tree, layers)
    targets, missing = found
    if targets is None:
        raise ModelInputError(f"no layer {missing!r} in the loaded model")
    return targets


def _python_targets(
    tree: _Tree, layers: Sequence[str]
) -> tuple[dict[int, tuple[str, nn.Module]] | None, str | None]:
    """``fasthooks.targets_of`` without the extension: (targets, None), or (None, the first
    layer the model lacks)."""
    targets: dict[int, tuple[str, nn.Module]] = {}
    for layer in layers:
        module = tree.by_name.get(layer)
        if module is None:
            return None, layer
        targets.setdefault(id(module), (layer, module))
    fasthooks.untrack(targets.values())  # (name, module): no cycle outlives the capture
    return targets, None


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
        hint = (
            f"layers that ran before the failure: {ran}"
            if ran
            else "no layer ran: check the input shape against the first layer"
        )
        if _DTYPE_WORDS.search(first):
            hint = f"the inputs are {_dtypes(inputs, kwargs)}, which {failed_in or 'the model'} "
            hint += "does not take: an embedding needs integer token ids, other layers floats"
        raise ModelInputError(
            f"forward failed{where}: {type(exc).__name__}: {first[:300]}", hint=hint
        ) from exc


# What torch says when a kernel gets the wrong dtype ("expected scalar type Long", "Expected
# tensor for argument #1 'indices' to have one of the following scalar types").
_DTYPE_WORDS = re.compile(r"scalar type|dtype|must have the same dtype", re.IGNORECASE)


def _dtypes(inputs: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
    found = [v for v in [*inputs, *kwargs.values()] if isinstance(v, torch.Tensor)]
    names = dict.fromkeys(str(t.dtype).removeprefix("torch.") for t in found)
    return " and ".join(names) or "not tensors"
