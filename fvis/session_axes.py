"""Which axis of a captured tensor holds its channels, and where tokens came from a grid of
patches: what the hook session asks per captured output (``fvis.axes`` decides; this mixin
remembers the answers for one capture and finds the producer of an output in its trace).
The C hooks (fvis/_trace.c) call ``_channel_dim`` and ``_token_grid`` by name."""

from __future__ import annotations

from typing import Any

from fvis.axes import Axis, channel_axis, decide, find_token_grid, prefix_tokens
from fvis.records import CallRecord

_UNDECIDED = object()


class AxisDecisions:
    """Mixed into ``fvis.session._Session``, whose ``decided``, ``grids``, ``targets``,
    ``by_name`` and ``trace`` it reads."""

    __slots__ = ()
    decided: dict[Any, Any]
    grids: dict[tuple[int, ...], tuple[int, int, int] | None]
    targets: dict[int, Any]
    by_name: Any
    trace: list[CallRecord]

    def _channel_dim(self, key: int, record: CallRecord, shape: tuple[int, ...]) -> int:
        """``_axis(...).dim``, with what the module itself decides remembered per module and
        shape for this capture (only a module that does not decide asks the trace)."""
        own = self.decided.get((key, shape), _UNDECIDED)
        if own is _UNDECIDED:
            target = self.targets.get(key)  # an op's module (fvis.ops) need not be a target
            module = target[1] if target is not None else self.by_name[record.name]
            own = self.decided[(key, shape)] = decide(module, shape)
        return own.dim if own is not None else self._axis(key, record, shape).dim

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

        target = self.targets.get(key)  # an op's module (fvis.ops) need not be a target
        module = target[1] if target is not None else self.by_name[record.name]
        return channel_axis(module, shape, producer)

    def _token_grid(
        self, record: CallRecord, shape: tuple[int, ...]
    ) -> tuple[int, int, int] | None:
        """Where ``(N, T, D)`` tokens came from a ``(N, D, H, W)`` patch embedding that ran
        earlier, with ``T = prefix + H * W`` and the prefix (class, distillation, register)
        tokens found as parameters of the model: ``(prefix, H, W)``; else None."""
        key = shape
        if key not in self.grids:
            # The prefix count walks every parameter of the model: only where an earlier
            # call made an (N, D, H, W) map that these tokens may come from (GPT-2 has none).
            n, _, width = shape
            maybe = any(
                len(out) == 4 and out[:2] == (n, width)
                for earlier in self.trace
                if earlier.call_id < record.call_id
                for out in earlier.output_shapes
            )
            self.grids[key] = (
                find_token_grid(self.trace, record.call_id, shape, self.prefix(shape))
                if maybe
                else None
            )
        return self.grids[key]

    def prefix(self, shape: tuple[int, ...]) -> int:
        root = self.by_name.get("")
        return prefix_tokens(root, shape[-1]) if root is not None else 0
