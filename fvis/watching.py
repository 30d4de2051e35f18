"""Watch a model inside your own code: the same capture and verdicts as ``fvis dump``, on the
forward and backward passes *you* run, under *your* ``no_grad`` or ``inference_mode``.

>>> with fvis.watch(model, ["inner.relu", "backbone.*"]) as w:      # doctest: +SKIP
...     with torch.no_grad():
...         out = model(x)
>>> w.verdicts()["inner.relu"].summary                              # doctest: +SKIP
'grad mode off: the forward ran under torch.no_grad() at train.py:88 in main'

Nothing about the model changes: no mode flip, no grad context, hooks only, and every hook is
removed when the block ends, also when it raises. Each outermost call of a module of the model
is one **step** (a training step, an eval batch, a direct ``model.inner(x)``). Statistics and
verdicts are kept for every step; the values behind pictures only for the last step and every
``pictures_every``-th one, so a long loop stays within memory.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fvis.capture import Capture, CaptureResult, Mode, _Session, _targets, _walk, gradient_edge
from fvis.errors import UsageError
from fvis.grads import Cause, Verdict, diagnose, reachable_edges
from fvis.layers import ModelTree, node_from_module, resolve

_OWN_FILES = (str(Path(torch.__file__).parent), str(Path(__file__).parent))


@dataclass(frozen=True)
class Context:
    """The grad context the user's code ran a step under, and where it was called from."""

    grad_enabled: bool
    inference_mode: bool
    autocast: str | None  # "cpu:bfloat16" while torch.autocast was on
    where: str  # "train.py:88 in main": the first frame outside torch and fvis

    @property
    def mode(self) -> Mode:
        if self.inference_mode:
            return Mode.INFERENCE
        return Mode.GRAD if self.grad_enabled else Mode.NO_GRAD


@dataclass(frozen=True)
class Step:
    """One outermost call into the model: what it captured and the verdict on each."""

    index: int
    entry: str  # the module called ("" for the model itself)
    context: Context
    captures: tuple[Capture, ...]
    verdicts: Mapping[str, Verdict]
    gradients: Mapping[str, float] = field(default_factory=dict)  # label -> norm, once arrived


