"""The ``atmbench`` command line: a thin layer over the runner, the store and the leaderboard."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click

DEFAULT_SUITE = "digits8"
DEFAULT_METHODS = "average,ta,ties,tsv,iso_c,atm,ties+atm,tsv+atm"
DEBUG_ENV = "ATMBENCH_DEBUG"

store_option = click.option(
    "--store",
    "store_path",
    type=click.Path(path_type=Path),
    default=None,
    help="SQLite result store (default: $ATMBENCH_HOME/results.sqlite).",
)
suite_filter_option = click.option("--suite", default=None, help="Only this suite.")


def _friendly(fn):
    """Known failures become one-line errors; set ATMBENCH_DEBUG=1 for the traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from atmbench.cache import CacheCorrupt
        from atmbench.config import HomeError
        from atmbench.hparams import HParamError
        from atmbench.method import MergeInputError
        from atmbench.plugins import PluginError
        from atmbench.spec import SpecError
        from atmbench.suite import SuiteDataError

        known = (
            SpecError,
            HParamError,
            PluginError,
            SuiteDataError,
            MergeInputError,
            CacheCorrupt,
            HomeError,
            ValueError,
        )
        try:
            return fn(*args, **kwargs)
        except known as exc:
            if os.environ.get(DEBUG_ENV):
                raise
            raise click.ClickException(str(exc)) from None

    return wrapper


def _warn_plugin_errors() -> None:
    from atmbench.plugins import errors

    for line in errors():
        click.secho(f"Warning: {line}", fg="yellow", err=True)


@click.group()
@click.version_option(package_name="atmbench")
def cli():
    """Benchmark model-merging methods on equal terms."""


@cli.command(name="list")
@_friendly
def list_command():
    """Show every registered method, refiner and suite with the package it came from."""
    from atmbench.registry import registered_methods, registered_refiners, registered_suites

    sections = (
        ("Methods", registered_methods()),
        ("Refiners", registered_refiners()),
        ("Suites", registered_suites()),
    )
    for title, items in sections:
        click.echo(f"{title}:")
        for name, reg in sorted(items.items()):
            item = reg.item
            extra = f" [data: {item.data}]" if hasattr(item, "data") else ""
            if getattr(item, "aliases", ()):
                extra += f" (also: {', '.join(item.aliases)})"
            click.echo(f"  {name:<14} {item.description}{extra}  — {reg.source}")
    _warn_plugin_errors()


