"""Leaderboard tables derived from the result store: never edited by hand.

One table per (suite, model): rows are methods between the pretrained (lower) and the
individual-experts (upper) reference rows, columns are tasks, the average absolute
accuracy and the average normalized accuracy (merged / individual expert, per task and
seed, then averaged). With several seeds each cell reads ``mean ± std``. Four columns
say what a row cost, so that rows are compared on equal terms: ``data`` (what data the
method touched), ``model`` (``one`` merged model, or ``per-task``: a model per task, which
needs the task id at inference, as EMR's and TALL masks' do), ``compute`` (optimizer steps
relative to fine-tuning the experts) and ``seeds``. Every rendering carries a
:class:`Provenance` block saying how to reproduce it.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tabulate import tabulate

from atmbench.method import DATA_ACCESS
from atmbench.spec import REFERENCES

AVG = "avg"
NORM = "norm. avg"
FORMATS = {"md": "md", "csv": "csv", "json": "json", "latex": "tex"}
"""Output format -> file extension."""
JSON_KIND = "atmbench-leaderboard"


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


def compute_ratio(frame: pd.DataFrame) -> pd.Series:
    """Per method: optimizer steps / the experts' steps on the same seed, averaged over seeds.

    Fine-tuning the individual experts is the unit because every merge pays it; the
    pretrained row is 0 and a refined merge is above 1. NaN where steps were not recorded.
    """
    if "steps" not in frame:
        return pd.Series(np.nan, index=pd.unique(frame.method), dtype=float)
    steps = frame.groupby(["method", "seed"]).steps.first().astype(float)
    experts = steps.xs("experts", level="method") if "experts" in steps.index else None
    if experts is None:
        return steps.groupby(level="method").mean() * np.nan
    unit = experts.reindex(steps.index.get_level_values("seed")).to_numpy()
    return (steps / np.where(unit > 0, unit, np.nan)).groupby(level="method").mean()


def data_access(frame: pd.DataFrame) -> pd.Series:
    """Per method: the data it touched (``none``/``validation``/``train``), '/'-joined if mixed."""
    if "data_access" not in frame:
        return pd.Series("–", index=pd.unique(frame.method))
    return frame.groupby("method").data_access.agg(
        lambda v: "/".join(sorted(set(v.dropna()), key=DATA_ACCESS.index)) or "–"
    )


def model_kind(frame: pd.DataFrame) -> pd.Series:
    """Per method: ``one`` merged model, or ``per-task`` (per-task masks or rescalers over a
    shared vector: a stored per-task storage; the experts: a whole model per task)."""
    methods = pd.unique(frame.method)
    if "task_storage_bytes" not in frame:
        storage = pd.Series(False, index=methods)
    else:
        storage = frame.groupby("method").task_storage_bytes.agg(lambda v: v.notna().any())
    kinds = storage.reindex(methods).fillna(False).map({True: "per-task", False: "one"})
    return kinds.where(kinds.index != "experts", "per-task")


def task_storage(frame: pd.DataFrame) -> dict[str, int]:
    """method -> the extra storage per task (bytes) of its per-task modulators."""
    if "task_storage_bytes" not in frame:
        return {}
    stored = frame.dropna(subset=["task_storage_bytes"])
    return {m: int(v) for m, v in stored.groupby("method").task_storage_bytes.max().items()}


def format_hparams(values: dict[str, Any]) -> str:
    """``k=0.2, lam=0.5, rescale.factor=1.2``: a cell's hyperparameters in one short line."""
    return ", ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(values.items())
    )


def chosen_hparams(frame: pd.DataFrame) -> pd.Series:
    """Per method: the hyperparameters its cells ran with (chosen on validation unless the
    spec pins them; a refiner's as ``REFINER.NAME``), seeds that differ listed apart:
    ``lam=0.3 (seeds 0, 1); lam=0.4 (seed 2)``. "" for a method without any."""
    methods = pd.unique(frame.method)
    if "hparams" not in frame:
        return pd.Series("", index=methods)
    cells = frame.drop_duplicates(["method", "seed"]).sort_values("seed")
    out = {}
    for method, group in cells.groupby("method", sort=False):
        seeds: dict[str, list[str]] = {}
        for seed, text in zip(group.seed, group.hparams, strict=True):
            line = format_hparams(json.loads(text) if isinstance(text, str) else {})
            seeds.setdefault(line, []).append(str(seed))
        if len(seeds) == 1:
            out[method] = next(iter(seeds))
        else:
            out[method] = "; ".join(
                f"{line or '–'} (seed{'s' if len(ss) > 1 else ''} {', '.join(ss)})"
                for line, ss in seeds.items()
            )
    return pd.Series(out).reindex(methods).fillna("")


