from __future__ import annotations

import pandas as pd

from atmbench.leaderboard import render_markdown, table


def _frame():
    rows = []
    accs = {
        "pretrained": {0: (40, 60), 1: (42, 62)},
        "experts": {0: (80, 100), 1: (80, 100)},
        "ta": {0: (60, 80), 1: (64, 84)},
        "average": {0: (50, 90), 1: (50, 90)},
    }
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
                    )
                )
    return pd.DataFrame(rows)


EXPECTED = """\
| method     |         b_task |         a_task |            avg |      norm. avg |
|:-----------|---------------:|---------------:|---------------:|---------------:|
| pretrained |     41.0 ± 1.4 |     61.0 ± 1.4 |     51.0 ± 1.4 |     56.1 ± 1.6 |
| ta         | **62.0 ± 2.8** |     82.0 ± 2.8 | **72.0 ± 2.8** | **79.8 ± 3.2** |
| average    |     50.0 ± 0.0 | **90.0 ± 0.0** |     70.0 ± 0.0 |     76.2 ± 0.0 |
| experts    |     80.0 ± 0.0 |    100.0 ± 0.0 |     90.0 ± 0.0 |    100.0 ± 0.0 |"""


def test_exact_markdown_for_a_fixed_frame():
    assert render_markdown(table(_frame())) == EXPECTED


def test_normalized_average_is_per_task_then_mean():
    summary = table(_frame())
    # ta, seed 0: (60/80 + 80/100) / 2 = 77.5; seed 1: (64/80 + 84/100) / 2 = 82.0
    assert abs(summary.at["ta", "norm. avg"] - (77.5 + 82.0) / 2) < 1e-9
    assert list(summary.index) == ["pretrained", "ta", "average", "experts"]
