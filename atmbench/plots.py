"""PNG charts written next to the Markdown leaderboards.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend
switch), so plotting works headless and leaves a notebook's own backend alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from statistics import fmean
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig).print_png(path)
    return path


def task_bars(summary: pd.DataFrame, columns: Sequence[str], path: Path, title: str) -> Path:
    """Grouped bars: one group per column (tasks, the average), one bar per method, ± std.

    ``summary`` is a leaderboard table (mean, with the std in ``attrs``).
    """
    std = summary.attrs.get("std", summary * np.nan)[columns].fillna(0.0)
    methods = list(summary.index)
    width = 0.8 / len(methods)
    x = np.arange(len(columns))
    # wide enough for a bar per method in each group, capped for twenty-odd methods
    fig = Figure(figsize=(min(16.0, 2.5 + len(columns) * (0.5 + 0.08 * len(methods))), 5))
    ax = fig.add_subplot()
    colors = _colormap(len(methods))
    for i, method in enumerate(methods):
        ax.bar(
            x + (i - (len(methods) - 1) / 2) * width,
            summary.loc[method, columns].to_numpy(dtype=float),
            width,
            yerr=std.loc[method].to_numpy(dtype=float),
            label=method,
            color=colors[i],
            capsize=1.5,
            error_kw={"linewidth": 0.6},
        )
    ax.set_xticks(x, columns, rotation=30, ha="right")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _colormap(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def trace_curves(traces: Mapping[str, Sequence[list[dict[str, Any]]]]) -> dict[str, list[float]]:
    """method -> mean test accuracy over tasks per iteration, averaged over seeds.

    ``traces``: method -> one ATM trace per seed; a trace is a list of records with
    ``iteration`` and ``accuracy`` = {split: {task: accuracy}} (record 0 is the start).
    Seeds with fewer iterations are averaged over the iterations they have.
    """
    curves = {}
    for method, per_seed in traces.items():
        series = [
            [fmean(r["accuracy"]["test"].values()) for r in trace if "accuracy" in r]
            for trace in per_seed
        ]
        length = max((len(s) for s in series), default=0)
        if length:
            curves[method] = [fmean(s[i] for s in series if i < len(s)) for i in range(length)]
    return curves


def atm_curves(curves: Mapping[str, Sequence[float]], path: Path, title: str) -> Path:
    """Test accuracy (mean over tasks) against the ATM iteration, one line per method."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for method, curve in sorted(curves.items()):
        ax.plot(range(len(curve)), curve, marker="o", markersize=3, label=method)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("ATM iteration (0 = start)")
    ax.set_ylabel("mean test accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
