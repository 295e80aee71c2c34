# ruff: noqa: E501
# (the expected Markdown section is compared byte for byte)
"""Every metric a task declares reaches the leaderboard documents: the first one ranks in
the main table (``accuracy`` in the store), the others (text8's char accuracy, CoLA's
accuracy beside its MCC) get their own columns in CSV, keys in JSON and tables in Markdown.
A suite whose tasks declare one metric renders exactly as before."""

from __future__ import annotations

import io
import json

import pandas as pd

from atmbench import leaderboard
from atmbench.store import CellRecord, ResultStore

# method -> seed -> task -> (exact match, char accuracy); "cola" also declares a third metric
SCORES = {
    "pretrained": {
        0: {"sort": (20, 50), "cola": (10, 40)},
        1: {"sort": (22, 52), "cola": (12, 44)},
    },
    "ta": {0: {"sort": (60, 80), "cola": (30, 70)}, 1: {"sort": (64, 84), "cola": (30, 74)}},
    "experts": {0: {"sort": (90, 95), "cola": (80, 90)}, 1: {"sort": (90, 95), "cola": (80, 90)}},
}


def _store(path, extra=True) -> ResultStore:
    store = ResultStore(path)
    for method, seeds in SCORES.items():
        for seed, tasks in seeds.items():
            scores = {}
            for task, (em, chars) in tasks.items():
                declared = {"exact_match": float(em)}
                if extra:
                    declared["char_accuracy"] = float(chars)
                    if task == "cola":
                        declared["matthews"] = float(em) / 2
                scores[task, "test"] = declared
            record = CellRecord(
                f"{method}-{seed}",
                "s",
                "m",
                method,
                seed,
                {"method": method, "seed": seed},
                accuracies={key: value["exact_match"] for key, value in scores.items()},
                scores=scores,
                data_access="none",
                steps=0,
            )
            store.write(record)
    return store


def _render(store: ResultStore, fmt: str) -> str:
    ((_, text),) = leaderboard.render(store.frame(), fmt, "atmbench leaderboard")
    return text


# Worked on paper (std over the two seeds = |x0 - x1| / sqrt(2)):
# char accuracy  ta: sort 80, 84 -> 82.0 ± 2.8; cola 70, 74 -> 72.0 ± 2.8; avg 75, 79 -> 77.0 ± 2.8
#                pretrained: sort 51.0 ± 1.4, cola 42.0 ± 2.8, avg 45, 48 -> 46.5 ± 2.1
# matthews (cola only)  ta: 15, 15 -> 15.0 ± 0.0; pretrained 5, 6 -> 5.5 ± 0.7
EXPECTED_CHARS = """\
### test char accuracy, %

| method     |           sort |           cola |            avg |
|:-----------|---------------:|---------------:|---------------:|
| pretrained |     51.0 ± 1.4 |     42.0 ± 2.8 |     46.5 ± 2.1 |
| ta         | **82.0 ± 2.8** | **72.0 ± 2.8** | **77.0 ± 2.8** |
| experts    |     95.0 ± 0.0 |     90.0 ± 0.0 |     92.5 ± 0.0 |"""


def test_json_carries_every_metric_per_row(tmp_path):
    doc = json.loads(_render(_store(tmp_path / "r.sqlite"), "json"))
    assert doc["columns"] == ["sort", "cola", "avg", "norm. avg"]
    assert doc["other_metrics"] == ["test char accuracy (%)", "test matthews (%)"]
    rows = {r["method"]: r for r in doc["rows"]}
    assert rows["ta"]["mean"]["avg"] == 46.0  # the first metric ranks: (60 + 30 + 64 + 30) / 4
    assert rows["ta"]["metrics"]["char_accuracy"] == {
        "mean": {"sort": 82.0, "cola": 72.0, "avg": 77.0},
        "std": {"sort": 2.8284, "cola": 2.8284, "avg": 2.8284},
    }
    assert rows["pretrained"]["metrics"]["matthews"] == {
        "mean": {"cola": 5.5, "avg": 5.5},
        "std": {"cola": 0.7071, "avg": 0.7071},
    }


def test_csv_has_a_column_per_metric_and_task(tmp_path):
    text = _render(_store(tmp_path / "r.sqlite"), "csv")
    frame = pd.read_csv(io.StringIO(text), comment="#", index_col="method")
    assert list(frame.index) == ["pretrained", "ta", "experts"]
    assert frame.at["ta", "char_accuracy sort"] == 82.0
    assert frame.at["ta", "char_accuracy avg std"] == 2.8284
    assert frame.at["experts", "matthews cola"] == 40.0
    assert "matthews sort" not in frame  # only the tasks that declare it
    assert frame.at["ta", "avg"] == 46.0


def test_markdown_gets_a_table_per_other_metric(tmp_path):
    text = _render(_store(tmp_path / "r.sqlite"), "md")
    assert EXPECTED_CHARS in text
    assert "### test matthews, %" in text
    assert text.index("## s / m") < text.index(EXPECTED_CHARS) < text.index("### Provenance")


def test_one_metric_per_task_renders_as_before(tmp_path):
    """Scores that hold only the first metric (digits8, vision) add nothing to any format."""
    one = _store(tmp_path / "one.sqlite", extra=False)
    assert set(one.frame().scores.map(lambda t: tuple(json.loads(t)))) == {("exact_match",)}
    bare = _store(tmp_path / "bare.sqlite", extra=False)
    with bare._connect() as con:  # as rows stored before every metric was: NULL
        con.execute("UPDATE results SET scores = NULL")
    assert bare.frame().scores.isna().all()
    for fmt in ("md", "csv", "json", "latex"):
        assert _render(one, fmt) == _render(bare, fmt)
    assert "other_metrics" not in _render(one, "json") and "metrics" not in _render(one, "csv")