def other_scores(frame: pd.DataFrame) -> pd.DataFrame:
    """Long rows (method, seed, task, metric, value) of every metric after each task's first
    one, read from the store's ``scores``: empty for a suite whose tasks declare one metric,
    and for rows stored before every metric was (their ``scores`` is NULL)."""
    rows = []
    if "scores" in frame:
        for method, seed, task, text in frame[["method", "seed", "task", "scores"]].itertuples(
            index=False
        ):
            if isinstance(text, str):
                extra = list(json.loads(text).items())[1:]
                rows += [(method, seed, task, name, value) for name, value in extra]
    return pd.DataFrame(rows, columns=["method", "seed", "task", "metric", "value"])


def metric_tables(
    frame: pd.DataFrame, order: list[str], tasks: list[str]
) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """metric -> (mean, std over seeds) of the metrics after the first, in ``order``'s rows;
    columns: the tasks that declare the metric and their ``avg``."""
    tables = {}
    for name, group in other_scores(frame).groupby("metric", sort=False):
        wide = group.pivot_table(index=["method", "seed"], columns="task", values="value")
        wide = wide[[t for t in tasks if t in wide.columns]]
        wide[AVG] = wide.mean(axis=1)
        grouped = wide.groupby(level="method")
        tables[name] = (grouped.mean().reindex(order), grouped.std(ddof=1).reindex(order))
    return tables


def filter_data(frame: pd.DataFrame, levels: Sequence[str]) -> pd.DataFrame:
    """Keep the methods whose data access is in ``levels``, and always the reference rows.

    References stay because they bound the table and the normalized accuracy needs experts.
    """
    bad = [lv for lv in levels if lv not in DATA_ACCESS]
    if bad:
        raise ValueError(f"unknown data access {bad[0]!r} (valid: {', '.join(DATA_ACCESS)})")
    return frame[frame.method.isin(REFERENCES) | frame.data_access.isin(list(levels))]


def table(frame: pd.DataFrame, tasks: list[str] | None = None) -> pd.DataFrame:
    """Mean and std over seeds of :func:`per_seed`, rows ordered for reading.

    Order: pretrained first, experts last, the methods between by average accuracy;
    task columns in the order the rows were stored (the suite's task order). ``attrs``
    carry the std, the number of seeds, the data access and the compute ratio per row.
    """
    wide = per_seed(frame)
    tasks = tasks or list(pd.unique(frame.task))
    grouped = wide[[*tasks, AVG, NORM]].groupby(level="method")
    mean, std, count = grouped.mean(), grouped.std(ddof=1), grouped.size()
    methods = [m for m in mean.sort_values(AVG, ascending=False).index if m not in REFERENCES]
    order = [m for m in ("pretrained",) if m in mean.index] + methods
    order += [m for m in ("mtl", "experts") if m in mean.index]
    mean, std = mean.loc[order], std.loc[order]
    mean.attrs.update(
        std=std,
        seeds=count.loc[order],
        data=data_access(frame).reindex(order),
        kind=model_kind(frame).reindex(order),
        compute=compute_ratio(frame).reindex(order),
        hparams=chosen_hparams(frame).reindex(order).fillna(""),
        metrics=metric_tables(frame, order, tasks),
    )
    return mean


def format_compute(ratio: float) -> str:
    """``1.0x``; the pretrained row reads ``0x``; tiny nonzero budgets keep two digits."""
    if np.isnan(ratio):
        return "–"
    if ratio == 0:
        return "0x"
    return f"{ratio:.1f}x" if ratio >= 0.05 else f"{ratio:.2g}x"


def _fmt(mean: float, std: float, bold: bool, pm: str = "±") -> tuple[str, bool]:
    if np.isnan(mean):
        return "–", False
    text = f"{mean:.1f}" if np.isnan(std) else f"{mean:.1f} {pm} {std:.1f}"
    return text, bold


