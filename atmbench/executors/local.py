"""The ``local`` executor: one cell at a time, in this process, on one device."""

from __future__ import annotations

from collections.abc import Iterator

from atmbench.config import pick_device
from atmbench.executors.base import Options
from atmbench.runner import Workspace, execute
from atmbench.spec import Cell
from atmbench.store import CellRecord


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
