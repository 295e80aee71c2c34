"""What every executor shares: options, cell order, the driver that alone writes the store.

An executor only turns cells into records. It pulls cells lazily from an iterator (so a
cell finished meanwhile by another ``atmbench run`` on the same home is skipped at the
moment it would be dispatched) and yields each record as soon as it is back. The driver
writes every record in its own SQLite transaction as it arrives, so killing the process
loses at most the cells in flight.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from atmbench import registry
from atmbench.refiner import TRACE
from atmbench.runner import ExpertJob
from atmbench.spec import Cell
from atmbench.store import CellRecord, ResultStore


@dataclass(frozen=True)
class Options:
    """How to execute: where the caches live, on which device(s), with how many workers."""

    home: Path
    device: str | None = None
    """torch device for local, worker device type for the others; ``None``: CUDA if present."""
    progress: bool = True
    workers: int | None = None
    """Cells in flight at once (multi-gpu: worker processes); ``None``: one per device."""
    ray_address: str | None = None
    trace: tuple[str, ...] = TRACE
    """Splits refiners score after every iteration (``--trace``)."""


@dataclass
class Summary:
    """What :func:`run_grid` did: cells run and skipped, and the records of failed ones."""

    ran: int = 0
    skipped: int = 0
    failed: list[CellRecord] = field(default_factory=list)


log = logging.getLogger(__name__)


class Executor(Protocol):
    def __call__(self, cells: Iterator[Cell], options: Options) -> Iterator[CellRecord]:
        """Execute cells pulled from ``cells``; yield each record when it finishes."""


def needs_experts(cell: Cell) -> bool:
    """Whether the cell reads the expert cache (the reference rows other than ``experts`` don't)."""
    if isinstance(cell.spec, str):
        return cell.spec == "experts"
    return cell.spec.method is not None


def trains(cell: Cell) -> bool:
    """Whether the cell may fine-tune something shared by its group (experts or the MTL model)."""
    return needs_experts(cell) or cell.spec == "mtl"


def group_key(cell: Cell) -> tuple[str, str, int]:
    """Cells of one group share the same experts, so they are scheduled together."""
    return (cell.suite, cell.model, cell.seed)


def expert_jobs(cells: Sequence[Cell]) -> list[ExpertJob]:
    """One job per task of each (suite, model, seed) whose cells need fine-tuned experts.

    Imported experts (``--experts``) are read, not trained: no jobs. A job whose expert is
    already cached finds it so and returns at once.
    """
    jobs: dict[tuple, ExpertJob] = {}
    for cell in cells:
        if needs_experts(cell) and not cell.identity.get("experts"):
            for task in registry.get_suite(cell.suite).tasks:
                job = ExpertJob(cell.suite, cell.model, cell.seed, task)
                jobs.setdefault((job.suite, job.model, job.seed, task), job)
    return list(jobs.values())


def schedule(cells: Sequence[Cell]) -> list[Cell]:
    """Cells in the order to dispatch them.

    First, per (suite, model, seed) group, the cells that fine-tune: the first one needing
    the experts, then the MTL cell, one group after the other, so that parallel workers
    train different groups' experts at the same time instead of queueing on one group's
    locks. Then the remaining cells group by group: by then their experts are cached (or
    being trained under the cache's file lock, which makes the cells wait rather than
    train them again).
    """
    groups: dict[tuple[str, str, int], list[Cell]] = {}
    for cell in cells:
        groups.setdefault(group_key(cell), []).append(cell)
    leads: list[Cell] = []
    for group in groups.values():
        first_expert = next((c for c in group if needs_experts(c)), None)
        leads += [c for c in group if c is first_expert or c.spec == "mtl"]
    lead_keys = {c.key for c in leads}
    rest = [c for group in groups.values() for c in group if c.key not in lead_keys]
    return leads + rest


def failed_record(cell: Cell, error: str) -> CellRecord:
    """The record of a cell that never produced one (its worker died, Ray lost the task)."""
    return CellRecord(
        cell.key,
        cell.suite,
        cell.model,
        cell.method,
        cell.seed,
        cell.config(),
        status="failed",
        error=error,
    )


class Interrupted(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that workers are stopped and Ray shut down."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_grid(
    cells: Iterable[Cell],
    store: ResultStore,
    executor: Executor,
    options: Options,
    force: bool = False,
    on_record: Callable[[CellRecord], None] | None = None,
    on_job: Callable[[CellRecord], None] | None = None,
) -> Summary:
    """Execute the cells not yet in the store (all of them with ``force``); write each record.

    Only this process writes the store, one transaction per cell. SIGINT and SIGTERM raise
    :class:`KeyboardInterrupt` here after the executor has stopped its workers. An executor
    that runs several things at once (``parallel``) first gets one :class:`ExpertJob` per
    expert the pending cells need, so that a seed's experts train side by side.
    """
    summary = Summary()
    ordered = schedule(list(cells))
    jobs: list[ExpertJob] = []
    if getattr(executor, "parallel", False):
        jobs = expert_jobs([c for c in ordered if force or not store.done(c.key)])
    job_keys = {job.key for job in jobs}

    def pending() -> Iterator[Cell | ExpertJob]:
        yield from jobs
        for cell in ordered:
            if not force and store.done(cell.key):
                summary.skipped += 1
                continue
            yield cell

    with _sigterm_raises(), contextlib.closing(executor(pending(), options)) as records:
        for record in records:
            if record.cell_key in job_keys:  # a cell needing it trains it again or fails
                if record.status != "ok":
                    log.warning("expert job %s failed: %s", record.method, record.error)
                if on_job:
                    on_job(record)
                continue
            store.write(record)
            summary.ran += 1
            if record.status != "ok":
                summary.failed.append(record)
            if on_record:
                on_record(record)
    return summary