def _cells(summary: pd.DataFrame, pm: str = "±") -> list[tuple[str, list[tuple[str, bool]]]]:
    """(method, [(text, bold)] per value column, then data, model, compute and seeds) per row.

    The best merged value per column is bold; the reference rows (pretrained, experts, mtl)
    never are: they bound, they don't compete.
    """
    seeds = summary.attrs.get("seeds", pd.Series(dtype=float))
    data = summary.attrs.get("data", pd.Series(dtype=object))
    kind = summary.attrs.get("kind", pd.Series(dtype=object))
    compute = summary.attrs.get("compute", pd.Series(dtype=float))
    values = _values(summary, summary.attrs.get("std", summary * np.nan), pm)
    rows = []
    for method, cells in zip(summary.index, values, strict=True):
        extra = [
            (str(data.get(method, "–")), False),
            (str(kind.get(method, "one")), False),
            (format_compute(float(compute.get(method, np.nan))), False),
            (str(seeds.get(method, "–")), False),
        ]
        rows.append((method, cells + extra))
    return rows


def _values(mean: pd.DataFrame, std: pd.DataFrame, pm: str = "±") -> list[list[tuple[str, bool]]]:
    """[(text, bold)] per column of each row: ``mean ± std``, the best merged value bold."""
    competing = [m for m in mean.index if m not in REFERENCES]
    best = mean.loc[competing].max() if competing else mean.max() * np.nan
    return [
        [
            _fmt(
                mean.at[method, col],
                std.at[method, col],
                method in competing and mean.at[method, col] == best[col],
                pm,
            )
            for col in mean.columns
        ]
        for method in mean.index
    ]


def headers(summary: pd.DataFrame) -> list[str]:
    return ["method", *summary.columns, "data", "model", "compute", "seeds"]


def _hparams(summary: pd.DataFrame) -> pd.Series:
    return (
        summary.attrs.get("hparams", pd.Series("", index=summary.index))
        .reindex(summary.index)
        .fillna("")
    )


def hparams_lines(summary: pd.DataFrame) -> list[tuple[str, str]]:
    """(method, its hyperparameters) for the rows that have any, in table order."""
    return [(m, text) for m, text in _hparams(summary).items() if text]


def hparams_markdown(summary: pd.DataFrame) -> str:
    """The per-row hyperparameters as a Markdown list under the table."""
    items = "\n".join(f"- `{m}`: {text}" for m, text in hparams_lines(summary))
    return f"Hyperparameters (chosen on validation unless the row's name pins them):\n\n{items}"


def render_markdown(summary: pd.DataFrame) -> str:
    """The table as GitHub Markdown; the best merged value per column in bold."""
    rows = [
        [method, *(f"**{text}**" if bold else text for text, bold in cells)]
        for method, cells in _cells(summary)
    ]
    return tabulate(
        rows,
        headers=headers(summary),
        tablefmt="pipe",
        disable_numparse=True,
        colalign=("left", *["right"] * len(summary.columns), "left", "left", "right", "right"),
    )


def metrics_markdown(summary: pd.DataFrame) -> list[str]:
    """One section per metric after the tasks' first (``char_accuracy``, CoLA's accuracy):
    its table per task and averaged, rows in the main table's order."""
    sections = []
    for name, (mean, std) in summary.attrs.get("metrics", {}).items():
        rows = [
            [method, *(f"**{text}**" if bold else text for text, bold in cells)]
            for method, cells in zip(mean.index, _values(mean, std), strict=True)
        ]
        table_text = tabulate(
            rows,
            headers=["method", *mean.columns],
            tablefmt="pipe",
            disable_numparse=True,
            colalign=("left", *["right"] * len(mean.columns)),
        )
        sections.append(f"### test {name.replace('_', ' ')}, %\n\n{table_text}")
    return sections


# --- provenance ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Provenance:
    """Where a table's numbers came from: enough to reproduce and to judge them."""

    command: str
    """``atmbench run ...`` that recomputes every cell of the table."""
    atmbench: tuple[str, ...]
    git_commits: tuple[str, ...]
    packages: dict[str, tuple[str, ...]]
    devices: tuple[str, ...]
    dates: tuple[str, str]
    """First and last cell's creation time (UTC)."""
    seeds: tuple[int, ...]
    task_storage: dict[str, int]
    """method -> extra bytes per task of a ``per-task`` row's masks/rescalers (none: {})."""


