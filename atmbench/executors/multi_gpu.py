"""The ``multi-gpu`` executor: one worker process per device, cells handed out one by one.

Each worker is a spawned process with its own :class:`~atmbench.runner.Workspace` on its
device (``cuda:i``; on a CPU-only machine ``--workers N`` CPU processes, which is how it is
tested). The parent gives a cell to an idle worker, gets the record back and alone writes
the store. Workers that need the same experts at the same time wait on the expert
cache's file lock, so each expert is fine-tuned once. A worker that dies (out of memory,
a crash in native code) fails only its cell and is replaced.
"""

from __future__ import annotations

import os
import queue
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from atmbench.config import pick_device
from atmbench.executors.base import Options, failed_record
from atmbench.spec import Cell
from atmbench.store import CellRecord

POLL_S = 0.5
"""How often the parent checks that its workers are alive while waiting for a record."""


def worker_devices(device: str | None, workers: int | None) -> list[str]:
    """One device string per worker: round-robin over visible GPUs, else ``workers`` CPUs."""
    if workers is not None and workers < 1:
        raise ValueError(f"--workers {workers} is invalid: expected an integer >= 1")
    chosen = pick_device(device)
    if chosen.type != "cuda":
        return [str(chosen)] * (workers or 1)
    if chosen.index is not None:
        return [str(chosen)] * (workers or 1)
    count = torch.cuda.device_count()
    return [f"cuda:{i % count}" for i in range(workers or count)]


def _worker_main(
    index: int,
    device: str,
    home: str,
    progress: bool,
    trace: tuple[str, ...],
    threads: int,
    inbox: Any,
    results: Any,
    parent: int,
) -> None:
    """Execute cells from ``inbox`` until ``None``, or until the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    from atmbench.runner import Workspace, execute

    torch.set_num_threads(threads)
    ws = Workspace(Path(home), torch.device(device), progress, trace)
    while True:
        try:
            cell = inbox.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # orphaned by kill -9: nobody would store the result
                return
            continue
        if cell is None:
            return
        results.put((index, execute(cell, ws)))


@dataclass
class _Worker:
    index: int
    device: str
    process: Any
    inbox: Any


def _start(ctx, index: int, device: str, options: Options, threads: int, results) -> _Worker:
    inbox = ctx.Queue()
    progress = options.progress and (options.workers or 1) == 1
    home, trace = str(options.home), options.trace
    args = (index, device, home, progress, trace, threads, inbox, results, os.getpid())
    process = ctx.Process(target=_worker_main, args=args, daemon=True, name=f"atmbench-{index}")
    process.start()
    return _Worker(index, device, process, inbox)


def _stop(workers: list[_Worker], clean: bool) -> None:
    """Ask idle workers to exit; terminate whatever is still running (a cell in flight)."""
    for worker in workers:
        if clean and worker.process.is_alive():
            worker.inbox.put(None)
    for worker in workers:
        worker.process.join(timeout=10 if clean else 0)
        if worker.process.is_alive():
            worker.process.terminate()
            worker.process.join(timeout=5)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()


def execute_multi_gpu(cells: Iterator[Cell], options: Options) -> Iterator[CellRecord]:
    """Hand cells (and expert jobs) to idle workers; yield records in the order they finish."""
    devices = worker_devices(options.device, options.workers)
    threads = max(1, torch.get_num_threads() // len(devices))
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    workers = [_start(ctx, i, d, options, threads, results) for i, d in enumerate(devices)]
    idle = list(reversed(workers))
    busy: dict[int, Cell] = {}
    source = iter(cells)
    exhausted = clean = False
    try:
        while True:
            while idle and not exhausted:
                cell = next(source, None)
                if cell is None:
                    exhausted = True
                    break
                worker = idle.pop()
                if not worker.process.is_alive():  # died between cells: replace it
                    worker = workers[worker.index] = _start(
                        ctx, worker.index, worker.device, options, threads, results
                    )
                worker.inbox.put(cell)
                busy[worker.index] = cell
            if not busy:
                break
            try:
                index, record = results.get(timeout=POLL_S)
            except queue.Empty:
                for index, cell in list(busy.items()):
                    worker = workers[index]
                    if worker.process.is_alive():
                        continue
                    del busy[index]
                    code = worker.process.exitcode
                    workers[index] = _start(ctx, index, worker.device, options, threads, results)
                    idle.append(workers[index])
                    yield failed_record(
                        cell, f"WorkerDied: worker {index} on {worker.device} exited with {code}"
                    )
                continue
            del busy[index]
            idle.append(workers[index])
            yield record
        clean = True
    finally:
        _stop(workers, clean)


execute_multi_gpu.parallel = True  # run_grid hands it each expert as a job of its own
