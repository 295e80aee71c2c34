"""The SQLite result store: the single source of truth for every table and plot.

``cells`` holds one row per cell (config, status, compute, provenance, trace) and
``results`` one row per (cell, task, split): ``accuracy`` is the task's first metric (the
one tables rank), ``scores`` every metric the task declares, as a JSON object in the
task's order (NULL in rows written before it existed; an older store gains the column on
its first write, see :meth:`ResultStore.add_scores_column`). The ``rows`` view joins them
into the one-row-per-(cell, task) shape that the leaderboard reads. A cell's rows are
written in one transaction, so a killed run never leaves half a cell behind.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

CELL_COLUMNS = {
    "cell_key": "TEXT PRIMARY KEY",
    "suite": "TEXT NOT NULL",
    "model": "TEXT NOT NULL",
    "method": "TEXT NOT NULL",
    "seed": "INTEGER NOT NULL",
    "status": "TEXT NOT NULL",
    "error": "TEXT",
    "data_access": "TEXT",
    "hparams": "TEXT",
    "config": "TEXT NOT NULL",
    "steps": "INTEGER",
    "examples": "INTEGER",
    "merge_time_s": "REAL",
    "wall_time_s": "REAL",
    "peak_mem_mb": "REAL",
    "device": "TEXT",
    "versions": "TEXT",
    "git_commit": "TEXT",
    "created_at": "REAL NOT NULL",
    "trace": "TEXT",
    "task_storage_bytes": "INTEGER",
}
TABLES = f"""
CREATE TABLE IF NOT EXISTS cells ({", ".join(f"{k} {v}" for k, v in CELL_COLUMNS.items())});
CREATE TABLE IF NOT EXISTS results (
    cell_key TEXT NOT NULL REFERENCES cells(cell_key) ON DELETE CASCADE,
    task TEXT NOT NULL,
    split TEXT NOT NULL,
    accuracy REAL NOT NULL,
    scores TEXT,
    PRIMARY KEY (cell_key, task, split)
);
"""
VIEW = """
DROP VIEW IF EXISTS rows;
CREATE VIEW rows AS
    SELECT c.cell_key, c.suite, c.model, c.method, c.seed, r.task, r.split, r.accuracy,
           {scores}, r.rowid AS position,
           c.data_access, c.hparams, c.config, c.steps, c.examples, c.merge_time_s,
           c.wall_time_s, c.peak_mem_mb, c.device, c.versions, c.git_commit, c.created_at,
           c.task_storage_bytes
    FROM results r JOIN cells c USING (cell_key) WHERE c.status = 'ok';
"""


@dataclass
class CellRecord:
    """Everything stored about one finished (or failed) cell."""

    cell_key: str
    suite: str
    model: str
    method: str
    seed: int
    config: Mapping[str, Any]
    accuracies: Mapping[tuple[str, str], float] = field(default_factory=dict)
    """(task, split) -> the task's first metric, in percent (the score tables rank)."""
    scores: Mapping[tuple[str, str], Mapping[str, float]] = field(default_factory=dict)
    """(task, split) -> metric -> score in percent: every metric the task declares, the
    first one equal to ``accuracies``' (empty: only that one is known)."""
    status: str = "ok"
    error: str | None = None
    data_access: str | None = None
    hparams: Mapping[str, Any] = field(default_factory=dict)
    steps: int | None = None
    examples: int | None = None
    merge_time_s: float | None = None
    """Seconds spent in the merge itself (all candidates of the validation search)."""
    wall_time_s: float | None = None
    peak_mem_mb: float | None = None
    device: str | None = None
    versions: Mapping[str, str] = field(default_factory=dict)
    git_commit: str | None = None
    trace: list | None = None
    task_storage_bytes: int | None = None
    """Extra storage per task of a method with one model per task (None: one model)."""


