"""The ``ray`` executor: every cell a Ray task; the driver alone writes the store.

Connects to ``--ray-address`` (or ``RAY_ADDRESS``) or starts a local Ray instance. A cell
asks for one GPU when the cluster has GPUs (or ``--device cuda``), else for one CPU. Each
Ray worker process keeps one :class:`~atmbench.runner.Workspace`, so the benchmarks it
loaded serve its later cells. On a cluster ``ATMBENCH_HOME`` must be a filesystem every
node shares, and atmbench with its plugins installed on every node: workers load plugins
from entry points, not from the driver's memory.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from atmbench.executors.base import Options, failed_record
from atmbench.spec import Cell
from atmbench.store import CellRecord


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ValueError(
            "the ray executor needs Ray: pip install 'atmbench[ray]' "
            "(valid executors without it: local, multi-gpu)"
        ) from None
    return ray


@functools.cache
def _workspace(home: str, device: str, progress: bool, trace: tuple[str, ...]):
    """One workspace per Ray worker process and (home, device): benchmarks load once."""
    import torch

    from atmbench.runner import Workspace

    return Workspace(Path(home), torch.device(device), progress, trace)


def _run_cell(cell: Cell, home: str, device: str, trace: tuple[str, ...]) -> CellRecord:
    """The body of one Ray task (CUDA_VISIBLE_DEVICES already names the GPU Ray gave it)."""
    from atmbench.runner import execute

    return execute(cell, _workspace(home, device, False, trace))


def _gpus_per_cell(device: str | None, cluster: dict[str, Any]) -> int:
    have = cluster.get("GPU", 0)
    if device is None:
        return 1 if have else 0
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r} is invalid for the ray executor (valid: cpu, cuda)")
    if kind == "cuda" and not have:
        raise ValueError(
            f"--device {device!r} requested but the Ray cluster has no GPU (valid: cpu)"
        )
    return 1 if kind == "cuda" else 0


def execute_ray(cells: Iterator[Cell], options: Options) -> Iterator[CellRecord]:
    """Submit cells as Ray tasks, at most ``workers`` (default: the cluster's slots) at once."""
    ray = _import_ray()
    if options.workers is not None and options.workers < 1:
        raise ValueError(f"--workers {options.workers} is invalid: expected an integer >= 1")
    owned = not ray.is_initialized()
    if owned:
        local = {} if options.ray_address else {"num_cpus": options.workers}
        ray.init(
            address=options.ray_address,
            include_dashboard=False,
            logging_level="ERROR",
            log_to_driver=False,
            **{k: v for k, v in local.items() if v is not None},
        )
    pending: dict[Any, Cell] = {}
    try:
        cluster = ray.cluster_resources()
        gpus = _gpus_per_cell(options.device, cluster)
        slots = max(1, int(cluster.get("GPU" if gpus else "CPU", 1)))
        task = ray.remote(_run_cell).options(num_gpus=gpus, num_cpus=0 if gpus else 1)
        device = "cuda" if gpus else "cpu"
        limit = options.workers or slots
        source = iter(cells)
        exhausted = False
        while True:
            while len(pending) < limit and not exhausted:
                cell = next(source, None)
                if cell is None:
                    exhausted = True
                    break
                pending[task.remote(cell, str(options.home), device, options.trace)] = cell
            if not pending:
                break
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(ready)
            try:
                record = ray.get(ready)
            except Exception as exc:  # noqa: BLE001 - a lost task fails its cell, not the grid
                record = failed_record(cell, f"{type(exc).__name__}: {exc}")
            yield record
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        if owned:
            ray.shutdown()


execute_ray.parallel = True  # run_grid hands it each expert as a job of its own
