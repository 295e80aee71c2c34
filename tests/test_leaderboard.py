# ruff: noqa: E501
# (the expected tables are compared byte for byte, wide rows included)
from __future__ import annotations

import pandas as pd

from atmbench.leaderboard import provenance, provenance_lines, render_markdown, table


def _frame():
    rows = []
    accs = {
        "pretrained": {0: (40, 60), 1: (42, 62)},
        "experts": {0: (80, 100), 1: (80, 100)},
        "ta": {0: (60, 80), 1: (64, 84)},
        "average": {0: (50, 90), 1: (50, 90)},
    }
    # optimizer steps per cell: the experts' fine-tuning is the unit of the compute column
    steps = {"pretrained": 0, "experts": 100, "ta": 100, "average": 100}
    data = {"pretrained": "none", "experts": "train", "ta": "none", "average": "none"}
    for method, seeds in accs.items():
        for seed, (a, b) in seeds.items():
            for task, acc in (("b_task", a), ("a_task", b)):
                rows.append(
                    dict(
                        suite="s",
                        model="m",
                        method=method,
                        seed=seed,
                        task=task,
                        accuracy=float(acc),
                        data_access=data[method],
                        steps=steps[method],
                    )
                )
    return pd.DataFrame(rows)


# Worked on paper (std = sample std over the two seeds; |a - b| / sqrt(2) for two values):
# pretrained  b: 40, 42 -> 41.0 ± 1.4; a: 60, 62 -> 61.0 ± 1.4; avg 50, 52 -> 51.0 ± 1.4;
#             norm (40/80 + 60/100)/2 = 55.0, (42/80 + 62/100)/2 = 57.25 -> 56.1 ± 1.6
# ta          b: 60, 64 -> 62.0 ± 2.8; a: 80, 84 -> 82.0 ± 2.8; avg 70, 74 -> 72.0 ± 2.8;
#             norm 77.5, 82.0 -> 79.75 ± 3.18 -> 79.8 ± 3.2
# average     b 50, a 90, avg 70; norm (50/80 + 90/100)/2 = 76.25 -> 76.2 (binary 76.25 is
#             exact and rounds half to even)
# experts     80, 100, avg 90, norm 100
# Bold: best of ta/average per column (ta on b_task, avg, norm. avg; average on a_task).
# data: the cells' data access; model: one merged model (the experts: one per task);
# compute: steps / experts' steps (0/100 = 0x, 100/100 = 1.0x).
EXPECTED = """\
| method     |         b_task |         a_task |            avg |      norm. avg | data   | model    |   compute |   seeds |
|:-----------|---------------:|---------------:|---------------:|---------------:|:-------|:---------|----------:|--------:|
| pretrained |     41.0 ± 1.4 |     61.0 ± 1.4 |     51.0 ± 1.4 |     56.1 ± 1.6 | none   | one      |        0x |       2 |
| ta         | **62.0 ± 2.8** |     82.0 ± 2.8 | **72.0 ± 2.8** | **79.8 ± 3.2** | none   | one      |      1.0x |       2 |
| average    |     50.0 ± 0.0 | **90.0 ± 0.0** |     70.0 ± 0.0 |     76.2 ± 0.0 | none   | one      |      1.0x |       2 |
| experts    |     80.0 ± 0.0 |    100.0 ± 0.0 |     90.0 ± 0.0 |    100.0 ± 0.0 | train  | per-task |      1.0x |       2 |"""


def test_exact_markdown_for_a_fixed_frame():
    assert render_markdown(table(_frame())) == EXPECTED


def test_normalized_average_is_per_task_then_mean():
    summary = table(_frame())
    # ta, seed 0: (60/80 + 80/100) / 2 = 77.5; seed 1: (64/80 + 84/100) / 2 = 82.0
    assert abs(summary.at["ta", "norm. avg"] - (77.5 + 82.0) / 2) < 1e-9
    assert list(summary.index) == ["pretrained", "ta", "average", "experts"]


def test_model_column_and_per_task_storage_in_the_provenance():
    frame = _frame()
    extra = frame[frame.method == "ta"].assign(method="emr", task_storage_bytes=3076)
    frame = pd.concat([frame.assign(task_storage_bytes=None), extra], ignore_index=True)
    summary = table(frame)
    assert summary.attrs["kind"].to_dict() == {
        "pretrained": "one",
        "ta": "one",
        "emr": "per-task",
        "average": "one",
        "experts": "per-task",
    }
    lines = dict(provenance_lines(provenance(frame.assign(created_at=0.0))))
    assert lines["per-task storage"] == "emr 3.0 KiB per task, beside the shared merged model"
    assert "per-task storage" not in dict(provenance_lines(provenance(_frame())))
