"""The runner with a model per task (EMR, TALL masks) and with LiNeS after a merge, on the
refiner kit's toy suite: each task is scored with its own model, per-task hyperparameters are
chosen task by task, and the store and leaderboard say ``per-task`` with the storage."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from atmbench import registry, runner
from atmbench.executors.local import run_local
from atmbench.hookspecs import hookimpl
from atmbench.leaderboard import provenance, provenance_lines, table
from atmbench.store import ResultStore
from atmbench.streaming import merged_with_state, task_vector
from atmbench.suite import Suite
from atmbench.testing import ToyBenchmark


class ToySuite:
    @hookimpl
    def register_suites(self, register):
        register(Suite("toy2", ToyBenchmark.tasks, ("mlp",), lambda m, h, d: ToyBenchmark()))


@pytest.fixture
def toy(register):
    with register(ToySuite(), "toy2"):
        yield


def test_per_task_methods_and_lines_run_and_are_stored_as_such(toy, home, tmp_path):
    specs = ["emr", "tall_masks", "ta+lines"]
    cells = runner.plan("toy2", None, specs, [0])
    store = ResultStore(tmp_path / "results.sqlite")
    ws = runner.Workspace(home, torch.device("cpu"), False)
    summary = run_local(cells, store, ws)
    assert not summary.failed, summary.failed[0].error
    rows = store.cells().set_index("method")
    entries = 4 * 6 + 6 + 6 * 5 + 5  # the toy MLP's parameters
    assert rows.loc["emr"].task_storage_bytes == (entries + 7) // 8 + 4
    assert rows.loc["emr"].data_access == "none" and json.loads(rows.loc["emr"].hparams) == {}
    tall = rows.loc["tall_masks"]
    assert tall.task_storage_bytes == (entries + 7) // 8 and tall.data_access == "validation"
    chosen = json.loads(tall.hparams)
    assert set(chosen) in ({"lam"}, {"lam.a", "lam.b"})  # one value, or one per task
    assert set(chosen.values()) <= {0.2, 0.3, 0.4, 0.5, 0.6}
    lines = rows.loc["ta+lines"]
    assert pd.isna(lines.task_storage_bytes)  # one model
    assert json.loads(lines.hparams)["lines.beta"] in [round(0.1 * i, 1) for i in range(1, 16)]

    # each task was scored with its own model: θ0 + γ_t (M_t ⊙ τ_uni)
    bench = ws.benchmark("toy2", "mlp")
    base, vectors = bench.base_state(), ws.experts(bench, 0).vectors()
    emr = registry.methods()["emr"]
    shared, state = merged_with_state(emr, base, vectors, {})
    frame = store.frame()
    for task in bench.tasks:
        own = task_vector(emr, base, vectors, shared, {}, state, task)
        model = {k: base[k] + own[k] for k in base}
        expected = runner.evaluate_state(bench, model, "test", [task])[task]
        stored = frame[(frame.method == "emr") & (frame.task == task)].accuracy
        assert stored.item() == pytest.approx(expected)

    kinds = table(frame).attrs["kind"]
    assert kinds["emr"] == kinds["tall_masks"] == "per-task" and kinds["ta+lines"] == "one"
    storage = dict(provenance_lines(provenance(frame)))["per-task storage"]
    assert storage == "emr 13 B, tall_masks 9 B per task, beside the shared merged model"
