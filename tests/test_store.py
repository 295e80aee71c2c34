from __future__ import annotations

import json

from atmbench.store import CellRecord, ResultStore


def _record(key="k1", method="ta", acc=(50.0, 70.0), status="ok"):
    return CellRecord(
        cell_key=key,
        suite="s",
        model="m",
        method=method,
        seed=0,
        config={"method": method},
        accuracies={("a", "test"): acc[0], ("b", "test"): acc[1], ("a", "val"): 1.0},
        status=status,
        data_access="none",
        hparams={"lam": 0.3},
        steps=10,
        examples=640,
        wall_time_s=1.5,
        peak_mem_mb=100.0,
        device="cpu",
        versions={"torch": "x"},
        git_commit="abc",
        trace=[{"iteration": 1}],
    )


def test_round_trip(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    store.write(_record())
    assert store.done("k1") and not store.done("k2")
    frame = store.frame()
    assert list(frame.task) == ["a", "b"]
    assert list(frame.accuracy) == [50.0, 70.0]
    row = frame.iloc[0]
    assert json.loads(row.hparams) == {"lam": 0.3}
    assert json.loads(row.config) == {"method": "ta"}
    assert (row.steps, row.examples, row.device, row.git_commit) == (10, 640, "cpu", "abc")
    assert len(store.frame(split="val")) == 1
    cells = store.cells()
    assert json.loads(cells.iloc[0].trace) == [{"iteration": 1}]


def test_rewrite_replaces_rows_and_failed_cells_are_not_done(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    store.write(_record(acc=(1.0, 2.0)))
    store.write(_record(acc=(3.0, 4.0)))
    assert list(store.frame().accuracy) == [3.0, 4.0]
    store.write(_record(key="k2", status="failed"))
    assert not store.done("k2")
    assert len(store.frame()) == 2  # failed cells have no rows in the view


def test_a_store_from_an_older_version_gains_new_columns(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as con:
        con.execute(
            "CREATE TABLE cells (cell_key TEXT PRIMARY KEY, suite TEXT NOT NULL, model TEXT NOT "
            "NULL, method TEXT NOT NULL, seed INTEGER NOT NULL, status TEXT NOT NULL, "
            "config TEXT NOT NULL, created_at REAL NOT NULL)"
        )
        con.execute("INSERT INTO cells VALUES ('old', 's', 'm', 'ta', 0, 'ok', '{}', 0)")
    store = ResultStore(path)
    store.write(_record())
    assert store.done("old") and store.done("k1")
    assert store.frame().iloc[0].merge_time_s is None