@cli.command()
@click.option("--suite", default=DEFAULT_SUITE, show_default=True, help="Task suite.")
@click.option(
    "--methods",
    default=DEFAULT_METHODS,
    show_default=True,
    help="Comma-separated method specs, e.g. 'ta:lam=0.3,ties,ties+atm'.",
)
@click.option("--model", default=None, help="Backbone (default: the suite's first model).")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds.")
@click.option(
    "--no-mtl",
    is_flag=True,
    help="Skip the mtl reference row (a multi-task model trained on all tasks' data: "
    "the longest step after the experts); pretrained and experts stay.",
)
@click.option("--dry-run", is_flag=True, help="Print the grid and exit.")
@click.option("--force", is_flag=True, help="Recompute cells already in the store.")
@click.option("--device", default=None, help="torch device (default: cuda if available).")
@store_option
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option(
    "--experts",
    "experts_source",
    default=None,
    help="Import published experts instead of fine-tuning: hub:ORG/PREFIX or a folder.",
)
@click.option(
    "--executor",
    default="local",
    show_default=True,
    help="Where cells run: local (this process), multi-gpu (a worker per GPU), ray.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Cells at once: multi-gpu worker processes (default: one per GPU, 1 on CPU); "
    "ray tasks in flight (default: the cluster's GPUs or CPUs).",
)
@click.option(
    "--ray-address",
    default=None,
    help="Ray cluster to connect to (default: $RAY_ADDRESS, else start a local instance).",
)
@click.option(
    "--trace",
    type=click.Choice(["val", "test"]),
    default="val",
    show_default=True,
    help="What ATM's per-iteration trace scores: val after every round (test once, at the "
    "end), or test too, for the test curve (atmbench analyze, the leaderboard's ATM chart).",
)
@_friendly
def run(
    suite,
    methods,
    model,
    seeds,
    no_mtl,
    dry_run,
    force,
    device,
    store_path,
    quiet,
    executor,
    workers,
    ray_address,
    experts_source,
    trace,
):
    """Run a grid of cells and print its leaderboard."""
    from atmbench import config, executors, runner, spec
    from atmbench.executors.preview import dry_run_lines
    from atmbench.leaderboard import render_markdown, table
    from atmbench.refiner import TRACE_CHOICES
    from atmbench.store import ResultStore

    execute_cells = executors.get_executor(executor)
    explicit_store = store_path is not None
    seed_list = parse_seeds(seeds)
    cells = runner.plan(suite, model, spec.split_specs(methods), seed_list, experts_source)
    if no_mtl:
        cells = [c for c in cells if c.method != "mtl"]
    _warn_plugin_errors()
    home = config.usable_home()
    store_path = _writable_store(store_path or config.default_store())
    store = ResultStore(store_path)
    if dry_run:
        for line in dry_run_lines(cells, store, home, force):
            click.echo(line)
        return
    if quiet:
        os.environ[config.QUIET_ENV] = "1"  # suites' own bars, in worker processes too
    options = executors.Options(home, device, not quiet, workers, ray_address, TRACE_CHOICES[trace])

    def report(record):
        status = "ok" if record.status == "ok" else f"FAILED: {record.error}"
        click.echo(
            f"  {record.method} (seed {record.seed}): {status} [{record.wall_time_s:.1f}s]",
            err=True,
        )

    try:
        summary = executors.run_grid(
            cells, store, execute_cells, options, force=force, on_record=report
        )
    except KeyboardInterrupt:
        click.echo(
            "\nInterrupted: finished cells are stored; run the same command again to "
            "complete the grid.",
            err=True,
        )
        sys.exit(130)
    frame = store.frame(suite=suite, model=cells[0].model)
    frame = frame[frame.cell_key.isin({c.key for c in cells})]
    if not frame.empty:
        click.echo(f"\n## {suite} / {cells[0].model}  (test accuracy, %)\n")
        click.echo(render_markdown(table(frame)))
        gap = _gap_line(frame)
        if gap:
            click.echo(f"\n{gap}")
    click.echo(
        f"\n{summary.ran} cell(s) run, {summary.skipped} reused from the store, "
        f"{len(summary.failed)} failed.",
        err=True,
    )
    for line in next_steps(store_path, explicit_store, cells):
        click.echo(line, err=True)
    if summary.failed:
        sys.exit(1)


MAX_SEED = 2**32 - 1


def parse_seeds(text: str) -> list[int]:
    """``0,1,2`` -> [0, 1, 2]; anything else is a one-line error naming the bad value."""
    valid = f"comma-separated integers from 0 to {MAX_SEED}, e.g. 0,1,2"
    seeds = []
    for part in text.split(","):
        try:
            seed = int(part.strip())
        except ValueError:
            seed = None
        if seed is None or not 0 <= seed <= MAX_SEED:
            raise click.BadParameter(
                f"{part.strip()!r} is not a valid seed (valid: {valid})", param_hint="--seeds"
            )
        seeds.append(seed)
    return list(dict.fromkeys(seeds))


def _writable_store(path: Path) -> Path:
    """The store's path once its folder is known usable (created if missing)."""
    from atmbench import config

    config.usable_dir(Path(path).parent)
    if Path(path).is_dir():
        raise config.HomeError(f"result store {path} is a directory, not a SQLite file")
    return Path(path)


def next_steps(store_path: Path, explicit_store: bool, cells) -> list[str]:
    """Where the results are and what to run next, printed after a run's table."""
    import shlex

    store = ["--store", str(store_path)] if explicit_store else []
    lines = [
        f"Results are stored in {store_path} (a re-run skips the cells already there).",
        "Next: "
        + shlex.join(["atmbench", "leaderboard", *store, "--out", "my-leaderboard"])
        + "  (Markdown, CSV, JSON, LaTeX and charts of everything stored)",
    ]
    if any("atm" in str(c.method) for c in cells):
        lines.append(
            "      "
            + shlex.join(["atmbench", "analyze", *store, "--out", "figures"])
            + "  (ATM's accuracy per iteration and task-vector cosines)"
        )
    return lines


