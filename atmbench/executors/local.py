"""The ``local`` executor: one cell at a time, in this process, on one device."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence

from atmbench.config import pick_device
from atmbench.executors.base import Options, Summary, run_grid
from atmbench.runner import Workspace, execute
from atmbench.spec import Cell
from atmbench.store import CellRecord, ResultStore


def execute_local(
    cells: Iterator[Cell], options: Options, ws: Workspace | None = None
) -> Iterator[CellRecord]:
    """Run the cells in order; ``ws`` lets a caller reuse benchmarks it already loaded."""
    if options.workers not in (None, 1):
        raise ValueError(
            f"--workers {options.workers}: the local executor runs one cell at a time "
            "(valid: 1; use --executor multi-gpu or ray for more)"
        )
    ws = ws or Workspace(options.home, pick_device(options.device), options.progress, options.trace)
    for cell in cells:
        yield execute(cell, ws)


def run_local(
    cells: Sequence[Cell],
    store: ResultStore,
    ws: Workspace,
    force: bool = False,
    on_record: Callable[[CellRecord], None] | None = None,
) -> Summary:
    """Execute the cells not yet in the store (all of them with ``force``) in this process,
    on the benchmarks ``ws`` already loaded: the ``local`` executor for Python callers."""
    options = Options(ws.home, str(ws.device), ws.progress, trace=ws.trace)
    local = functools.partial(execute_local, ws=ws)
    return run_grid(cells, store, local, options, force=force, on_record=on_record)
