"""The ``atmbench`` command line: a thin layer over the runner, the store and the leaderboard."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click

DEFAULT_SUITE = "digits8"
DEFAULT_METHODS = "average,ta"
DEBUG_ENV = "ATMBENCH_DEBUG"


def _friendly(fn):
    """Known failures become one-line errors; set ATMBENCH_DEBUG=1 for the traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from atmbench.cache import CacheCorrupt
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
@click.option("--dry-run", is_flag=True, help="Print the grid and exit.")
@click.option("--force", is_flag=True, help="Recompute cells already in the store.")
@click.option("--device", default=None, help="torch device (default: cuda if available).")
@click.option(
    "--store",
    "store_path",
    type=click.Path(path_type=Path),
    default=None,
    help="SQLite result store (default: $ATMBENCH_HOME/results.sqlite).",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_friendly
def run(suite, methods, model, seeds, dry_run, force, device, store_path, quiet):
    """Run a grid of cells and print its leaderboard."""
    from atmbench import config, runner, spec
    from atmbench.leaderboard import render_markdown, table
    from atmbench.store import ResultStore

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(
            f"{seeds!r} is not a comma-separated list of integers", param_hint="--seeds"
        ) from None
    cells = runner.plan(suite, model, spec.split_specs(methods), seed_list)
    _warn_plugin_errors()
    store = ResultStore(store_path or config.default_store())
    if dry_run:
        for cell in cells:
            state = "done" if store.done(cell.key) else "to run"
            click.echo(f"{cell.suite}  {cell.model}  seed={cell.seed}  {cell.method:<24} {state}")
        return
    ws = runner.Workspace(config.home(), config.pick_device(device), progress=not quiet)

    def report(record):
        status = "ok" if record.status == "ok" else f"FAILED: {record.error}"
        click.echo(
            f"  {record.method} (seed {record.seed}): {status} [{record.wall_time_s:.1f}s]",
            err=True,
        )

    summary = runner.run(cells, store, ws, force=force, on_record=report)
    frame = store.frame(suite=suite, model=cells[0].model)
    frame = frame[frame.cell_key.isin({c.key for c in cells})]
    if not frame.empty:
        click.echo(f"\n## {suite} / {cells[0].model}  (test accuracy, %)\n")
        click.echo(render_markdown(table(frame)))
    click.echo(
        f"\n{summary.ran} cell(s) run, {summary.skipped} reused from the store, "
        f"{len(summary.failed)} failed.",
        err=True,
    )
    if summary.failed:
        sys.exit(1)


@cli.command()
@click.option(
    "--store",
    "store_path",
    type=click.Path(path_type=Path),
    default=None,
    help="SQLite result store (default: $ATMBENCH_HOME/results.sqlite).",
)
@click.option("--suite", default=None, help="Only this suite.")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Write one Markdown file per (suite, model) into this directory.",
)
@_friendly
def leaderboard(store_path, suite, out):
    """Re-render leaderboard tables from stored results."""
    from atmbench import config
    from atmbench.leaderboard import render_markdown, table
    from atmbench.store import ResultStore

    frame = ResultStore(store_path or config.default_store()).frame()
    if suite:
        frame = frame[frame.suite == suite]
    if frame.empty:
        raise click.ClickException("no results stored yet: run 'atmbench run' first")
    for (suite_name, model), group in frame.groupby(["suite", "model"], sort=True):
        text = f"## {suite_name} / {model}  (test accuracy, %)\n\n{render_markdown(table(group))}\n"
        if out:
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"{suite_name}-{model}.md"
            path.write_text(text)
            click.echo(f"wrote {path}")
        else:
            click.echo(text)