def _cell_columns(record: CellRecord) -> dict[str, Any]:
    """Column -> value of a record's ``cells`` row (JSON for the structured fields)."""
    return {
        "cell_key": record.cell_key,
        "suite": record.suite,
        "model": record.model,
        "method": record.method,
        "seed": record.seed,
        "status": record.status,
        "error": record.error,
        "data_access": record.data_access,
        "hparams": json.dumps(record.hparams, sort_keys=True),
        "config": json.dumps(record.config, sort_keys=True, default=str),
        "steps": record.steps,
        "examples": record.examples,
        "merge_time_s": record.merge_time_s,
        "wall_time_s": record.wall_time_s,
        "peak_mem_mb": record.peak_mem_mb,
        "device": record.device,
        "versions": json.dumps(record.versions, sort_keys=True),
        "git_commit": record.git_commit,
        "created_at": time.time(),
        "trace": None if record.trace is None else json.dumps(record.trace),
        "task_storage_bytes": record.task_storage_bytes,
    }


def _has_scores(con: sqlite3.Connection) -> bool:
    return "scores" in {row[1] for row in con.execute("PRAGMA table_info(results)")}


def _view(con: sqlite3.Connection) -> None:
    """(Re)create the ``rows`` view; a store without ``results.scores`` reads them as NULL."""
    con.executescript(VIEW.format(scores="r.scores" if _has_scores(con) else "NULL AS scores"))


def encode_scores(scores: Mapping[str, float] | None) -> str | None:
    """A ``scores`` value as stored: JSON in the task's metric order (None stays NULL)."""
    return None if scores is None else json.dumps({k: float(v) for k, v in scores.items()})


class ResultStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.executescript(TABLES)
            have = {row[1] for row in con.execute("PRAGMA table_info(cells)")}
            for name, kind in CELL_COLUMNS.items():
                if name not in have:  # a store written by an older version: add as NULLs
                    con.execute(f"ALTER TABLE cells ADD COLUMN {name} {kind.split()[0]}")
            _view(con)

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=60)
        con.execute("PRAGMA foreign_keys = ON")
        return con

    def done(self, cell_key: str) -> bool:
        """True if the cell finished successfully (failed cells are retried)."""
        with self._connect() as con:
            row = con.execute(
                "SELECT 1 FROM cells WHERE cell_key = ? AND status = 'ok'", (cell_key,)
            ).fetchone()
        return row is not None

    def add_scores_column(self, con: sqlite3.Connection) -> None:
        """Give a store written before ``results.scores`` existed that column (NULL in its
        rows). Done on the first write, not on opening: a store this version only reads
        stays as it was, so an older atmbench (which inserts four values per result row)
        can go on writing it, e.g. a long run of an earlier commit on the same home."""
        if not _has_scores(con):
            con.execute("ALTER TABLE results ADD COLUMN scores TEXT")
            _view(con)

    def write(self, record: CellRecord) -> None:
        """Replace the cell and all its rows atomically."""
        con = self._connect()
        try:
            self.add_scores_column(con)
            with con:
                con.execute("DELETE FROM results WHERE cell_key = ?", (record.cell_key,))
                con.execute("DELETE FROM cells WHERE cell_key = ?", (record.cell_key,))
                columns = _cell_columns(record)
                con.execute(
                    f"INSERT INTO cells ({', '.join(columns)}) "
                    f"VALUES ({', '.join('?' * len(columns))})",
                    list(columns.values()),
                )
                con.executemany(
                    "INSERT INTO results (cell_key, task, split, accuracy, scores) "
                    "VALUES (?,?,?,?,?)",
                    [
                        (record.cell_key, t, s, float(a), encode_scores(record.scores.get((t, s))))
                        for (t, s), a in record.accuracies.items()
                    ],
                )
        finally:
            con.close()

    def frame(self, split: str = "test", **where: Any) -> pd.DataFrame:
        """Successful rows of one split as a DataFrame, filtered by column equality."""
        clauses = ["split = ?"] + [f"{k} = ?" for k in where]
        query = f"SELECT * FROM rows WHERE {' AND '.join(clauses)} ORDER BY created_at, position"
        with self._connect() as con:
            return pd.read_sql_query(query, con, params=[split, *where.values()])

    def cells(self, statuses: Iterable[str] = ("ok", "failed")) -> pd.DataFrame:
        marks = ",".join("?" * len(tuple(statuses)))
        with self._connect() as con:
            return pd.read_sql_query(
                f"SELECT * FROM cells WHERE status IN ({marks}) ORDER BY created_at",
                con,
                params=list(statuses),
            )