def _unique(values) -> tuple:
    return tuple(sorted({v for v in values if isinstance(v, str | int) and v != ""}))


def _utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def run_command(frame: pd.DataFrame) -> str:
    """The ``atmbench run`` invocation that recomputes the cells of one (suite, model)."""
    suite, model = frame.suite.iloc[0], frame.model.iloc[0]
    methods = [m for m in pd.unique(frame.method) if m not in REFERENCES]
    seeds = ",".join(str(s) for s in sorted(pd.unique(frame.seed)))
    args = ["atmbench", "run", "--suite", suite, "--model", model]
    args += ["--methods", ",".join(methods), "--seeds", seeds]
    return shlex.join(args)


def provenance(frame: pd.DataFrame) -> Provenance:
    """Provenance of one (suite, model) frame of store rows (one row per cell and task)."""
    cells = frame.drop_duplicates("cell_key") if "cell_key" in frame else frame
    versions = [json.loads(v) for v in cells.get("versions", pd.Series(dtype=str)).dropna()]
    packages = {
        name: _unique(v.get(name) for v in versions)
        for name in sorted({k for v in versions for k in v})
    }
    created = cells.get("created_at", pd.Series(dtype=float)).dropna()
    dates = (_utc(created.min()), _utc(created.max())) if len(created) else ("–", "–")
    return Provenance(
        command=run_command(frame),
        atmbench=packages.pop("atmbench", ()),
        git_commits=_unique(cells.get("git_commit", pd.Series(dtype=str))),
        packages=packages,
        devices=_unique(cells.get("device", pd.Series(dtype=str))),
        dates=dates,
        seeds=tuple(int(s) for s in sorted(pd.unique(cells.seed))),
        task_storage=task_storage(cells),
    )


def provenance_lines(prov: Provenance) -> list[tuple[str, str]]:
    """(label, value) pairs: the same block in every format."""

    def join(values: Sequence, sep: str = ", ") -> str:
        return sep.join(str(v) for v in values) or "unknown"

    packages = ", ".join(f"{name} {' / '.join(v)}" for name, v in prov.packages.items())
    return [
        ("reproduce", prov.command),
        ("atmbench", join(prov.atmbench, " / ")),
        ("git commit", join(prov.git_commits)),
        ("packages", packages or "unknown"),
        ("device", join(prov.devices, "; ")),
        ("date", prov.dates[0] if prov.dates[0] == prov.dates[1] else " – ".join(prov.dates)),
        ("seeds", join(prov.seeds)),
    ] + ([("per-task storage", _storage_line(prov.task_storage))] if prov.task_storage else [])


def _storage_line(storage: dict[str, int]) -> str:
    """``emr 3.0 KiB, tall_masks 2.9 KiB per task`` (beside the shared merged model)."""
    sizes = ", ".join(f"{m} {_bytes(n)}" for m, n in sorted(storage.items()))
    return f"{sizes} per task, beside the shared merged model"


