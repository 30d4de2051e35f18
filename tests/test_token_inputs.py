"""Token-id inputs: ids outside the vocabulary are named before the forward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.conftest import RunCli

ARCH = """
from safetensors.torch import load_file
from torch import nn

class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(self.wte(ids))
"""


@pytest.fixture
def model(tmp_path: Path) -> tuple[Path, str]:
    (tmp_path / "tok.py").write_text(ARCH)
    namespace: dict[str, object] = {}
    exec(ARCH, namespace)
    torch.save(namespace["Tokens"]().state_dict(), tmp_path / "w.pt")  # type: ignore[operator]
    return tmp_path / "w.pt", f"{tmp_path / 'tok.py'}:Tokens"


@pytest.mark.parametrize(("ids", "bad"), [([[1, 2, 12]], 12), ([[3, -1]], -1)])
def test_ids_outside_the_vocabulary_are_one_line_before_the_forward(
    tmp_path: Path, cli: RunCli, model: tuple[Path, str], ids: list[list[int]], bad: int
) -> None:
    torch.save(torch.tensor(ids), tmp_path / "ids.pt")
    with pytest.raises(IndexError):  # ground truth: the model itself fails deep inside
        nn.Embedding(10, 4)(torch.tensor(ids))
    code, _, err = cli(
        "dump",
        model[0],
        "--arch",
        model[1],
        "--input",
        tmp_path / "ids.pt",
        "--out",
        tmp_path / "out",
    )
    assert code == 5
    assert err.splitlines()[0] == (
        f"fvis: error: input id {bad} is outside the vocabulary [0, 10) of wte (Embedding)"
    )
    assert "forward failed" not in err and not (tmp_path / "out").exists()


def test_ids_inside_the_vocabulary_run(
    tmp_path: Path, cli: RunCli, model: tuple[Path, str]
) -> None:
    torch.save(torch.tensor([[0, 9, 4]]), tmp_path / "ids.pt")
    code, _, err = cli(
        "dump",
        model[0],
        "--arch",
        model[1],
        "--input",
        tmp_path / "ids.pt",
        "--out",
        tmp_path / "out",
        "--quiet",
    )
    assert code == 0, err


class Frozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(10, 4)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)
        self.requires_grad_(False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(self.wte(ids))))


def test_input_requires_grad_on_ids_makes_the_embedding_output_require_grad() -> None:
    from fvis.api import DumpOptions, check_module

    ids = torch.tensor([[1, 2, 3]])
    plain = check_module(Frozen(), [ids], DumpOptions(layers=("body",), images=False))
    cause = {c["label"]: c["verdict"]["cause"] for c in plain.dump.report["captures"]}
    assert cause["body"] == "nothing-requires-grad"
    options = DumpOptions(layers=("wte", "body"), images=False, input_requires_grad=True)
    result = check_module(Frozen(), [ids], options)
    verdicts = {c["label"]: c["verdict"] for c in result.dump.report["captures"]}
    assert verdicts["wte"]["connected"] and verdicts["body"]["connected"]
    assert any(
        "the input ids are integers, so wte's output requires grad" in n for n in result.dump.notes
    )
    # ground truth: with the embedding output requiring grad, a gradient reaches it
    model = Frozen()
    hidden = model.wte(ids).requires_grad_(True)
    out = model.head(torch.relu(model.body(hidden)))
    assert torch.autograd.grad(out.sum(), hidden)[0].abs().sum() > 0
    assert torch.nn.modules.module._global_forward_hooks == {}  # the hook is gone


def test_input_requires_grad_without_floats_or_embedding_is_a_usage_error() -> None:
    from fvis.api import DumpOptions, check_module
    from fvis.errors import UsageError

    with pytest.raises(UsageError, match="no embedding"):
        check_module(
            nn.Linear(3, 3),
            [torch.tensor([[1, 2, 3]])],
            DumpOptions(images=False, input_requires_grad=True),
        )


class Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(10, 4)
        self.mix = nn.Linear(4, 4)
        self.lm_head = nn.Linear(4, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.mix(self.wte(ids))
        return self.lm_head(hidden.cumsum(1))  # later tokens see earlier ones


@pytest.mark.parametrize("position", [None, 0, 2])
def test_target_on_a_sequence_output_is_taken_at_one_token(position: int | None) -> None:
    from fvis.backward import run_backward
    from fvis.capture import capture

    torch.manual_seed(0)
    model, ids = Seq(), torch.tensor([[1, 2, 3, 4]])
    result = capture(model, [ids], ["mix"])
    flow = run_backward(model, result, target=7, position=position)
    where = -1 if position is None else position
    assert flow.target == f"output[:, {where}, 7] (token {where})"
    # ground truth: autograd from that one logit to mix's output
    seen: list[torch.Tensor] = []
    model.mix.register_forward_hook(lambda _m, _i, out: seen.append(out))
    out = model(ids)
    expected = torch.autograd.grad(out[:, where, 7].sum(), seen[0], retain_graph=True)[0]
    assert flow.captures["mix"].norm == pytest.approx(float(expected.norm()), rel=1e-5)
    summed = torch.autograd.grad(out[..., 7].sum(), seen[0])[0]
    assert float(summed.norm()) != pytest.approx(flow.captures["mix"].norm)  # not the old sum


def test_target_position_without_a_sequence_output_is_explained() -> None:
    from fvis.backward import run_backward
    from fvis.capture import capture

    model = nn.Linear(3, 2)
    flow = run_backward(model, capture(model, [torch.randn(1, 3)], [""]), 1, position=0)
    assert flow.error == "--target-position needs a (N, T, V) output, not (1, 2)"


def test_shape_on_an_embedding_first_model_gives_token_ids(
    tmp_path: Path, cli: RunCli, model: tuple[Path, str]
) -> None:
    code, _, err = cli(
        "dump", model[0], "--arch", model[1], "--shape", "2,5", "--seed", "3", "--save-tensors",
        "--layer", "wte", "--no-images", "--out", tmp_path / "out", "--quiet",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["input"]["dtypes"] == ["int64"] and report["input"]["shapes"] == [[2, 5]]
    assert report["input"]["description"].startswith("random token ids in [0, 10) (2, 5), seed 3")
    # ground truth: the embedding rows of those seeded ids
    ids = torch.randint(0, 10, (2, 5), generator=torch.Generator().manual_seed(3))
    weights = torch.load(model[0])["wte.weight"]
    saved = load_file(str(tmp_path / "out" / "activations.safetensors"))["wte"]
    assert torch.equal(saved, weights[ids])


def test_a_forward_failing_on_the_dtype_says_so() -> None:
    from fvis.api import DumpOptions, check_module
    from fvis.errors import ModelInputError

    class Ids(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte = nn.Embedding(10, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.wte(x)

    with pytest.raises(ModelInputError) as info:
        check_module(Ids(), [torch.randn(1, 4)], DumpOptions(images=False))
    assert info.value.hint == (
        "the inputs are float32, which wte does not take: an embedding needs integer token ids, "
        "other layers floats"
    )
