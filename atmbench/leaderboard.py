"""Leaderboard tables derived from the result store: never edited by hand.

One table per (suite, model): rows are methods between the pretrained (lower) and the
individual-experts (upper) reference rows, columns are tasks, the average absolute
accuracy and the average normalized accuracy (merged / individual expert, per task and
seed, then averaged). With several seeds each cell reads ``mean ± std``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from tabulate import tabulate

from atmbench.spec import REFERENCES

AVG = "avg"
NORM = "norm. avg"


def normalized(frame: pd.DataFrame) -> pd.DataFrame:
    """Add ``normalized`` = accuracy / the experts' accuracy on that task and seed (in %)."""
    experts = frame[frame.method == "experts"].set_index(["suite", "model", "seed", "task"])
    ref = frame.join(
        experts["accuracy"].rename("expert_acc"), on=["suite", "model", "seed", "task"]
    )
    return frame.assign(normalized=100.0 * ref["accuracy"] / ref["expert_acc"])


def per_seed(frame: pd.DataFrame) -> pd.DataFrame:
    """Method x seed rows with task columns, the average and the normalized average."""
    frame = normalized(frame)
    wide = frame.pivot_table(index=["method", "seed"], columns="task", values="accuracy")
    wide[AVG] = wide.mean(axis=1)
    wide[NORM] = frame.pivot_table(index=["method", "seed"], values="normalized", aggfunc="mean")
    return wide


def table(frame: pd.DataFrame, tasks: list[str] | None = None) -> pd.DataFrame:
    """Mean and std over seeds of :func:`per_seed`, rows ordered for reading.

    Order: pretrained first, experts last, the methods between by average accuracy;
    task columns in the order the rows were stored (the suite's task order).
    """
    wide = per_seed(frame)
    tasks = tasks or list(pd.unique(frame.task))
    grouped = wide[[*tasks, AVG, NORM]].groupby(level="method")
    mean, std, count = grouped.mean(), grouped.std(ddof=1), grouped.size()
    methods = [m for m in mean.sort_values(AVG, ascending=False).index if m not in REFERENCES]
    order = [m for m in ("pretrained",) if m in mean.index] + methods
    order += [m for m in ("mtl", "experts") if m in mean.index]
    mean, std = mean.loc[order], std.loc[order]
    mean.attrs.update(std=std, seeds=count.loc[order])
    return mean


def _fmt(mean: float, std: float, bold: bool) -> str:
    if np.isnan(mean):
        return "–"
    text = f"{mean:.1f}" if np.isnan(std) else f"{mean:.1f} ± {std:.1f}"
    return f"**{text}**" if bold else text


def render_markdown(summary: pd.DataFrame) -> str:
    """The table as GitHub Markdown; the best merged value per column in bold.

    The reference rows (pretrained, experts) are never bolded: they bound, they don't compete.
    """
    std = summary.attrs.get("std", summary * np.nan)
    competing = [m for m in summary.index if m not in REFERENCES]
    best = summary.loc[competing].max() if competing else summary.max() * np.nan
    rows = []
    for method in summary.index:
        cells = [
            _fmt(
                summary.at[method, col],
                std.at[method, col],
                method in competing and summary.at[method, col] == best[col],
            )
            for col in summary.columns
        ]
        rows.append([method, *cells])
    return tabulate(
        rows,
        headers=["method", *summary.columns],
        tablefmt="pipe",
        disable_numparse=True,
        colalign=("left", *["right"] * len(summary.columns)),
    )
