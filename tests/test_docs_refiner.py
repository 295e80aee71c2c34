"""docs/plugins.md's refiner example runs as written: registered, conforming, searched."""

from __future__ import annotations

import dataclasses
import json
import re
import types
from pathlib import Path

import pytest
import torch

from atmbench import runner
from atmbench.executors.local import run_local
from atmbench.hookspecs import hookimpl
from atmbench.refiner import Refiner, RefineRequest, RefineResult
from atmbench.store import ResultStore
from atmbench.suite import Suite
from atmbench.testing import ToyBenchmark

DOC = Path(__file__).parents[1] / "docs" / "plugins.md"


def _python_blocks(after: str) -> list[str]:
    """The ```python blocks of the doc's section headed ``after``, up to the next heading."""
    text = DOC.read_text()
    section = text.split(after, 1)[1]
    section = re.split(r"\n##+ ", section, maxsplit=1)[0] if after.startswith("#") else section
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def _module(source: str, name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    exec(compile(source, f"{DOC}:{name}", "exec"), module.__dict__)
    return module


class ToySuite:
    @hookimpl
    def register_suites(self, register):
        register(Suite("toy2", ToyBenchmark.tasks, ("mlp",), lambda m, h, d: ToyBenchmark()))


@pytest.fixture
def rescale(register):
    (source,) = _python_blocks("### A worked example: `rescale`")
    module = _module(source, "atmbench_rescale")
    with register(module, "rescale"), register(ToySuite(), "toy2"):
        yield module


def test_the_example_conforms_as_the_doc_checks_it(rescale):
    blocks = _python_blocks("Refiners have a kit of their own")
    (test,) = [b for b in blocks if "check_refiner" in b]
    _module(test, "test_rescale").test_rescale_conforms()


def test_the_example_is_searched_and_pinned_as_the_doc_says(rescale, home, tmp_path):
    specs = ["ta:lam=0.5+rescale", "ta:lam=0.5+rescale:factor=1.5"]
    cells = [c for c in runner.plan("toy2", None, specs, [0]) if c.method in specs]
    store = ResultStore(tmp_path / "results.sqlite")
    summary = run_local(cells, store, runner.Workspace(home, torch.device("cpu"), False))
    assert not summary.failed, summary.failed[0].error
    rows = store.cells().set_index("method")
    searched = rows.loc["ta:lam=0.5+rescale"]
    assert set(json.loads(searched.hparams)) == {"lam", "rescale.factor"}
    assert json.loads(searched.hparams)["rescale.factor"] in (0.8, 1.0, 1.2)
    assert searched.data_access == "validation"
    pinned = rows.loc["ta:lam=0.5+rescale:factor=1.5"]
    assert json.loads(pinned.hparams) == {"lam": 0.5} and pinned.data_access == "none"


@pytest.mark.parametrize("cls", [Refiner, RefineRequest, RefineResult])
def test_every_field_of_the_refiner_types_is_documented(cls):
    """A plugin author writes a refiner from the doc alone: each field has its table row."""
    table = DOC.read_text().split(f"`{cls.__name__}` fields", 1)[1].split("\n\n")[1]
    documented = set(re.findall(r"^\| `(\w+)` \|", table, flags=re.M))
    assert {f.name for f in dataclasses.fields(cls)} <= documented
