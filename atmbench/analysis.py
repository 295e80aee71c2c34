"""ATM's per-iteration analysis: accuracy curves and task-vector cosine heat-maps as PNG.

Input is the trace the ``atm`` refiner stores with its cell (the ``trace`` JSON column of
the ``cells`` table): record 0 is the starting model (accuracies only), record i >= 1 the
model after merge i with that iteration's task-vector norms and cosine matrix. The paper's
claim to check: task vectors grow more orthogonal and smaller as iterations go on.

Figures are drawn on ``matplotlib.figure.Figure`` objects (Agg, no pyplot state), so the
functions are safe to call from any thread or a headless server.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from statistics import fmean
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

Trace = list[dict[str, Any]]


class TraceError(ValueError):
    """A stored trace is not an ATM trace (e.g. a failed cell's traceback, or ``None``)."""


def parse_trace(trace: str | Sequence[Mapping[str, Any]] | None) -> Trace:
    """The ``trace`` column's JSON text (or an already parsed list) as a checked ATM trace."""
    records = json.loads(trace) if isinstance(trace, str) else trace
    if not records or not all(isinstance(r, Mapping) and "accuracy" in r for r in records):
        raise TraceError(
            "not an ATM trace: expected a list of per-iteration records with 'accuracy' "
            "(is the cell an 'atm' or 'METHOD+atm' cell that finished?)"
        )
    return [dict(r) for r in records]


def _off_diagonal_mean(matrix: Sequence[Sequence[float]]) -> float:
    n = len(matrix)
    values = [matrix[i][j] for i in range(n) for j in range(n) if i != j]
    return fmean(values) if values else math.nan


def summary(trace: Trace) -> pd.DataFrame:
    """One row per record: mean val/test accuracy, mean task-vector norm, mean pairwise cosine.

    Record 0 (the start) has no task vectors: its norm and cosine are NaN; test is NaN
    where the run did not trace it (``atmbench run --trace test`` does).
    """
    rows = []
    for record in trace:
        norms = record.get("norms")
        cosine = record.get("cosine")
        rows.append(
            {
                "iteration": record["iteration"],
                **{
                    split: fmean(record["accuracy"][split].values())
                    if split in record["accuracy"]
                    else math.nan
                    for split in ("val", "test")
                },
                "norm": fmean(norms.values()) if norms else math.nan,
                "cosine": _off_diagonal_mean(cosine) if cosine else math.nan,
            }
        )
    return pd.DataFrame(rows).set_index("iteration")


def plot_accuracy(trace: Trace, path: Path, split: str = "test", title: str = "") -> Path:
    """Accuracy per task and its mean against the iteration; writes a PNG and returns ``path``."""
    if split not in trace[0]["accuracy"]:
        valid = ", ".join(trace[0]["accuracy"])
        raise TraceError(
            f"split {split!r} is not in the trace (valid: {valid}; "
            "atmbench run --trace test traces the test split)"
        )
    iterations = [r["iteration"] for r in trace]
    per_task = {t: [r["accuracy"][split][t] for r in trace] for t in trace[0]["accuracy"][split]}
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    axes = figure.add_subplot()
    for task, values in per_task.items():
        axes.plot(iterations, values, marker=".", linewidth=1, alpha=0.6, label=task)
    mean = [fmean(column) for column in zip(*per_task.values(), strict=True)]
    axes.plot(iterations, mean, marker="o", color="black", linewidth=2.5, label="mean")
    axes.set_xlabel("ATM iteration (0 = start)")
    axes.set_ylabel(f"{split} accuracy (%)")
    axes.set_xticks(iterations)
    axes.grid(alpha=0.3)
    figure.legend(loc="outside right upper", fontsize="small")
    axes.set_title(title or f"ATM: {split} accuracy per iteration")
    figure.savefig(path, dpi=120)
    return Path(path)


def plot_cosines(trace: Trace, path: Path, title: str = "") -> Path:
    """A grid of pairwise task-vector cosine heat-maps, one panel per iteration; a PNG.

    All panels share one symmetric colour range, set by the largest off-diagonal |cosine|,
    so that a fall in similarity across iterations shows as fading colour.
    """
    records = [r for r in trace if r.get("cosine")]
    if not records:
        raise TraceError("the trace has no iteration with task-vector cosines")
    # the diagonal (always 1) is blanked so the colour range shows the off-diagonal values
    matrices = [
        [
            [math.nan if i == j else c for j, c in enumerate(row)]
            for i, row in enumerate(r["cosine"])
        ]
        for r in records
    ]
    limit = max([1e-6] + [abs(c) for m in matrices for row in m for c in row if c == c])
    columns = min(4, len(records))
    rows = math.ceil(len(records) / columns)
    tasks = records[0]["tasks"]
    size = 2.2 + 0.25 * len(tasks)
    figure = Figure(figsize=(size * columns + 1.0, size * rows), layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False)
    image = None
    for axes, record, matrix in zip(grid.flat, records, matrices, strict=False):
        image = axes.imshow(matrix, vmin=-limit, vmax=limit, cmap="RdBu_r")
        axes.set_title(f"iteration {record['iteration']}", fontsize="small")
        axes.set_xticks(range(len(tasks)), tasks, rotation=90, fontsize="x-small")
        axes.set_yticks(range(len(tasks)), tasks, fontsize="x-small")
    for axes in list(grid.flat)[len(records) :]:
        axes.set_axis_off()
    figure.colorbar(
        image, ax=grid.ravel().tolist(), shrink=0.8, label="cosine similarity (diagonal blank)"
    )
    figure.suptitle(title or "ATM: pairwise cosine similarity of the task vectors")
    figure.savefig(path, dpi=120)
    return Path(path)
