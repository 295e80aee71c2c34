# ruff: noqa: E501
# (the expected documents are compared byte for byte, wide rows included)
"""Leaderboard documents from a small fixture store: Markdown byte for byte, CSV, JSON,
LaTeX, the provenance block, ``--data`` filtering, reported figures and ``--merge``."""

from __future__ import annotations

import io
import itertools
import json
import re
import sqlite3

import pandas as pd
import pytest
from click.testing import CliRunner

from atmbench import store as store_module
from atmbench.cache import key_hash
from atmbench.cli import cli
from atmbench.exchange import merge
from atmbench.store import CellRecord, ResultStore

# method -> seed -> (b_task, a_task) test accuracy; fisher ran one seed only.
ACC = {
    "pretrained": {0: (40, 60), 1: (42, 62)},
    "experts": {0: (80, 100), 1: (80, 100)},
    "ta": {0: (60, 80), 1: (64, 84)},
    "ta+atm": {0: (72, 90), 1: (72, 90)},
    "fisher": {0: (60, 95)},
}
STEPS = {"pretrained": 0, "experts": 100, "ta": 100, "ta+atm": 120, "fisher": 110}
DATA = {
    "pretrained": "none",
    "experts": "train",
    "ta": "none",
    "ta+atm": "validation",
    "fisher": "train",
}
T0 = 1_700_000_000  # 2023-11-14 22:13:20 UTC; each write is one minute later


def write_fixture(path, monkeypatch, suite="s", model="m") -> int:
    """Nine cells (seed 0: five methods, seed 1: four), written at T0, T0+60, ..."""
    clock = itertools.count(T0, 60)
    with monkeypatch.context() as patch:
        patch.setattr(store_module.time, "time", lambda: float(next(clock)))
        return _write_cells(ResultStore(path), suite, model)


def _atm_trace(b: float, a: float) -> list[dict]:
    """A one-iteration ATM trace: from ta's seed-0 accuracies to the refined ones."""
    return [
        {"iteration": 0, "accuracy": {"test": {"b_task": 60, "a_task": 80}}},
        {"iteration": 1, "accuracy": {"test": {"b_task": b, "a_task": a}}},
    ]


def _write_cells(store: ResultStore, suite: str, model: str) -> int:
    count = 0
    for seed in (0, 1):
        for method, seeds in ACC.items():
            if seed not in seeds:
                continue
            b, a = seeds[seed]
            config = {"suite": suite, "model": model, "method": method, "seed": seed}
            store.write(
                CellRecord(
                    key_hash(config),
                    suite,
                    model,
                    method,
                    seed,
                    config,
                    # validation rows must not leak into the (test) tables
                    accuracies={
                        ("b_task", "test"): b,
                        ("a_task", "test"): a,
                        ("b_task", "val"): 1.0,
                        ("a_task", "val"): 2.0,
                    },
                    data_access=DATA[method],
                    steps=STEPS[method],
                    versions={"atmbench": "0.1.0", "python": "3.11.0", "torch": "2.3.0"},
                    git_commit="abc1234",
                    device="cpu (test)",
                    trace=_atm_trace(b, a) if method == "ta+atm" else None,
                )
            )
            count += 1
    return count