def _gap_line(frame) -> str | None:
    """Pretrained, best merged and experts' mean test score: the gap merging tries to close."""
    means = frame.groupby("method").accuracy.mean()
    if not {"pretrained", "experts"} <= set(means.index):
        return None
    merged = means.drop(["pretrained", "experts", "mtl"], errors="ignore")
    best = f" | best merged {merged.max():.1f} ({merged.idxmax()})" if len(merged) else ""
    return (
        f"mean test score: pretrained {means['pretrained']:.1f}{best} "
        f"| experts {means['experts']:.1f}"
    )


def _leaderboard_invocation(suite, fmt, data, reported, out) -> str:
    """The render command written atop each document (store, merges and --overwrite left
    out: they only say where the cells came from and whether files may be replaced)."""
    import shlex

    args = ["atmbench", "leaderboard"]
    args += ["--suite", suite] if suite else []
    args += ["--format", fmt] if fmt and fmt != "md" else []
    args += ["--data", data] if data else []
    args += ["--reported"] if reported else []
    args += ["--out", str(out)] if out else []
    return shlex.join(args)


@cli.command()
@store_option
@suite_filter_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["md", "csv", "json", "latex"]),
    default=None,
    help="What to print: Markdown (default), CSV, JSON or LaTeX (booktabs). "
    "--out writes every format instead.",
)
@click.option(
    "--data",
    default=None,
    help="Only methods with this data access, comma-separated from none,validation,train,"
    "test-unlabeled (test-time adaptation on the test inputs); the reference rows are always "
    "shown.",
)
@click.option(
    "--reported",
    is_flag=True,
    help="Add the papers' reported figures as a separate, cited table (md and json only).",
)
@click.option(
    "--merge",
    "merge_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="First ingest this store file or 'atmbench export' JSON (repeatable); "
    "cells already in the store are kept.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write the whole set into this folder: per (suite, model) .md with PNG charts, "
    ".csv, .json and .tex. Refuses to replace files that differ, unless --overwrite.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="With --out: replace files that differ (and remove the set's stale charts).",
)
@_friendly
def leaderboard(store_path, suite, fmt, data, reported, merge_files, out, overwrite):
    """Re-render leaderboard tables from stored results."""
    import tempfile

    import pandas as pd

    from atmbench import config, exchange
    from atmbench import reported as reported_figures
    from atmbench.leaderboard import filter_data, install, render_text, write_set
    from atmbench.store import ResultStore

    if out and fmt:
        raise click.UsageError("--out writes every format; --format picks what is printed")
    if overwrite and not out:
        raise click.UsageError("--overwrite applies to the files of --out")
    path = config.existing_store(store_path)
    if merge_files:
        path = _writable_store(store_path or config.default_store())
    store = ResultStore(path) if path else None
    for merge_file in merge_files:
        merged = exchange.merge(store, merge_file)
        click.echo(
            f"merged {merge_file}: {merged.added} cell(s) added, {merged.skipped} already stored",
            err=True,
        )
    frame = (
        store.frame()
        if store
        else pd.DataFrame(columns=["suite", "model", "method", "data_access"])
    )
    if suite:
        frame = frame[frame.suite == suite]
    if data:
        frame = filter_data(frame, [d.strip() for d in data.split(",") if d.strip()])
    pairs = [p for p in reported_figures.pairs() if not suite or p[0] == suite] if reported else []
    if frame.empty and not pairs:
        where = store_path or config.default_store()
        raise click.ClickException(
            f"no results stored yet{'' if path else f' (no store at {where})'}: "
            "run 'atmbench run' first"
        )
    invocation = _leaderboard_invocation(suite, fmt, data, reported, out)
    if not out:
        for text in render_text(frame, fmt or "md", invocation, pairs):
            click.echo(text)
        return
    cells = store.cells(("ok",)) if store else None
    with tempfile.TemporaryDirectory(prefix="atmbench-leaderboard-") as scratch:
        names = write_set(frame, invocation, Path(scratch), pairs, cells)
        done = install(Path(scratch), names, out, overwrite)
    for written in done.written:
        click.echo(f"wrote {written}")
    for removed in done.removed:
        click.echo(f"removed {removed} (stale: not in this set)")
    if done.unchanged:
        click.echo(f"{len(done.unchanged)} file(s) in {out} already up to date", err=True)


@cli.command()
@store_option
@suite_filter_option
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the JSON here (default: standard output).",
)
@_friendly
def export(store_path, suite, out):
    """Export finished cells as JSON that 'atmbench leaderboard --merge' ingests."""
    import json

    from atmbench import config, exchange

    path = store_path or config.default_store()
    if not Path(path).exists():
        raise click.ClickException(f"no result store at {path}")
    doc = exchange.export(path, suite)
    if not doc["cells"]:
        which = f" for suite {suite!r}" if suite else ""
        raise click.ClickException(f"no finished cells{which} in {path}")
    text = json.dumps(doc, indent=1)
    if out:
        out.write_text(text + "\n")
        click.echo(f"wrote {len(doc['cells'])} cell(s) to {out}", err=True)
    else:
        click.echo(text)


