"""The pytest plugin: the ``fvis_check`` fixture and ``pytest --fvis``, run through pytester."""

from __future__ import annotations

import textwrap

import pytest

# In-process pytester runs drop the modules a run imported; a C extension (fvis._moments,
# torch's) cannot be imported twice, so everything the fixture uses is imported here first.
import fvis.api
import fvis.gallery
import fvis.gates
import fvis.grads
import fvis.report
import fvis.stats  # noqa: F401

pytest_plugins = ["pytester"]

MODELS = """
import torch
from torch import nn


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.fc(x))


class Fine(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Inner()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.inner(x))


class Detaching(Fine):
    def forward(self, x):
        return self.head(self.inner(x).detach())
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(mymodels=MODELS)
    pytester.syspathinsert()
    return pytester


def test_fixture_passes_a_connected_model(project: pytest.Pytester) -> None:
    project.makepyfile(
        test_model="""
        import torch
        from mymodels import Fine

        def test_connected(fvis_check):
            result = fvis_check(Fine(), [torch.randn(2, 4)], layers=["inner"])
            assert result.passed and result.checks > 0
        """
    )
    result = project.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_fixture_fails_a_disconnected_layer_with_the_fail_lines(project: pytest.Pytester) -> None:
    project.makepyfile(
        test_model="""
        import torch
        from mymodels import Detaching

        def test_connected(fvis_check):
            fvis_check(Detaching(), [torch.randn(2, 4)], layers=["inner", "head"])
        """
    )
    result = project.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*FAIL inner: disconnected: *"])
    assert "FAIL head" not in result.stdout.str()


def write_project(pytester: pytest.Pytester, arch: str) -> None:
    pytester.makepyfile(
        make="""
        import torch
        from mymodels import Fine
        torch.manual_seed(0)
        torch.save(Fine().state_dict(), "w.pt")
        """
    )
    pytester.runpython(pytester.path / "make.py")
    pytester.makefile(
        ".toml",
        pyproject=textwrap.dedent(
            f"""
            [tool.fvis]
            model = "w.pt"
            arch = "mymodels:{arch}"
            shape = "1,4"
            layers = ["inner", "head"]
            """
        ),
    )
    pytester.makepyfile(test_nothing="def test_other():\n    assert True\n")


def test_dash_dash_fvis_runs_the_project_check_as_one_item(project: pytest.Pytester) -> None:
    write_project(project, "Fine")
    result = project.runpytest("--fvis", "-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*fvis check ?tool.fvis? PASSED*"])


def test_dash_dash_fvis_fails_on_a_disconnected_layer(project: pytest.Pytester) -> None:
    write_project(project, "Detaching")
    junit = project.path / "fvis.xml"
    result = project.runpytest("--fvis", "--fvis-junit", str(junit), "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*FAIL inner: disconnected: *"])
    assert junit.is_file() and b'name="inner [disconnected]"' in junit.read_bytes()


def test_without_the_flag_no_item_is_added(project: pytest.Pytester) -> None:
    write_project(project, "Detaching")
    result = project.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_a_broken_project_config_fails_with_fvis_one_line_error(project: pytest.Pytester) -> None:
    project.makefile(".toml", pyproject='[tool.fvis]\nmodel = "missing.pt"\n')
    result = project.runpytest("--fvis", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*fvis: error: *missing.pt*"])