@pytest.fixture
def fixture_store(tmp_path, monkeypatch):
    path = tmp_path / "fixture.sqlite"
    write_fixture(path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    return path


def invoke(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


# Worked on paper (std = sample std of two seeds = |x0 - x1| / sqrt(2)):
# pretrained b 40,42 -> 41.0 ± 1.4; a 60,62 -> 61.0 ± 1.4; avg 50,52 -> 51.0 ± 1.4;
#            norm (40/80+60/100)/2 = 55.0, (42/80+62/100)/2 = 57.25 -> 56.1 ± 1.6; 0 steps -> 0x
# ta+atm     72, 90 both seeds -> avg 81.0; norm (72/80+90/100)/2 = 90.0; 120/100 -> 1.2x
# fisher     one seed: 60, 95 (no ±); avg 77.5; norm (60/80+95/100)/2 = 85.0; 110/100 -> 1.1x
# ta         b 60,64 -> 62.0 ± 2.8; a 80,84 -> 82.0 ± 2.8; avg 70,74 -> 72.0 ± 2.8;
#            norm 77.5, 82.0 -> 79.75 ± 3.18 -> 79.8 ± 3.2; 100/100 -> 1.0x
# Rows: pretrained, then methods by avg (81.0 > 77.5 > 72.0), experts last. Bold = best
# merged value: ta+atm on b_task, avg, norm. avg; fisher's 95 on a_task.
# Dates: 9 writes from T0 = 22:13:20 to T0 + 8 min = 22:21:20 (UTC).
EXPECTED_MD = """\
Produced by: `atmbench run --suite s --model m --methods ta,ta+atm,fisher --seeds 0,1 && atmbench leaderboard --out boards`

## s / m  (test accuracy, %)

| method     |         b_task |      a_task |            avg |      norm. avg | data       | model    |   compute |   seeds |
|:-----------|---------------:|------------:|---------------:|---------------:|:-----------|:---------|----------:|--------:|
| pretrained |     41.0 ± 1.4 |  61.0 ± 1.4 |     51.0 ± 1.4 |     56.1 ± 1.6 | none       | one      |        0x |       2 |
| ta+atm     | **72.0 ± 0.0** |  90.0 ± 0.0 | **81.0 ± 0.0** | **90.0 ± 0.0** | validation | one      |      1.2x |       2 |
| fisher     |           60.0 |    **95.0** |           77.5 |           85.0 | train      | one      |      1.1x |       1 |
| ta         |     62.0 ± 2.8 |  82.0 ± 2.8 |     72.0 ± 2.8 |     79.8 ± 3.2 | none       | one      |      1.0x |       2 |
| experts    |     80.0 ± 0.0 | 100.0 ± 0.0 |     90.0 ± 0.0 |    100.0 ± 0.0 | train      | per-task |      1.0x |       2 |

Columns: tasks, `avg` = mean absolute accuracy, `norm. avg` = mean of merged / individual expert per task; mean ± std over `seeds`; **bold** = best merged value; `data` = data the method touched; `model` = `one` merged model, or `per-task` (a model per task: needs the task id at inference); `compute` = optimizer steps / fine-tuning the experts.

![s / m: test accuracy per task and method](s-m.png)

![s / m: ATM test accuracy per iteration](s-m-atm.png)

### Provenance

- reproduce: `atmbench run --suite s --model m --methods ta,ta+atm,fisher --seeds 0,1`
- atmbench: `0.1.0`
- git commit: `abc1234`
- packages: `python 3.11.0, torch 2.3.0`
- device: `cpu (test)`
- date: `2023-11-14 22:13 UTC – 2023-11-14 22:21 UTC`
- seeds: `0, 1`
"""


def test_markdown_document_byte_for_byte_with_chart(fixture_store):
    out = invoke("leaderboard", "--store", str(fixture_store), "--out", "boards")
    # the whole set: every format, the bar chart and the ta+atm trace's curve
    names = ["s-m.md", "s-m.csv", "s-m.json", "s-m.tex", "s-m-atm.png", "s-m.png"]
    assert out.splitlines() == [f"wrote boards/{name}" for name in names]
    text = (fixture_store.parent / "boards" / "s-m.md").read_text()
    assert text == EXPECTED_MD
    for chart in ("s-m.png", "s-m-atm.png"):  # bars; the ta+atm trace's curve
        png = (fixture_store.parent / "boards" / chart).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_csv_has_provenance_comments_and_reads_back(fixture_store):
    out = invoke("leaderboard", "--store", str(fixture_store), "--format", "csv")
    assert out.startswith(
        "# produced by: atmbench run --suite s --model m --methods ta,ta+atm,fisher "
        "--seeds 0,1 && atmbench leaderboard --format csv\n"
    )
    assert "# seeds: 0, 1\n" in out and "# device: cpu (test)\n" in out
    frame = pd.read_csv(io.StringIO(out), comment="#", index_col="method")
    assert list(frame.index) == ["pretrained", "ta+atm", "fisher", "ta", "experts"]
    assert frame.at["ta", "norm. avg"] == 79.75  # (77.5 + 82.0) / 2
    assert frame.at["ta", "b_task std"] == 2.8284  # 4 / sqrt(2)
    assert pd.isna(frame.at["fisher", "a_task std"])  # one seed: no std
    assert frame["compute"].tolist() == [0.0, 1.2, 1.1, 1.0, 1.0]
    assert frame["data"].tolist() == ["none", "validation", "train", "none", "train"]
    assert frame["seeds"].tolist() == [2, 2, 1, 2, 2]


def test_json_document(fixture_store):
    docs = json.loads(invoke("leaderboard", "--store", str(fixture_store), "--format", "json"))
    (doc,) = docs
    assert doc["kind"] == "atmbench-leaderboard"
    assert (doc["suite"], doc["model"]) == ("s", "m")
    assert doc["columns"] == ["b_task", "a_task", "avg", "norm. avg"]
    rows = {r["method"]: r for r in doc["rows"]}
    assert rows["fisher"]["mean"] == {
        "b_task": 60.0,
        "a_task": 95.0,
        "avg": 77.5,
        "norm. avg": 85.0,
    }
    assert rows["fisher"]["std"]["avg"] is None
    assert rows["pretrained"]["std"]["norm. avg"] == 1.591  # 2.25 / sqrt(2)
    assert (rows["ta+atm"]["compute"], rows["ta+atm"]["data"]) == (1.2, "validation")
    prov = doc["provenance"]
    assert (
        prov["command"] == "atmbench run --suite s --model m --methods ta,ta+atm,fisher --seeds 0,1"
    )
    assert prov["seeds"] == [0, 1]
    assert prov["git_commits"] == ["abc1234"] and prov["atmbench"] == ["0.1.0"]
    assert prov["packages"] == {"python": ["3.11.0"], "torch": ["2.3.0"]}
    assert prov["dates"] == ["2023-11-14 22:13 UTC", "2023-11-14 22:21 UTC"]
    assert "reported_not_measured" not in doc


def test_latex_booktabs(fixture_store, tmp_path):
    invoke("leaderboard", "--store", str(fixture_store), "--out", "tex")
    text = (tmp_path / "tex" / "s-m.tex").read_text()
    assert text.startswith(
        "% produced by: atmbench run --suite s --model m --methods ta,ta+atm,fisher --seeds 0,1 "
        "&& atmbench leaderboard --out tex\n"
    )
    printed = invoke("leaderboard", "--store", str(fixture_store), "--format", "latex")
    assert printed.replace("--format latex", "--out tex") == text + "\n"  # echo adds one
    assert (
        "% reproduce: atmbench run --suite s --model m --methods ta,ta+atm,fisher --seeds 0,1\n"
        in text
    )
    body = text[text.index(r"\begin{tabular}") :].splitlines()
    assert body[:4] == [
        r"\begin{tabular}{lrrrrllrr}",
        r"\toprule",
        r"method & b\_task & a\_task & avg & norm. avg & data & model & compute & seeds \\",
        r"\midrule",
    ]
    assert (
        r"ta+atm & \textbf{72.0 $\pm$ 0.0} & 90.0 $\pm$ 0.0 & \textbf{81.0 $\pm$ 0.0} & "
        r"\textbf{90.0 $\pm$ 0.0} & validation & one & 1.2x & 2 \\"
    ) in body
    assert r"fisher & 60.0 & \textbf{95.0} & 77.5 & 85.0 & train & one & 1.1x & 1 \\" in body
    # rules: under the header, after pretrained, before experts
    assert body.count(r"\midrule") == 3
    assert body[-3:] == [r"\bottomrule", r"\end{tabular}", r"\end{table}"]


def test_data_filter_keeps_references_and_the_matching_methods(fixture_store):
    out = invoke("leaderboard", "--store", str(fixture_store), "--data", "none")
    methods = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")]
    assert methods == ["method", "pretrained", "ta", "experts"]
    # ta is now the only merged row, so it is bold everywhere; the command runs only ta
    assert "| ta         | **62.0 ± 2.8** | **82.0 ± 2.8** |" in out
    assert "--methods ta --seeds 0,1 && atmbench leaderboard --data none`" in out
    out = invoke("leaderboard", "--store", str(fixture_store), "--data", "none,train")
    assert "| fisher " in out and "| ta+atm " not in out


def test_data_filter_rejects_unknown_levels(fixture_store):
    result = CliRunner().invoke(
        cli, ["leaderboard", "--store", str(fixture_store), "--data", "test"]
    )
    assert result.exit_code == 1
    assert (
        "unknown data access 'test' (valid: none, validation, train, test-unlabeled)"
        in result.output
    )


def test_reported_figures_stay_in_their_own_cited_table(tmp_path, monkeypatch):
    path = tmp_path / "v.sqlite"
    write_fixture(path, monkeypatch, suite="vision8", model="ViT-B-32")
    out = invoke("leaderboard", "--store", str(path), "--suite", "vision8", "--reported")
    measured, _, reported = out.partition("## vision8 / ViT-B-32: reported, not measured")
    assert reported and "### Provenance" in measured  # after the measured table and its block
    assert "85.9" in reported and "85.9" not in measured
    assert re.search(r"\| tsv +\| TSV-M", reported)  # padded to the longest row name
    assert "arXiv:2412.00081" in reported  # the TSV paper, cited under the table
    # vision8 / ViT-B-16 has reported figures but no measured cells: a document of its own
    assert "## vision8 / ViT-B-16: reported, not measured" in out
    docs = json.loads(
        invoke(
            "leaderboard",
            "--store",
            str(path),
            "--suite",
            "vision8",
            "--reported",
            "--format",
            "json",
        )
    )
    assert all(row["method"] != "tsv" for row in docs[0]["rows"])
    cited = {(f["method"], f["figure"], f["source"]) for f in docs[0]["reported_not_measured"]}
    assert ("tsv", "85.9", "TSV paper") in cited and ("ta", "68.0", "FusionBench") in cited


def _rows(path):
    with sqlite3.connect(path) as con:
        return sorted(
            con.execute(
                "SELECT cell_key, method, seed, task, split, accuracy, created_at, device FROM rows"
            )
        )


def test_merge_of_an_export_is_idempotent_and_keeps_provenance(fixture_store, tmp_path):
    invoke("export", "--store", str(fixture_store), "--out", "cells.json")
    local = tmp_path / "local.sqlite"
    runner = CliRunner()
    first = runner.invoke(cli, ["leaderboard", "--store", str(local), "--merge", "cells.json"])
    assert first.exit_code == 0, first.output
    assert "merged cells.json: 9 cell(s) added, 0 already stored" in first.output
    second = runner.invoke(cli, ["leaderboard", "--store", str(local), "--merge", "cells.json"])
    assert "merged cells.json: 0 cell(s) added, 9 already stored" in second.output
    assert _rows(local) == _rows(fixture_store)  # created_at and device survive the trip
    # the merged store renders the same table as the original
    assert (
        second.stdout.split("## s / m")[1]
        == invoke("leaderboard", "--store", str(fixture_store)).split("## s / m")[1]
    )


def test_merge_of_a_store_file_adds_only_missing_cells(fixture_store, tmp_path, monkeypatch):
    other = tmp_path / "other.sqlite"
    write_fixture(other, monkeypatch, suite="t", model="m")  # another suite: 9 new cells
    report = merge(ResultStore(fixture_store), other)
    assert (report.added, report.skipped) == (9, 0)
    assert merge(ResultStore(fixture_store), fixture_store).added == 0
    assert sorted(ResultStore(fixture_store).frame().suite.unique()) == ["s", "t"]


def test_merge_rejects_tampered_cells_and_leaderboard_json(fixture_store, tmp_path):
    invoke("export", "--store", str(fixture_store), "--out", "cells.json")
    doc = json.loads((tmp_path / "cells.json").read_text())
    doc["cells"][0]["config"]["seed"] = 7  # the key no longer matches the config
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    result = CliRunner().invoke(cli, ["leaderboard", "--store", "x.sqlite", "--merge", "bad.json"])
    assert result.exit_code == 1 and "does not match its config hash" in result.output
    (tmp_path / "board.json").write_text(
        invoke("leaderboard", "--store", str(fixture_store), "--format", "json")
    )
    result = CliRunner().invoke(
        cli, ["leaderboard", "--store", "x.sqlite", "--merge", "board.json"]
    )
    assert result.exit_code == 1 and "make the file with 'atmbench export'" in result.output
    assert ResultStore(tmp_path / "x.sqlite").frame().empty  # nothing half-merged


def test_trace_curves_average_tasks_then_seeds():
    from atmbench.plots import trace_curves

    def record(i, a, b):
        return {"iteration": i, "accuracy": {"val": {"x": 0.0, "y": 0.0}, "test": {"x": a, "y": b}}}

    seed0 = [record(0, 40, 60), record(1, 50, 70), record(2, 60, 80)]
    seed1 = [record(0, 44, 60), record(1, 54, 70)]  # one iteration fewer
    curves = trace_curves({"atm": [seed0, seed1]})
    # iteration 0: (50 + 52) / 2 = 51; 1: (60 + 62) / 2 = 61; 2: only seed 0 -> 70
    assert curves == {"atm": [51.0, 61.0, 70.0]}
