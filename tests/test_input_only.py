"""A parameter-free module that only preprocesses the input is not 'frozen parameters'."""

from __future__ import annotations

import torch
from torch import nn

from fvis.capture import capture
from fvis.gates import _by_design
from fvis.grads import Cause, diagnose


class Normalise(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean()) / (x.std() + 1e-6)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.transform = Normalise()
        self.fc = nn.Linear(4, 2)
        self.after = Normalise()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.after(self.fc(self.transform(x)))


def test_preprocessing_before_any_parameter_is_input_only() -> None:
    x = torch.randn(3, 4)
    verdicts = diagnose(capture(Net(), [x], ["transform", "fc", "after"]))
    assert verdicts["transform"].cause is Cause.INPUT_ONLY
    assert _by_design(verdicts["transform"].as_dict(), strict_library=False)
    assert verdicts["fc"].connected and verdicts["after"].connected
    # ground truth from a plain hook: the transform's output is not on any graph
    model, seen = Net(), []
    model.transform.register_forward_hook(lambda _m, _i, out: seen.append(out))
    model(x)
    assert not seen[0].requires_grad and seen[0].grad_fn is None


def test_frozen_parameters_before_a_parameter_free_layer_stay_frozen() -> None:
    model = Net()
    model.fc.requires_grad_(False)
    verdicts = diagnose(capture(model, [torch.randn(3, 4)], ["after"]))
    assert verdicts["after"].cause is Cause.FROZEN
    assert not _by_design(verdicts["after"].as_dict(), strict_library=False)


class Labels(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.pick = Argmax()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.fc(x)
        return scores, self.pick(scores)


class Argmax(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.argmax(-1)


def test_integer_outputs_do_not_fail_the_disconnected_gate() -> None:
    from fvis.api import DumpOptions, check_module

    result = check_module(Labels(), [torch.randn(2, 4)], DumpOptions(layers=("pick", "fc")))
    verdicts = {c["label"]: c["verdict"] for c in result.dump.report["captures"]}
    assert verdicts["pick"]["cause"] == "not-differentiable"
    assert result.passed, result.failures
