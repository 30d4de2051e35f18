"""--ops on real library models (issue 15): outputs bit-identical with and without the op
trace, op names stable, and the functional intermediates named as the issue says."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torchvision

from fvis.capture import Mode, capture
from tests.real_models.tiny import IDS, bert, gpt2


def _outputs(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if hasattr(value, "to_tuple"):
        value = value.to_tuple()
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _outputs(v)]
    return []


def _cases() -> list[tuple[str, Any, Any]]:
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(num_classes=10).eval()
    return [
        ("gpt2", gpt2().eval(), IDS),
        ("bert", bert().eval(), IDS),
        ("resnet18", resnet, torch.randn(1, 3, 64, 64)),
    ]


@pytest.mark.parametrize("mode", [Mode.GRAD, Mode.INFERENCE])
def test_real_outputs_bit_identical_with_ops(mode: Mode) -> None:
    for name, model, x in _cases():
        plain = _outputs(capture(model, [x], [], mode=mode).output)
        traced = capture(model, [x], [], mode=mode, ops=True)
        got = _outputs(traced.output)
        assert plain and len(plain) == len(got), name
        for a, b in zip(plain, got, strict=True):
            assert torch.equal(a.detach(), b.detach()), name
        assert len(traced.captures) > 10, name


def test_real_op_names_stable_and_as_the_issue_names_them() -> None:
    model = gpt2().eval()
    first = [o.name for o in capture(model, [IDS], [], ops=True, every_op=False).ops]
    again = [o.name for o in capture(model, [IDS], [], ops=True, every_op=False).ops]
    assert first == again
    assert "transformer.h.1:add#1" in first  # the residual add after attention
    resnet = torchvision.models.resnet18(num_classes=10).eval()
    names = {o.name: o.kind for o in capture(resnet, [torch.randn(1, 3, 64, 64)], [], ops=True).ops}
    assert names["layer1.0:add_#1"] == "in-place"  # torchvision's `out += identity`
    picked = capture(resnet, [torch.randn(1, 3, 64, 64)], ["layer*.0:add_*"], ops=True)
    assert [c.label for c in picked.captures] == [f"layer{i}.0:add_#1" for i in (1, 2, 3, 4)]