@cli.command()
@click.option("--suite", required=True, help="Suite to fetch, e.g. vision8.")
@click.option("--model", default=None, help="Backbone (default: the suite's first model).")
@_friendly
def download(suite, model):
    """Fetch a suite's weights and datasets now, so later runs work offline."""
    from atmbench import config, registry

    suite_obj = registry.get_suite(suite)
    model = suite_obj.check_model(model or suite_obj.models[0])
    if suite_obj.download is None:
        click.echo(f"{suite} is embedded in atmbench: nothing to download.")
        return
    tasks = suite_obj.download(model, config.home())
    click.echo(f"{suite} / {model}: {len(tasks)} task(s) ready under {config.home()}")


@cli.command()
@store_option
@suite_filter_option
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("analysis"),
    show_default=True,
    help="Directory for the PNG figures.",
)
@_friendly
def analyze(store_path, suite, out):
    """ATM's per-iteration accuracy curves and task-vector cosine heat-maps, as PNG."""
    from atmbench import analysis, config
    from atmbench.store import ResultStore

    cells = ResultStore(store_path or config.default_store()).cells(statuses=("ok",))
    if suite:
        cells = cells[cells.suite == suite]
    traced = cells[cells.trace.notna() & cells.method.str.contains("atm")]
    if traced.empty:
        raise click.ClickException("no ATM cells stored: run e.g. 'atmbench run --methods atm'")
    out.mkdir(parents=True, exist_ok=True)
    for cell in traced.itertuples():
        trace = analysis.parse_trace(cell.trace)
        stem = f"{cell.suite}-{cell.model}-{cell.method}-seed{cell.seed}".replace(":", "_")
        title = f"{cell.method} on {cell.suite}/{cell.model}, seed {cell.seed}"
        split = "test" if "test" in trace[0]["accuracy"] else "val"
        analysis.plot_accuracy(trace, out / f"{stem}-accuracy.png", split, title=title)
        analysis.plot_cosines(trace, out / f"{stem}-cosines.png", title=title)
        click.echo(f"\n## {title}\n")
        click.echo(analysis.summary(trace).to_markdown(floatfmt=".3f"))
        click.echo(f"\nwrote {out / stem}-accuracy.png and -cosines.png")


@cli.command(name="merge")
@click.argument("spec")
@click.option("--base", required=True, help="Base model: a folder or a hub id (ORG/NAME).")
@click.option(
    "--experts",
    required=True,
    help="Comma-separated fine-tuned models (folders or hub ids) of the base.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="New folder for the merged checkpoint.",
)
@click.option("--device", default="cpu", show_default=True, help="Where to merge: cpu, cuda.")
@click.option("--seed", default=0, show_default=True, help="Seed of random masks (DARE).")
@click.option(
    "--shard-size",
    default="2GB",
    show_default=True,
    help="Tensor bytes per output safetensors file.",
)
@_friendly
def merge_command(spec, base, experts, out, device, seed, shard_size):
    """Merge Hugging Face checkpoints with a data-free method, e.g. 'ties:k=0.2'.

    Reads the models tensor by tensor (they need not fit in memory) and writes sharded
    safetensors with the base's config and tokenizer files.
    """
    from atmbench.api import merge_checkpoints

    names = [e.strip() for e in experts.split(",") if e.strip()]
    files = merge_checkpoints(
        spec, base, names, out, device=device, seed=seed, shard_size=shard_size
    )
    click.echo(f"merged {len(names)} expert(s) into {out} ({len(files)} safetensors file(s))")
