"""Each row's hyperparameters are shown in every leaderboard format, seeds that differ apart."""

from __future__ import annotations

import io
import json

import pandas as pd

from atmbench.cache import key_hash
from atmbench.leaderboard import render
from atmbench.store import CellRecord, ResultStore

HPARAMS = {
    "pretrained": [{}, {}, {}],
    "experts": [{}, {}, {}],
    "ta": [{"lam": 0.3}, {"lam": 0.3}, {"lam": 0.4}],
    "ties+rescale": [{"k": 0.2, "lam": 0.5, "rescale.factor": 1.2}] * 3,
    "average": [{}, {}, {}],
}


def _frame(tmp_path) -> pd.DataFrame:
    store = ResultStore(tmp_path / "results.sqlite")
    for method, per_seed in HPARAMS.items():
        for seed, hparams in enumerate(per_seed):
            config = {"suite": "s", "model": "m", "method": method, "seed": seed}
            store.write(
                CellRecord(
                    key_hash(config),
                    "s",
                    "m",
                    method,
                    seed,
                    config,
                    accuracies={("t", "test"): 50.0 + seed + len(method)},
                    data_access="validation",
                    hparams=hparams,
                    steps=1,
                )
            )
    return store.frame()


TA = "lam=0.3 (seeds 0, 1); lam=0.4 (seed 2)"
TIES = "k=0.2, lam=0.5, rescale.factor=1.2"


def test_markdown_lists_each_rows_hyperparameters(tmp_path):
    ((_, text),) = render(_frame(tmp_path), "md", "atmbench leaderboard")
    section = text.split("Hyperparameters (chosen on validation unless the row's name pins them):")
    assert section[1].split("\n\n")[1].splitlines() == [
        f"- `ties+rescale`: {TIES}",
        f"- `ta`: {TA}",
    ]


def test_csv_json_and_latex_carry_the_same_text(tmp_path):
    frame = _frame(tmp_path)
    ((_, csv),) = render(frame, "csv", "x")
    table = pd.read_csv(io.StringIO(csv), comment="#", index_col="method", keep_default_na=False)
    assert table.at["ta", "hparams"] == TA and table.at["ties+rescale", "hparams"] == TIES
    assert table.at["average", "hparams"] == ""
    ((_, doc),) = render(frame, "json", "x")
    rows = {r["method"]: r for r in json.loads(doc)["rows"]}
    assert (rows["ta"]["hparams"], rows["average"]["hparams"]) == (TA, None)
    ((_, tex),) = render(frame, "latex", "x")
    assert f"% hyperparameters of ta: {TA}\n" in tex


def test_no_section_when_no_row_has_hyperparameters(tmp_path):
    frame = _frame(tmp_path)
    frame = frame[frame.method.isin(["pretrained", "experts", "average"])]
    ((_, text),) = render(frame, "md", "atmbench leaderboard")
    assert "Hyperparameters" not in text