def _bytes(count: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


# --- documents ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Board:
    """One (suite, model) table ready to render in any format."""

    suite: str
    model: str
    summary: pd.DataFrame
    provenance: Provenance
    produced_by: str
    """The full command line that produced the document (its first line)."""

    @property
    def metric(self) -> str:
        """What the table's numbers are (``exact match``), from the registered suite's
        ``metric``; ``accuracy`` when the suite is not installed here."""
        from atmbench import registry

        suite = registry.suites().get(self.suite)
        return (suite.metric if suite else "accuracy").replace("_", " ")

    @property
    def title(self) -> str:
        return f"{self.suite} / {self.model}  (test {self.metric}, %)"

    @property
    def stem(self) -> str:
        return f"{self.suite}-{self.model}"


def board(frame: pd.DataFrame, produced_by: str) -> Board:
    """The board of one (suite, model) frame of store rows."""
    return Board(
        frame.suite.iloc[0], frame.model.iloc[0], table(frame), provenance(frame), produced_by
    )


def markdown_document(b: Board, images: Sequence[tuple[str, str]] = (), extra: str = "") -> str:
    """Produced-by line, title, table, plots (alt text, file name), provenance, ``extra``."""
    parts = [
        f"Produced by: `{b.produced_by}`",
        f"## {b.title}",
        render_markdown(b.summary),
        "Columns: tasks, `avg` = mean absolute accuracy, `norm. avg` = mean of merged / "
        "individual expert per task; mean ± std over `seeds`; **bold** = best merged value; "
        "`data` = data the method touched; `model` = `one` merged model, or `per-task` (a "
        "model per task: needs the task id at inference); `compute` = optimizer steps / "
        "fine-tuning the experts.",
        *([hparams_markdown(b.summary)] if hparams_lines(b.summary) else []),
        *metrics_markdown(b.summary),
        *(f"![{alt}]({name})" for alt, name in images),
        "### Provenance\n\n"
        + "\n".join(f"- {label}: `{value}`" for label, value in provenance_lines(b.provenance)),
    ]
    if extra:
        parts.append(extra)
    return "\n\n".join(parts) + "\n"


def _comment_block(b: Board, prefix: str) -> str:
    lines = [f"produced by: {b.produced_by}", b.title]
    lines += [f"{label}: {value}" for label, value in provenance_lines(b.provenance)]
    return "".join(f"{prefix} {line}\n" for line in lines)


def render_csv(b: Board) -> str:
    """Provenance as ``#`` comment lines, then one row per method; std columns beside means.

    ``pandas.read_csv(path, comment="#")`` reads it back.
    """
    s = b.summary
    out = pd.DataFrame(index=s.index)
    for col in s.columns:
        out[col] = s[col].round(4)
        out[f"{col} std"] = s.attrs["std"][col].round(4)
    out["data"] = s.attrs["data"]
    out["model"] = s.attrs["kind"]
    out["compute"] = s.attrs["compute"].round(4)
    out["seeds"] = s.attrs["seeds"]
    out["hparams"] = _hparams(s)
    for name, (mean, std) in s.attrs.get("metrics", {}).items():
        for col in mean.columns:
            out[f"{name} {col}"] = mean[col].round(4)
            out[f"{name} {col} std"] = std[col].round(4)
    buffer = io.StringIO()
    out.rename_axis("method").to_csv(buffer, lineterminator="\n")
    return _comment_block(b, "#") + buffer.getvalue()


def _number(value: float) -> float | None:
    return None if np.isnan(value) else round(float(value), 4)


def json_document(b: Board, reported: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """The table as plain data; reported figures only under their own key."""
    s = b.summary
    rows = [
        {
            "method": method,
            "mean": {col: _number(s.at[method, col]) for col in s.columns},
            "std": {col: _number(s.attrs["std"].at[method, col]) for col in s.columns},
            "data": s.attrs["data"].get(method),
            "model": s.attrs["kind"].get(method),
            "compute": _number(float(s.attrs["compute"].get(method, np.nan))),
            "seeds": int(s.attrs["seeds"].get(method)),
            "hparams": _hparams(s).get(method) or None,
        }
        for method in s.index
    ]
    metrics = s.attrs.get("metrics", {})
    for row in rows:  # only where a task declares more than one metric
        if metrics:
            row["metrics"] = {
                name: {
                    "mean": {col: _number(mean.at[row["method"], col]) for col in mean.columns},
                    "std": {col: _number(std.at[row["method"], col]) for col in std.columns},
                }
                for name, (mean, std) in metrics.items()
            }
    doc = {
        "kind": JSON_KIND,
        "suite": b.suite,
        "model": b.model,
        "metric": f"test {b.metric} (%)",
        "produced_by": b.produced_by,
        "columns": list(s.columns),
        "rows": rows,
        "provenance": asdict(b.provenance),
    }
    if metrics:
        doc["other_metrics"] = [f"test {name.replace('_', ' ')} (%)" for name in metrics]
    if reported:
        doc["reported_not_measured"] = list(reported)
    return doc


_LATEX_ESCAPES = {c: "\\" + c for c in "&%$#_{}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(c, c) for c in text)


def render_latex(b: Board) -> str:
    """A booktabs table (``\\usepackage{booktabs}``); rules set the reference rows apart."""
    s = b.summary
    head = " & ".join(latex_escape(h) for h in headers(s)) + r" \\"
    lines = [
        _comment_block(b, "%").rstrip("\n"),
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{latex_escape(b.suite)} / {latex_escape(b.model)}: test {b.metric} (\%), "
        r"mean $\pm$ std over seeds; best merged value in bold.}",
        r"\begin{tabular}{l" + "r" * len(s.columns) + "llrr}",
        r"\toprule",
        head,
        r"\midrule",
    ]
    previous = None
    for method, cells in _cells(s, pm=r"$\pm$"):
        group = "pretrained" if method == "pretrained" else method in REFERENCES
        if previous is not None and group != previous:
            lines.append(r"\midrule")
        previous = group
        texts = [rf"\textbf{{{t}}}" if bold else t for t, bold in cells]
        lines.append(" & ".join([latex_escape(method), *texts]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    lines += [f"% hyperparameters of {m}: {text}" for m, text in hparams_lines(s)]
    return "\n".join(lines) + "\n"


# --- publishing ---------------------------------------------------------------------------


def _reported_only(suite: str, model: str, fmt: str, produced_by: str) -> str:
    from atmbench import reported

    if fmt == "json":
        doc = {"kind": "atmbench-reported", "suite": suite, "model": model}
        return json.dumps(dict(doc, reported_not_measured=reported.as_dicts(suite, model)))
    return f"Produced by: `{produced_by}`\n\n{reported.render_markdown(suite, model)}\n"


def _plots(b: Board, out: Path, curves: dict[str, list[float]]) -> list[tuple[str, str]]:
    """Write the board's charts into ``out``; (alt text, file name) for the Markdown links."""
    from atmbench import plots

    columns = [c for c in b.summary.columns if c != NORM]
    bars = plots.task_bars(b.summary, columns, out / f"{b.stem}.png", b.title, b.metric)
    images = [(f"{b.suite} / {b.model}: test {b.metric} per task and method", bars.name)]
    if curves:
        styles = plots.method_styles([*b.summary.index, *curves])
        title = f"{b.suite} / {b.model}"
        path = plots.atm_curves(curves, out / f"{b.stem}-atm.png", title, styles, b.metric)
        caption = f"{b.suite} / {b.model}: ATM test {b.metric} per iteration"
        images.append((caption, path.name))
    return images


def _curves(cells: pd.DataFrame | None, suite: str, model: str) -> dict[str, list[float]]:
    """ATM-style accuracy curves from the stored traces of one (suite, model)."""
    from atmbench import plots

    if cells is None or cells.empty:
        return {}
    mine = cells[(cells.suite == suite) & (cells.model == model) & cells.trace.notna()]
    traces: dict[str, list] = {}
    for method, text in zip(mine.method, mine.trace, strict=True):
        trace = json.loads(text)
        if isinstance(trace, list) and any("accuracy" in r for r in trace):
            traces.setdefault(method, []).append(trace)
    return plots.trace_curves(traces)


def render(
    frame: pd.DataFrame,
    fmt: str,
    invocation: str,
    reported_pairs: Sequence[tuple[str, str]] = (),
    cells: pd.DataFrame | None = None,
    charts: Path | None = None,
) -> list[tuple[str, str]]:
    """Every (suite, model) of ``frame`` in one format: (file name, text) per document.

    With ``charts`` a Markdown table gets its PNG charts written there (ATM curves from the
    traces in ``cells``, the store's cells table). ``reported_pairs`` get a separate
    "reported, not measured" table, appended to their measured document or alone in
    ``<suite>-<model>-reported.<ext>``.
    """
    from atmbench import reported

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (valid: {', '.join(FORMATS)})")
    if reported_pairs and fmt not in ("md", "json"):
        raise ValueError(f"reported figures render as md or json, not {fmt!r}")
    texts: list[tuple[str, str]] = []
    measured = set()
    for (suite, model), group in frame.groupby(["suite", "model"], sort=True):
        measured.add((suite, model))
        b = board(group, f"{run_command(group)} && {invocation}")
        cited = (suite, model) in reported_pairs
        if fmt == "md":
            images = _plots(b, charts, _curves(cells, suite, model)) if charts else []
            extra = reported.render_markdown(suite, model) if cited else ""
            texts.append((f"{b.stem}.md", markdown_document(b, images, extra)))
        elif fmt == "json":
            doc = json_document(b, reported.as_dicts(suite, model) if cited else ())
            texts.append((f"{b.stem}.json", json.dumps(doc, indent=2, ensure_ascii=False)))
        else:
            render = render_csv if fmt == "csv" else render_latex
            texts.append((f"{b.stem}.{FORMATS[fmt]}", render(b)))
    for suite, model in reported_pairs:
        if (suite, model) not in measured:
            name = f"{suite}-{model}-reported.{FORMATS[fmt]}"
            texts.append((name, _reported_only(suite, model, fmt, invocation)))
    return texts


def render_text(
    frame: pd.DataFrame,
    fmt: str,
    invocation: str,
    reported_pairs: Sequence[tuple[str, str]] = (),
) -> list[str]:
    """The documents for standard output; JSON tables as one list."""
    texts = [text for _, text in render(frame, fmt, invocation, reported_pairs)]
    return ["[" + ",\n".join(texts) + "]"] if fmt == "json" else texts


def family(name: str) -> list[str]:
    """Every file name a leaderboard folder may hold for the board that ``name`` belongs to.

    Used to find stale members (e.g. an ATM chart the new store no longer draws), so that
    a folder never mixes one store's table with another's chart.
    """
    stem = name.rsplit(".", 1)[0].removesuffix("-atm").removesuffix("-reported")
    names = [f"{stem}.{ext}" for ext in (*FORMATS.values(), "png")]
    return names + [f"{stem}-atm.png", f"{stem}-reported.md", f"{stem}-reported.json"]


def write_set(
    frame: pd.DataFrame,
    invocation: str,
    folder: Path,
    reported_pairs: Sequence[tuple[str, str]] = (),
    cells: pd.DataFrame | None = None,
) -> list[str]:
    """The whole set into ``folder``: every format of every table, and the charts.

    Reported figures join the Markdown (alone when nothing was measured for them) and the
    JSON of measured tables. Returns the file names written.
    """
    measured = set(map(tuple, frame[["suite", "model"]].drop_duplicates().to_numpy()))
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for fmt in FORMATS:
        pairs = reported_pairs if fmt == "md" else ()
        if fmt == "json":
            pairs = [p for p in reported_pairs if p in measured]
        for name, text in render(frame, fmt, invocation, pairs, cells, folder):
            (folder / name).write_text(text if text.endswith("\n") else text + "\n")
            names.append(name)
    names += sorted(p.name for p in folder.glob("*.png"))
    return names


class PublishConflict(ValueError):
    """Files in the output folder differ from what would be written there."""


@dataclass(frozen=True)
class Published:
    written: list[Path]
    unchanged: list[Path]
    removed: list[Path]


def install(scratch: Path, names: Sequence[str], out: Path, overwrite: bool) -> Published:
    """Move the set rendered in ``scratch`` into ``out``, never silently replacing files.

    A file of ``out`` differs if it exists with other bytes, or belongs to a rendered
    board's family (see :func:`family`) but is not in the new set (it would be stale).
    Differences raise :class:`PublishConflict` naming them unless ``overwrite``; then they
    are replaced, and stale members removed, so the folder holds one consistent set.
    """
    new = set(names)
    stale = sorted({f for n in names for f in family(n)} - new)
    stale = [out / f for f in stale if (out / f).is_file()]
    changed = [out / n for n in names if (out / n).exists() and not _same(scratch / n, out / n)]
    if (changed or stale) and not overwrite:
        listed = ", ".join(p.name for p in [*changed, *stale])
        raise PublishConflict(
            f"{out}: {listed} already there and different from what this store renders "
            f"(not overwritten): pick a new --out folder, or pass --overwrite to replace "
            f"the whole set"
        )
    out.mkdir(parents=True, exist_ok=True)
    written, unchanged = [], []
    for name in names:
        target = out / name
        if target.exists() and _same(scratch / name, target):
            unchanged.append(target)
            continue
        partial = out / f".{name}.partial"
        shutil.copyfile(scratch / name, partial)
        os.replace(partial, target)  # a reader never sees half a file
        written.append(target)
    for path in stale:
        path.unlink()
    return Published(written, unchanged, stale)


def _same(a: Path, b: Path) -> bool:
    return b.is_file() and a.read_bytes() == b.read_bytes()
