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


def _two_metrics(key="k2", method="ta"):
    record = _record(key=key, method=method)
    record.scores = {
        ("a", "test"): {"exact_match": 50.0, "char_accuracy": 75.5},
        ("b", "test"): {"exact_match": 70.0, "char_accuracy": 81.25},
        ("a", "val"): {"exact_match": 1.0, "char_accuracy": 2.0},
    }
    return record


def test_every_declared_metric_is_stored_in_the_tasks_order(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    store.write(_two_metrics())
    frame = store.frame()
    assert list(frame.accuracy) == [50.0, 70.0]  # the first metric, as before
    scores = [json.loads(text) for text in frame.scores]
    assert scores == [
        {"exact_match": 50.0, "char_accuracy": 75.5},
        {"exact_match": 70.0, "char_accuracy": 81.25},
    ]
    assert list(scores[0]) == ["exact_match", "char_accuracy"]  # order kept: first = ranked
    assert json.loads(store.frame(split="val").scores[0]) == {
        "exact_match": 1.0,
        "char_accuracy": 2.0,
    }


# The schema of stores written before ``results.scores`` existed (atmbench at 7e86a80).
OLD_SCHEMA = """
CREATE TABLE cells (cell_key TEXT PRIMARY KEY, suite TEXT NOT NULL, model TEXT NOT NULL,
    method TEXT NOT NULL, seed INTEGER NOT NULL, status TEXT NOT NULL, error TEXT,
    data_access TEXT, hparams TEXT, config TEXT NOT NULL, steps INTEGER, examples INTEGER,
    merge_time_s REAL, wall_time_s REAL, peak_mem_mb REAL, device TEXT, versions TEXT,
    git_commit TEXT, created_at REAL NOT NULL, trace TEXT, task_storage_bytes INTEGER);
CREATE TABLE results (
    cell_key TEXT NOT NULL REFERENCES cells(cell_key) ON DELETE CASCADE,
    task TEXT NOT NULL, split TEXT NOT NULL, accuracy REAL NOT NULL,
    PRIMARY KEY (cell_key, task, split));
CREATE VIEW rows AS
    SELECT c.cell_key, c.suite, c.model, c.method, c.seed, r.task, r.split, r.accuracy,
           r.rowid AS position, c.data_access, c.hparams, c.config, c.created_at
    FROM results r JOIN cells c USING (cell_key) WHERE c.status = 'ok';
INSERT INTO cells (cell_key, suite, model, method, seed, status, config, created_at)
    VALUES ('OLD', 's', 'm', 'ta', 0, 'ok', '{"method": "ta"}', 0);
INSERT INTO results VALUES ('OLD', 'a', 'test', 40.0), ('OLD', 'b', 'test', 60.0);
"""


def test_a_store_without_scores_is_migrated_and_keeps_its_rows(tmp_path):
    import sqlite3

    from atmbench import exchange
    from atmbench.cache import key_hash

    path = tmp_path / "old.sqlite"
    old, new = key_hash({"method": "ta"}), key_hash({"method": "ties"})  # as exports check
    with sqlite3.connect(path) as con:
        con.executescript(OLD_SCHEMA.replace("OLD", old))
    # read-only, before any migration: the export of an old store has no scores
    old_cells = exchange.read_store(path)
    assert old_cells[0]["results"] == [
        {"task": "a", "split": "test", "accuracy": 40.0},
        {"task": "b", "split": "test", "accuracy": 60.0},
    ]

    def columns():
        with sqlite3.connect(path) as con:
            return [row[1] for row in con.execute("PRAGMA table_info(results)")]

    store = ResultStore(path)
    # only read: the store stays as it was, so an older atmbench keeps writing to it
    assert list(store.frame().accuracy) == [40.0, 60.0] and store.frame().scores.isna().all()
    assert columns() == ["cell_key", "task", "split", "accuracy"]
    with sqlite3.connect(path) as con:  # what an older version inserts
        con.execute("INSERT INTO results VALUES (?,?,?,?)", (old, "c", "test", 50.0))
    assert list(store.frame().accuracy) == [40.0, 60.0, 50.0]
    with sqlite3.connect(path) as con:
        con.execute("DELETE FROM results WHERE task = 'c'")
    store.write(_two_metrics(new, "ties"))  # the first write adds the (NULL) column
    assert columns() == ["cell_key", "task", "split", "accuracy", "scores"]
    frame = store.frame()
    assert list(frame.cell_key) == [old, old, new, new]
    assert list(frame.accuracy) == [40.0, 60.0, 50.0, 70.0]
    assert frame.scores[:2].isna().all()
    assert json.loads(frame.scores[2]) == {"exact_match": 50.0, "char_accuracy": 75.5}
    ResultStore(path)  # opening it again changes nothing
    assert store.frame().equals(frame)
    # the export carries the scores where they exist, and merging it elsewhere keeps them
    exported = tmp_path / "cells.json"
    doc = exchange.export(path)
    by_key = {cell["cell_key"]: cell for cell in doc["cells"]}
    assert "scores" not in by_key[old]["results"][0]
    assert by_key[new]["results"][0]["scores"] == {"exact_match": 50.0, "char_accuracy": 75.5}
    exported.write_text(json.dumps(doc))
    other = ResultStore(tmp_path / "other.sqlite")
    exchange.merge(other, exported)
    assert other.frame().scores.tolist() == frame.scores.tolist()
