"""Moving finished cells between stores: a JSON export, and merging a submission in.

A submission is a set of finished cells: another SQLite store file or a JSON export of
one. Merging is keyed by ``cell_key`` (the hash of the cell's full config, checked on the
way in), so ingesting a file twice adds nothing and a cell the local store has already
finished is kept as it is: a submission never overwrites local results. Every column is
copied, creation time and provenance included, so merged cells keep their own history.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atmbench.cache import key_hash
from atmbench.store import CELL_COLUMNS, ResultStore, encode_scores

EXPORT_KIND = "atmbench-cells"
EXPORT_VERSION = 1
JSON_COLUMNS = ("hparams", "config", "versions", "trace")
REQUIRED = ("cell_key", "suite", "model", "method", "seed", "config", "created_at")
_SQLITE_MAGIC = b"SQLite format 3\x00"


class SubmissionError(ValueError):
    """A file to merge is not a store or an export, or one of its cells is inconsistent."""


@dataclass(frozen=True)
class MergeReport:
    added: int
    skipped: int
    """Cells the local store had already finished (kept unchanged)."""


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    return {k: json.loads(v) if k in JSON_COLUMNS and v is not None else v for k, v in row.items()}


def _encode(column: str, value: Any) -> Any:
    """A cell field as the store writes it (same JSON text, so keys and diffs stay stable)."""
    if column not in JSON_COLUMNS or value is None:
        return value
    if column == "trace":
        return json.dumps(value)
    return json.dumps(value, sort_keys=True, default=str)


def read_store(path: Path, suite: str | None = None) -> list[dict[str, Any]]:
    """The finished cells of a store file with their results, opened read-only."""
    con = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    try:
        query, params = "SELECT * FROM cells WHERE status = 'ok'", []
        if suite:
            query, params = query + " AND suite = ?", [suite]
        cells = [_decode(dict(row)) for row in con.execute(query + " ORDER BY created_at", params)]
        results: dict[str, list[dict[str, Any]]] = {}
        for row in con.execute("SELECT * FROM results ORDER BY rowid"):
            result = {"task": row["task"], "split": row["split"], "accuracy": row["accuracy"]}
            if "scores" in row.keys() and row["scores"] is not None:  # older stores lack it
                result["scores"] = json.loads(row["scores"])
            results.setdefault(row["cell_key"], []).append(result)
    except sqlite3.DatabaseError as exc:
        raise SubmissionError(f"{path}: not an atmbench result store ({exc})") from None
    finally:
        con.close()
    return [dict(cell, results=results.get(cell["cell_key"], [])) for cell in cells]


def export(path: Path, suite: str | None = None) -> dict[str, Any]:
    """A JSON-able document of a store's finished cells (optionally one suite's)."""
    return {"kind": EXPORT_KIND, "version": EXPORT_VERSION, "cells": read_store(path, suite)}


def load_submission(path: Path) -> list[dict[str, Any]]:
    """The cells of a store file or of a JSON export (told apart by the SQLite header)."""
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(len(_SQLITE_MAGIC)) == _SQLITE_MAGIC:
            return read_store(path)
    try:
        doc = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SubmissionError(f"{path}: neither a SQLite store nor JSON ({exc})") from None
    first = doc[0] if isinstance(doc, list) and doc else doc  # leaderboard JSON is a list
    kind = first.get("kind") if isinstance(first, dict) else None
    if kind != EXPORT_KIND:
        hint = " (a leaderboard table holds no cells)" if "leaderboard" in str(kind) else ""
        raise SubmissionError(
            f"{path}: kind {kind!r} is not {EXPORT_KIND!r}{hint}: "
            "make the file with 'atmbench export' or submit the store file itself"
        )
    if first.get("version") != EXPORT_VERSION:
        raise SubmissionError(
            f"{path}: export version {first.get('version')!r} (valid: {EXPORT_VERSION})"
        )
    return doc["cells"]


def _check(cell: dict[str, Any], path: Path) -> None:
    missing = [k for k in REQUIRED if cell.get(k) is None]
    if missing:
        raise SubmissionError(f"{path}: a cell lacks {', '.join(missing)}")
    if cell.get("status", "ok") != "ok":
        raise SubmissionError(f"{path}: cell {cell['cell_key']} has status {cell['status']!r}")
    if key_hash(cell["config"]) != cell["cell_key"]:
        raise SubmissionError(
            f"{path}: cell {cell['cell_key']} ({cell['method']}) does not match its config hash"
        )
    if not cell.get("results"):
        raise SubmissionError(f"{path}: cell {cell['cell_key']} ({cell['method']}) has no results")


def merge(store: ResultStore, path: Path) -> MergeReport:
    """Add a submission's cells that ``store`` has not finished, in one transaction."""
    cells = load_submission(path)
    for cell in cells:
        _check(cell, Path(path))
    added = skipped = 0
    con = sqlite3.connect(store.path, timeout=60)
    con.execute("PRAGMA foreign_keys = ON")
    try:
        store.add_scores_column(con)
        with con:
            for cell in cells:
                key = cell["cell_key"]
                row = con.execute("SELECT status FROM cells WHERE cell_key = ?", (key,)).fetchone()
                if row is not None and row[0] == "ok":
                    skipped += 1
                    continue
                con.execute("DELETE FROM results WHERE cell_key = ?", (key,))
                con.execute("DELETE FROM cells WHERE cell_key = ?", (key,))
                values = {c: _encode(c, cell.get(c)) for c in CELL_COLUMNS}
                values["status"] = "ok"
                con.execute(
                    f"INSERT INTO cells ({', '.join(values)}) "
                    f"VALUES ({', '.join('?' * len(values))})",
                    list(values.values()),
                )
                con.executemany(
                    "INSERT INTO results (cell_key, task, split, accuracy, scores) "
                    "VALUES (?,?,?,?,?)",
                    [
                        (
                            key,
                            r["task"],
                            r["split"],
                            float(r["accuracy"]),
                            encode_scores(r.get("scores")),
                        )
                        for r in cell["results"]
                    ],
                )
                added += 1
    finally:
        con.close()
    return MergeReport(added, skipped)