class _StepSession(_Session):
    """A capture session that also hooks the gradient of each captured tensor."""

    def __init__(self, watch: Watch, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.watch = watch
        self.arrived: dict[tuple[str, int, str], float] = {}

    def _snapshot(self, key: int, layer: str, record: Any, path: str, tensor: torch.Tensor) -> None:
        super()._snapshot(key, layer, record, path, tensor)
        self.watch.remember(tensor, layer, record.call, path)
        if tensor.requires_grad and record.grad_enabled:
            self.watch.handles.append(
                tensor.register_hook(self._arrived((layer, record.call, path)))
            )

    def _arrived(self, key: tuple[str, int, str]) -> Any:
        def hook(grad: torch.Tensor) -> None:
            self.arrived[key] = float(grad.detach().float().norm())

        return hook


class Watch:
    """Hooks on the chosen layers of ``model`` while the ``with`` block runs; see module doc."""

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str] = (),
        *,
        pictures_every: int = 0,
        sample: int = 0,
    ) -> None:
        if isinstance(model, torch.jit.ScriptModule):
            raise UsageError("fvis.watch cannot hook a TorchScript module (hooks do not fire)")
        self.model = model
        self.tree = ModelTree.of(node_from_module(model))
        names = [i.name for i in resolve(self.tree.layers, layers, "the model")] if layers else []
        self.layers = tuple(names or _leaves(self.tree))
        self.pictures_every = pictures_every
        self.sample = sample
        self.steps: list[Step] = []
        self.handles: list[Any] = []
        self._walked = _walk(model)
        self._session: _StepSession | None = None
        self._sessions: list[_StepSession] = []  # for gradients that arrive after a step
        self._context: Context | None = None
        self._last: CaptureResult | None = None
        self._origins: dict[int, tuple[int, str]] = {}  # storage pointer -> (step, label key)
        self._stack = ExitStack()

    # ------------------------------------------------------------------ the with block

    def __enter__(self) -> Watch:
        hooks = torch.nn.modules.module
        self._stack.enter_context(hooks.register_module_forward_pre_hook(self._pre))
        self._stack.enter_context(
            hooks.register_module_forward_hook(self._post, with_kwargs=True, always_call=True)
        )
        return self

    def __exit__(self, *_exc: Any) -> None:
        self._stack.close()
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self._collect_gradients()
        self._session = None

    def _pre(self, module: nn.Module, args: Any) -> None:
        if id(module) not in self._walked.names:
            return
        if self._session is None:
            self._start(module)
        assert self._session is not None
        self._session._pre(module, args)

    def _post(self, module: nn.Module, args: Any, *rest: Any) -> None:
        # (kwargs, output) normally; torch calls an always_call hook without kwargs when
        # forward raised (output None then).
        kwargs, output = rest if len(rest) == 2 else ({}, rest[0])
        session = self._session
        if session is None or id(module) not in self._walked.names:
            return
        session._post(module, args, kwargs, output)
        if not session.stack:
            self._finish(module, output)

    def _start(self, module: nn.Module) -> None:
        self._context = _context()
        self._release_previous()
        self._session = _StepSession(
            self,
            self._walked.names,
            _targets(self._walked, self.layers),
            self.sample,
            True,
            None,
            hold=False,
            by_name=self._walked.by_name,
        )

    def _finish(self, module: nn.Module, output: Any) -> None:
        session, context = self._session, self._context
        assert session is not None and context is not None
        session.finish()
        result = session.result(output, context.mode, False, self._walked)
        verdicts = {k: _in_context(v, context) for k, v in diagnose(result).items()}
        entry = self._walked.names[id(module)][0]
        self.steps.append(Step(len(self.steps), entry, context, result.captures, verdicts))
        self._sessions.append(session)
        self._last = result
        self._session = None

    def _release_previous(self) -> None:
        """Before a new step: the last one's graph and (unless kept) picture values go."""
        self._last = None
        if not self.steps:
            return
        step = self.steps[-1]
        if not self.pictures_every or step.index % self.pictures_every:
            dropped = tuple(dataclasses.replace(c, values=None) for c in step.captures)
            self.steps[-1] = dataclasses.replace(step, captures=dropped)

    def remember(self, tensor: torch.Tensor, layer: str, call: int, path: str) -> None:
        """Which capture a tensor's memory belongs to, so a stored (detached) copy can be
        traced back by ``explain``."""
        pointer = tensor.untyped_storage().data_ptr() if tensor.device.type != "meta" else 0
        if pointer:
            self._origins[pointer] = (len(self.steps), f"{layer}\0{call}\0{path}")

    def _collect_gradients(self) -> None:
        for step, session in zip(self.steps, self._sessions, strict=False):
            if session.arrived:
                labels = {(c.layer, c.call, c.path): c.label for c in step.captures}
                grads = {labels[k]: v for k, v in session.arrived.items() if k in labels}
                self.steps[step.index] = dataclasses.replace(step, gradients=grads)

    # ------------------------------------------------------------------ answers

    def verdicts(self, step: int = -1) -> dict[str, Verdict]:
        """Per capture label of one step (default: the last), the verdict."""
        return dict(self._step(step).verdicts)

    def gradients(self, step: int = -1) -> dict[str, float]:
        """Gradient norm per capture label of a step, for the captures a backward reached."""
        self._collect_gradients()
        return dict(self._step(step).gradients)

    def explain(self, tensor: torch.Tensor) -> Verdict:
        """The verdict for a tensor the user's code kept (``model.intermediate_output``)."""
        if not isinstance(tensor, torch.Tensor):
            raise UsageError(f"explain() takes a torch.Tensor, not a {type(tensor).__name__}")
        origin = self._origin_of(tensor)
        if tensor.is_inference():
            return _explained(origin, Cause.INFERENCE, "it is an inference tensor", _INFER_HINT)
        if self._last is not None and _reaches(tensor, self._last.output):
            return Verdict(
                True,
                Cause.CONNECTED,
                origin[0] if origin else None,
                "connected to the output of the last step",
                "",
            )
        if origin is not None and not tensor.requires_grad:
            return self._detached(tensor, origin)
        if not tensor.requires_grad:
            return _explained(
                origin,
                Cause.FROZEN,
                "it does not require grad (no grad_fn)",
                "it was made under no_grad, detached, or from frozen inputs",
            )
        return _explained(
            origin,
            Cause.UNUSED,
            "it requires grad but the last step's output does not depend on it",
            "use it in the computation you differentiate",
        )

    def _detached(self, tensor: torch.Tensor, origin: tuple[str, Step]) -> Verdict:
        label, step = origin
        verdict = step.verdicts.get(label)
        if verdict is not None and not verdict.connected:
            return verdict  # stored as it was made: the capture's own verdict says why
        return Verdict(
            False,
            Cause.CUT_DOWNSTREAM,
            label,
            f"a detached copy of {label} (step {step.index}): it shares that output's memory "
            "but does not require grad",
            "store the tensor itself, not .detach() / .data of it, to differentiate with "
            "respect to it",
        )

    def _origin_of(self, tensor: torch.Tensor) -> tuple[str, Step] | None:
        if tensor.device.type == "meta":
            return None
        found = self._origins.get(tensor.untyped_storage().data_ptr())
        if found is None or found[0] >= len(self.steps):
            return None
        step = self.steps[found[0]]
        layer, call, path = found[1].split("\0")
        capture = next(
            (c for c in step.captures if (c.layer, str(c.call), c.path) == (layer, call, path)),
            None,
        )
        # Memory is reused once freed: the same pointer is the same tensor only if it still
        # holds the same values (shape, dtype and extremes match the capture's).
        if capture is None or not _same_values(tensor, capture):
            return None
        return capture.label, step

    def _step(self, step: int) -> Step:
        if not self.steps:
            raise UsageError("the watched model has not run yet: call it inside the with block")
        try:
            return self.steps[step]
        except IndexError:
            raise UsageError(f"no step {step}: {len(self.steps)} ran") from None

    def report(self, out: Path | str, overwrite: bool = False, step: int = -1) -> Any:
        """Write the folder ``fvis dump`` writes (pictures, report.json/md/html) for a step."""
        self._collect_gradients()
        return write_step_report(self, self._step(step), Path(out), overwrite)


