"""Leaderboard charts: a distinct colour per method, the same in every chart of a board, and
a value axis that starts near the data."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex, to_rgb
from matplotlib.container import BarContainer

from atmbench.plots import PALETTE, REFERENCE_COLORS, bars_figure, method_styles, value_floor

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = json.loads((REPO / "leaderboards" / "digits8-vit-tiny.json").read_text())


def cielab(color: str) -> np.ndarray:
    """sRGB -> CIELAB (D65), the textbook formulas."""
    c = np.array(to_rgb(color))
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = xyz @ c / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def test_every_method_of_the_published_board_gets_a_clearly_distinct_colour():
    methods = [row["method"] for row in PUBLISHED["rows"]]
    assert len(methods) >= 20
    styles = method_styles(methods)
    colors = [styles[m][0] for m in methods]
    assert all(repeat == 0 for _, repeat in styles.values())
    assert len(set(colors)) == len(methods)
    # ΔE76 >= 25: clearly different side by side (a just-noticeable difference is ~2.3)
    gaps = [np.linalg.norm(cielab(a) - cielab(b)) for a, b in itertools.combinations(colors, 2)]
    assert min(gaps) >= 25
    # the whole palette and the reference colours, too
    every = [*PALETTE, *REFERENCE_COLORS.values()]
    assert (
        min(np.linalg.norm(cielab(a) - cielab(b)) for a, b in itertools.combinations(every, 2)) > 27
    )


def test_a_methods_colour_depends_on_its_name_not_its_rank():
    a = method_styles(["pretrained", "ties+atm", "ta", "ties", "experts"])
    b = method_styles(["ties", "experts", "ta", "pretrained", "ties+atm", "mtl"])
    assert a == {k: v for k, v in b.items() if k != "mtl"}
    assert a["pretrained"][0] == "#7f7f7f" and a["experts"][0] == "#000000"
    # past the palette, colours repeat with another hatch / dash
    many = method_styles([f"m{i:02d}" for i in range(len(PALETTE) + 2)])
    assert many["m00"] == (PALETTE[0], 0) and many[f"m{len(PALETTE):02d}"] == (PALETTE[0], 1)


def summary_of(rows: list[dict], columns: list[str]) -> pd.DataFrame:
    mean = pd.DataFrame({r["method"]: r["mean"] for r in rows}).T[columns]
    mean.attrs["std"] = pd.DataFrame({r["method"]: r["std"] for r in rows}).T[columns].fillna(0)
    return mean


def test_the_bar_chart_axis_starts_near_the_data_and_says_so():
    columns = [c for c in PUBLISHED["columns"] if c != "norm. avg"]
    summary = summary_of(PUBLISHED["rows"], columns)
    ax = bars_figure(summary, columns, "digits8").axes[0]
    low = float((summary - summary.attrs["std"]).min().min())
    bottom, top = ax.get_ylim()
    assert 0 < bottom <= low and low - bottom <= 15 and top == 100
    assert ax.get_ylabel() == f"test accuracy (%), axis from {bottom:g}"
    text = bars_figure(summary, columns, "text8", "exact match").axes[0]  # the suite's metric
    assert text.get_ylabel() == f"test exact match (%), axis from {bottom:g}"
    # each method's bars carry its own colour
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    drawn = {c.get_label(): to_hex(c.patches[0].get_facecolor()) for c in bars}
    styles = method_styles(list(summary.index))
    assert drawn == {m: styles[m][0] for m in summary.index}
    assert len(set(drawn.values())) == len(drawn)


def test_the_legend_of_the_published_board_fits_in_the_figure():
    columns = [c for c in PUBLISHED["columns"] if c != "norm. avg"]
    fig = bars_figure(summary_of(PUBLISHED["rows"], columns), columns, "digits8")
    renderer = FigureCanvasAgg(fig).get_renderer()
    legend = fig.axes[0].get_legend()
    assert len(legend.get_texts()) == len(PUBLISHED["rows"]) >= 30
    box, page = legend.get_window_extent(renderer), fig.bbox
    assert page.y0 <= box.y0 and box.y1 <= page.y1 and box.x1 <= page.x1


def test_value_floor():
    assert value_floor(62.3) == 50.0  # 5 below, rounded down to a multiple of 10
    assert value_floor(55.0) == 50.0
    assert value_floor(4.0) == 0.0  # never below 0
