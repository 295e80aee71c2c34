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


PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#e377c2", "#bcbd22", "#17becf",
    "#fdc086", "#a1d99b", "#556b2f", "#ffb6c1", "#8b008b", "#a6761d", "#fa8072", "#1b9e77",
    "#e7298a", "#1e90ff", "#393b79", "#b3446c", "#800000", "#e6ab02", "#9e9ac8", "#7b68ee",
    "#0000ff", "#00ff00", "#ff00ff", "#00fa9a", "#9cef43", "#005249", "#8a2be2", "#d8dcd6",
    "#ff63e9", "#13eac9", "#ff0000", "#00bfff",
)  # fmt: skip
"""Method colours: matplotlib's tab10 (without its grey and brown, kept for the reference
rows), then colours picked farthest-first from matplotlib's CSS and xkcd colours of CIELAB
lightness 25-88 (visible on white, apart from black): any two of these and the reference
colours are at least 27 apart in CIELAB (ΔE76). 36 of them: the published digits8 board
has 32 methods besides the references."""
REFERENCE_COLORS = {"pretrained": "#7f7f7f", "experts": "#000000", "mtl": "#8c564b"}
HATCHES = ("", "//", "..", "xx")
"""Past the palette's length colours repeat with a hatch (bars) or a dash (lines)."""


def method_styles(methods: Sequence[str]) -> dict[str, tuple[str, int]]:
    """method -> (colour, repeat): references fixed, the others by name in palette order.

    Assigning by sorted name, not by rank, keeps a method's colour the same in a board's
    bar chart and its ATM chart, and across boards of the same methods.
    """
    others = sorted(m for m in set(methods) if m not in REFERENCE_COLORS)
    styles = {m: (REFERENCE_COLORS[m], 0) for m in methods if m in REFERENCE_COLORS}
    for i, method in enumerate(others):
        styles[method] = (PALETTE[i % len(PALETTE)], i // len(PALETTE))
    return styles


def value_floor(low: float) -> float:
    """Where the accuracy axis starts: 5 points below the lowest bar (its error bar
    included), rounded down to a multiple of 10, and never below 0.

    Starting at 0 squeezes the range where methods differ into the top of the chart.
    """
    return max(0.0, float(np.floor((low - 5.0) / 10.0) * 10.0))


def task_bars(
    summary: pd.DataFrame, columns: Sequence[str], path: Path, title: str, metric: str = "accuracy"
) -> Path:
    """:func:`bars_figure` as a PNG at ``path``."""
    return _save(bars_figure(summary, columns, title, metric), path)


def bars_figure(
    summary: pd.DataFrame, columns: Sequence[str], title: str, metric: str = "accuracy"
) -> Figure:
    """Grouped bars: one group per column (tasks, the average), one bar per method, ± std.

    ``summary`` is a leaderboard table (mean, with the std in ``attrs``). The value axis
    starts near the lowest bar (see :func:`value_floor`), and its label says so and names
    the suite's ``metric``.
    """
    std = summary.attrs.get("std", summary * np.nan)[columns].fillna(0.0)
    methods = list(summary.index)
    width = 0.8 / len(methods)
    x = np.arange(len(columns))
    # wide enough for a bar per method in each group, capped for twenty-odd methods; tall
    # enough for the legend's one line per method (about 0.2 in each, beside the axes)
    width_in = min(16.0, 2.5 + len(columns) * (0.5 + 0.08 * len(methods)))
    fig = Figure(figsize=(width_in, max(5.0, 1.0 + 0.2 * len(methods))))
    ax = fig.add_subplot()
    styles = method_styles(methods)
    for i, method in enumerate(methods):
        color, repeat = styles[method]
        ax.bar(
            x + (i - (len(methods) - 1) / 2) * width,
            summary.loc[method, columns].to_numpy(dtype=float),
            width,
            yerr=std.loc[method].to_numpy(dtype=float),
            label=method,
            color=color,
            hatch=HATCHES[repeat % len(HATCHES)],
            capsize=1.5,
            error_kw={"linewidth": 0.6},
        )
    values = summary[columns].to_numpy(dtype=float) - std.to_numpy(dtype=float)
    floor = value_floor(float(np.nanmin(values))) if np.isfinite(values).any() else 0.0
    ax.set_xticks(x, columns, rotation=30, ha="right")
    ax.set_ylabel(f"test {metric} (%)" + (f", axis from {floor:g}" if floor > 0 else ""))
    ax.set_ylim(floor, 100)
    ax.set_title(title)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def trace_curves(traces: Mapping[str, Sequence[list[dict[str, Any]]]]) -> dict[str, list[float]]:
    """method -> mean test accuracy over tasks per iteration, averaged over seeds.

    ``traces``: method -> one ATM trace per seed; a trace is a list of records with
    ``iteration`` and ``accuracy`` = {split: {task: accuracy}} (record 0 is the start).
    Seeds with fewer iterations are averaged over the iterations they have. A trace without
    the test split (the default ``--trace val``) draws no curve.
    """
    curves = {}
    for method, per_seed in traces.items():
        series = [
            [fmean(r["accuracy"]["test"].values()) for r in trace if "accuracy" in r]
            for trace in per_seed
            if all("test" in r["accuracy"] for r in trace if "accuracy" in r)
        ]
        length = max((len(s) for s in series), default=0)
        if length:
            curves[method] = [fmean(s[i] for s in series if i < len(s)) for i in range(length)]
    return curves


def atm_curves(
    curves: Mapping[str, Sequence[float]],
    path: Path,
    title: str,
    styles: Mapping[str, tuple[str, int]] | None = None,
    metric: str = "accuracy",
) -> Path:
    """Test ``metric`` (mean over tasks) against the ATM iteration, one line per method.

    ``styles`` (from :func:`method_styles` over the whole board) gives each method the
    colour it has in the board's bar chart.
    """
    styles = styles or method_styles(list(curves))
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for method, curve in sorted(curves.items()):
        color, repeat = styles[method]
        ax.plot(
            range(len(curve)),
            curve,
            marker="o",
            markersize=3,
            label=method,
            color=color,
            linestyle=("-", "--", ":", "-.")[repeat % 4],
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("ATM iteration (0 = start)")
    ax.set_ylabel(f"mean test {metric} (%)")
    ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