def watch(
    model: nn.Module, layers: Sequence[str] = (), *, pictures_every: int = 0, sample: int = 0
) -> Watch:
    """Hooks on ``layers`` (names or globs; default every leaf) for a ``with`` block."""
    return Watch(model, layers, pictures_every=pictures_every, sample=sample)


_INFER_HINT = "inference tensors never join a graph: run that forward outside inference_mode"


def _leaves(tree: ModelTree) -> list[str]:
    return [info.name for info in tree.layers if info.is_leaf and info.name]


def _context() -> Context:
    autocast = None
    for device in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device):
            autocast = f"{device}:{str(torch.get_autocast_dtype(device)).removeprefix('torch.')}"
    return Context(torch.is_grad_enabled(), torch.is_inference_mode_enabled(), autocast, _caller())


def _caller() -> str:
    """``file:line in function`` of the first frame outside torch and fvis."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_OWN_FILES):
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None:
        return "an unknown caller"
    return f"{_short(frame.f_code.co_filename)}:{frame.f_lineno} in {frame.f_code.co_name}"


def _short(filename: str) -> str:
    try:
        return str(Path(filename).resolve().relative_to(Path.cwd()))
    except ValueError:
        return filename


def _in_context(verdict: Verdict, context: Context) -> Verdict:
    """A verdict whose cause is the user's own no_grad / inference_mode around the call names
    that block's line instead of fvis's --mode flag."""
    if verdict.cause is Cause.GRAD_OFF and not context.grad_enabled and verdict.where is None:
        return dataclasses.replace(
            verdict,
            summary=f"grad mode off: the forward ran under torch.no_grad() at {context.where}",
            hint="run that forward outside the no_grad block (or inside torch.enable_grad()) "
            "to get gradients through it",
        )
    if verdict.cause is Cause.INFERENCE and context.inference_mode and verdict.where is None:
        return dataclasses.replace(
            verdict,
            summary=f"inference mode: the forward ran under torch.inference_mode() at "
            f"{context.where}",
            hint=_INFER_HINT,
        )
    if context.autocast and verdict.connected:
        return dataclasses.replace(
            verdict, hint=f"{verdict.hint} (ran under autocast {context.autocast})"
        )
    return verdict


def _explained(origin: tuple[str, Step] | None, cause: Cause, why: str, hint: str) -> Verdict:
    label = origin[0] if origin else None
    what = f"this tensor (from {label}, step {origin[1].index})" if origin else "this tensor"
    return Verdict(False, cause, label, f"not connected: {what}: {why}", hint)


def _same_values(tensor: torch.Tensor, capture: Capture) -> bool:
    from fvis.capture import _dtype
    from fvis.stats import tensor_stats

    if tuple(tensor.shape) != capture.shape or _dtype(tensor.dtype) != capture.dtype:
        return False
    stats = tensor_stats(tensor.detach())
    return (stats.min, stats.max, stats.numel) == (
        capture.stats.min,
        capture.stats.max,
        capture.stats.numel,
    )


def _reaches(tensor: torch.Tensor, output: Any) -> bool:
    edge = gradient_edge(tensor) if tensor.requires_grad else None
    return edge is not None and (id(edge[0]), edge[1]) in reachable_edges(output)


# --------------------------------------------------------------------------- report


def write_step_report(watch: Watch, step: Step, out: Path, overwrite: bool) -> Any:
    """Pictures (where the step kept values), report.json, report.md and report.html."""
    from fvis.dumping import DumpOptions, DumpResult, _DumpRun, _write_outputs
    from fvis.gallery import Gallery
    from fvis.grads import verdict_dicts
    from fvis.output import OutputDir
    from fvis.report import ReportInput, build_report

    options = DumpOptions(sample=watch.sample)
    folder = OutputDir.open(out, overwrite)
    with folder:
        gallery = Gallery.from_options(options, ())
        for capture in step.captures:
            gallery.add(capture)
        images = gallery.name_files(list(step.captures))
        root = watch.tree.layers[0]
        data = ReportInput(
            model={
                "file": f"<watched {root.short_class}>",
                "format": "live module",
                "sha256": "",
                "class": root.class_name,
                "params": root.params,
                "trainable": root.trainable,
                "frozen": root.frozen,
                "notes": [],
            },
            input={"description": _described(step), "shapes": [], "dtypes": [], "samples": []},
            mode=step.context.mode.value,
            train=watch.model.training,
            captures=step.captures,
            never_ran=[],
            images=images,
            verdicts=verdict_dicts(step.verdicts),
        )
        report = build_report(data, None, watch.tree)
        report["watch"] = _watch_json(step)
        run = _DumpRun(report, gallery, step.captures, (), ())
        files = _write_outputs(folder, run, options)
    return DumpResult(report, tuple(files), out)


def _described(step: Step) -> str:
    entry = f"model.{step.entry}" if step.entry else "the model"
    return f"step {step.index}: your call of {entry} at {step.context.where}"


def _watch_json(step: Step) -> dict[str, Any]:
    context = step.context
    return {
        "step": step.index,
        "entry": step.entry,
        "called_at": context.where,
        "grad_enabled": context.grad_enabled,
        "inference_mode": context.inference_mode,
        "autocast": context.autocast,
        "gradients": dict(step.gradients),
    }
