"""A refiner's declared search grid is searched on validation, recorded and costed."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from atmbench import runner
from atmbench.executors.local import run_local
from atmbench.finetune import Recipe, TrainStats
from atmbench.heads import Classifier
from atmbench.hookspecs import hookimpl
from atmbench.hparams import HParam
from atmbench.metrics import ACCURACY
from atmbench.refiner import Refiner, RefineRequest, RefineResult
from atmbench.spec import SpecError
from atmbench.store import ResultStore
from atmbench.suite import Suite

TEACHER = torch.tensor([[1.0, 0.0, 0.0, 0.5], [0.0, 1.0, 0.0, -0.5], [0.0, 0.0, 1.0, 0.0]])
"""The labels are argmax(x @ TEACHERᵀ): an encoder holding TEACHER is right on every input."""


class LinearBenchmark:
    """Two tasks labelled by one linear teacher; the encoder is one bias-free linear layer."""

    suite, model, fingerprint = "linear2", "lin", "linear2-lin"
    tasks = ("a", "b")
    device = torch.device("cpu")

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self._base = {"weight": torch.randn(3, 4, generator=g)}
        self._data = {}
        for task in self.tasks:
            for split, size in (("train", 16), ("val", 40), ("test", 40)):
                x = torch.randn(size, 4, generator=g)
                self._data[task, split] = TensorDataset(x, (x @ TEACHER.T).argmax(-1))

    def base_state(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self._base.items()}

    def backbone(self, state: dict[str, Tensor] | None = None) -> nn.Module:
        encoder = nn.Linear(4, 3, bias=False)
        encoder.load_state_dict(self._base if state is None else state)
        return encoder

    def task_model(self, task: str, backbone: nn.Module, private=None) -> Classifier:
        return Classifier(backbone, nn.Identity())

    def metrics(self, task: str):
        return (ACCURACY,)

    def dataset(self, task: str, split: str) -> TensorDataset:
        return self._data[task, split]

    def recipe(self, task: str) -> Recipe:
        return Recipe(epochs=1, lr=0.01, batch_size=8, schedule="constant", warmup_steps=0)


SEEN: list[float] = []


def blend(request: RefineRequest) -> RefineResult:
    """θ = (1 - t)·start + t·TEACHER: t = 1 is right on every example, clearly the best."""
    t = request.hparams["t"]
    SEEN.append(t)
    start = request.base if request.from_base else request.start
    state = {"weight": (1 - t) * start["weight"] + t * TEACHER}
    return RefineResult(state, {task: TrainStats(steps=1, examples=2) for task in ("a", "b")})


BLEND = Refiner(
    "blend",
    blend,
    data="none",
    data_from_base="none",
    hparams=(HParam("t", default=0.0, search=(0.0, 1.0, 0.5), low=0.0, high=1.0),),
    description="moves the model towards the teacher",
)


class Plugin:
    @hookimpl
    def register_suites(self, register):
        register(
            Suite("linear2", LinearBenchmark.tasks, ("lin",), lambda m, h, d: LinearBenchmark())
        )

    @hookimpl
    def register_refiners(self, register):
        register(BLEND)


@pytest.fixture
def ran(register, home, tmp_path):
    """Run the given specs' own cells (no reference rows) and return the stored cells."""

    def _run(*specs: str):
        with register(Plugin(), "linear2"):
            cells = [c for c in runner.plan("linear2", None, list(specs), [0]) if c.method in specs]
            store = ResultStore(tmp_path / "results.sqlite")
            ws = runner.Workspace(home, torch.device("cpu"), progress=False)
            summary = run_local(cells, store, ws)
        assert not summary.failed, summary.failed[0].error
        return store.cells().set_index("method"), cells

    SEEN.clear()
    return _run


def test_a_refiners_grid_is_searched_on_validation_and_recorded(ran):
    rows, cells = ran("blend")
    assert SEEN == [0.0, 1.0, 0.5]  # every candidate, in grid order
    row = rows.loc["blend"]
    assert json.loads(row.hparams) == {"blend.t": 1.0}
    assert row.data_access == "validation"  # data-free refiner, but its search read val
    assert row.steps == 3 * 2  # every candidate's compute counts, not only the winner's
    assert json.loads(row.config)["refiners"] == [
        {"name": "blend", "version": "1", "hparams": {"t": [0.0, 1.0, 0.5]}}
    ]


def test_the_winner_is_the_one_evaluated(ran, tmp_path):
    ran("blend")
    store = ResultStore(tmp_path / "results.sqlite")
    accuracies = store.frame(split="val", method="blend").accuracy
    assert list(accuracies) == [100.0, 100.0]


def test_after_a_merge_the_method_and_refiner_choices_are_stored_side_by_side(ran):
    rows, _ = ran("ta:lam=0.5+blend")
    assert SEEN == [0.0, 1.0, 0.5]
    assert json.loads(rows.loc["ta:lam=0.5+blend"].hparams) == {"lam": 0.5, "blend.t": 1.0}


def test_a_pinned_value_is_not_searched(ran):
    rows, _ = ran("blend:t=0.5")
    assert SEEN == [0.5]
    row = rows.loc["blend:t=0.5"]
    assert json.loads(row.hparams) == {} and row.data_access == "none" and row.steps == 2


def test_a_bad_value_for_a_refiner_fails_before_any_work(register):
    with register(Plugin(), "linear2"), pytest.raises(SpecError, match=r"t=2 is invalid"):
        runner.plan("linear2", None, ["blend:t=2"], [0])
