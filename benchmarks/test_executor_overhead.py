"""Per-cell overhead of each executor, as ratios against ``local`` measured in the same run.

Run: ``pytest benchmarks/test_executor_overhead.py --benchmark-enable``. The cell is trivial
(``average`` / ``ta`` with a fixed coefficient on digits8 vit-micro, experts cached), so the
time is mostly the executor's own: starting workers (spawned processes, a local Ray
instance), loading the benchmark in each, shipping cells and records. Each executor runs a
1-cell and a 5-cell grid from a cold start; ``startup`` is the 1-cell time less one cell,
``per cell`` the marginal time of the four extra cells.
"""

from __future__ import annotations

import os

import pytest
import torch

from atmbench import runner
from atmbench.executors import Options, get_executor, run_grid
from atmbench.store import ResultStore

SPECS = ["average", "ta:lam=0.1", "ta:lam=0.2", "ta:lam=0.3", "ta:lam=0.4"]
EXECUTORS = {"local": None, "multi-gpu": 2, "ray": 2}
"""Executor -> workers."""
RESULTS: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A home whose vit-micro backbone and experts exist: cells only merge and evaluate."""
    home = tmp_path_factory.mktemp("overhead-home")
    os.environ["ATMBENCH_HOME"] = str(home)
    torch.set_num_threads(1)
    cells = runner.plan("digits8", "vit-micro", ["average"], [0])
    store = ResultStore(home / "warm.sqlite")
    run_grid(cells, store, get_executor("local"), Options(home, "cpu", progress=False))
    yield home
    del os.environ["ATMBENCH_HOME"]


def _grid(home, name: str, count: int, store: ResultStore) -> None:
    cells = [c for c in runner.plan("digits8", "vit-micro", SPECS, [0]) if c.method in SPECS]
    options = Options(home, "cpu", progress=False, workers=EXECUTORS[name])
    summary = run_grid(cells[:count], store, get_executor(name), options, force=True)
    assert summary.ran == count and not summary.failed


@pytest.mark.parametrize("name", list(EXECUTORS))
@pytest.mark.parametrize("count", [1, len(SPECS)])
def test_executor_grid_time(benchmark, home, tmp_path, name, count):
    if name == "ray":
        pytest.importorskip("ray")
    torch.set_num_threads(1)
    store = ResultStore(tmp_path / "overhead.sqlite")
    benchmark.pedantic(_grid, args=(home, name, count, store), rounds=1, iterations=1)
    RESULTS.setdefault(name, {})[f"grid{count}"] = benchmark.stats.stats.min


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    """Print the ratios after the module's benchmarks (benchmarks/README.md quotes them)."""
    yield
    full = {n: r for n, r in RESULTS.items() if {"grid1", f"grid{len(SPECS)}"} <= r.keys()}
    if "local" not in full:
        return
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")

    def split(r: dict[str, float]) -> tuple[float, float]:
        per_cell = (r[f"grid{len(SPECS)}"] - r["grid1"]) / (len(SPECS) - 1)
        return r["grid1"] - per_cell, per_cell

    local_start, local_cell = split(full["local"])
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        reporter.section("executor overhead (ratios vs local, measured in this run)")
        for name, r in full.items():
            start, cell = split(r)
            reporter.write_line(
                f"{name:<10} startup {start / local_start:6.1f}x local   "
                f"per cell {cell / local_cell:5.2f}x local   "
                f"(local: startup {local_start:.2f}s, per cell {local_cell:.2f}s)"
            )
