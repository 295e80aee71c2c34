"""Executors: where a grid's cells run (``--executor local|multi-gpu|ray``).

Every executor gives the same numbers for the same cells; they differ only in how many
cells run at once and where. Modules are imported on first use, so Ray is needed only
by the ``ray`` executor.
"""

from __future__ import annotations

import importlib

from atmbench.executors.base import Executor, Options, Summary, run_grid, schedule

EXECUTORS = {
    "local": "atmbench.executors.local:execute_local",
    "multi-gpu": "atmbench.executors.multi_gpu:execute_multi_gpu",
    "ray": "atmbench.executors.ray_tasks:execute_ray",
}

__all__ = ["EXECUTORS", "Executor", "Options", "Summary", "get_executor", "run_grid", "schedule"]


def get_executor(name: str) -> Executor:
    """The executor registered under ``name``; a one-line error lists the valid names."""
    if name not in EXECUTORS:
        raise ValueError(f"unknown executor {name!r} (valid: {', '.join(EXECUTORS)})")
    module, _, function = EXECUTORS[name].partition(":")
    return getattr(importlib.import_module(module), function)
