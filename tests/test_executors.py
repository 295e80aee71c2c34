"""Executors: registry, cell order, the expert lock across processes, equal numbers everywhere.

Grids run on ``vit-micro`` over the session's shared home, whose experts are trained once;
each test writes its own store. One torch thread per process: on a loaded 2-core machine
two threads per process are many times slower, and the numbers do not depend on it.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from atmbench import registry, runner
from atmbench.cli import cli
from atmbench.executors import Options, get_executor, run_grid, schedule
from atmbench.executors.base import expert_jobs
from atmbench.executors.multi_gpu import execute_multi_gpu, worker_devices
from atmbench.hookspecs import hookimpl
from atmbench.method import MergeMethod
from atmbench.store import ResultStore

TINY = ["--model", "vit-micro", "--quiet"]
SEED0_TASKS = ("rotate90", "mirror", "invert", "patch_shuffle", "parity", "mod3", "noise", "shift")
METHODS = "average,ta:lam=0.3"


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def invoke(*args):
    return CliRunner().invoke(cli, ["run", *TINY, *args], catch_exceptions=False)


def rows(store) -> dict[tuple[str, str, str], float]:
    """(method, task, split) -> accuracy of every stored successful row."""
    with sqlite3.connect(store) as con:
        query = "SELECT method, task, split, accuracy FROM rows"
        return {(m, t, s): a for m, t, s, a in con.execute(query)}


@pytest.fixture(scope="module")
def reference(shared_home, tmp_path_factory):
    """Rows of an uninterrupted local run; also leaves experts and MTL in the shared home."""
    store = tmp_path_factory.mktemp("reference") / "local.sqlite"
    os.environ["ATMBENCH_HOME"] = str(shared_home)
    torch.set_num_threads(1)
    try:
        assert invoke("--methods", METHODS, "--store", str(store)).exit_code == 0
    finally:
        del os.environ["ATMBENCH_HOME"]
    found = rows(store)
    assert len(found) == 5 * 8 * 2  # (pretrained, experts, mtl, average, ta) x 8 tasks x 2 splits
    return found


def test_unknown_executor_is_one_line_error(home):
    result = CliRunner().invoke(cli, ["run", *TINY, "--executor", "nope"])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: unknown executor 'nope' (valid: local, multi-gpu, ray)"
    with pytest.raises(ValueError, match=r"unknown executor 'gpu' \(valid: local, multi-gpu"):
        get_executor("gpu")


def test_local_executor_refuses_several_workers(home):
    result = CliRunner().invoke(cli, ["run", *TINY, "--workers", "2"])
    assert result.exit_code == 1
    assert "--workers 2: the local executor runs one cell at a time (valid: 1" in result.output


def test_schedule_puts_the_training_cells_of_each_seed_first():
    cells = runner.plan("digits8", "vit-micro", ["average", "ta"], [0, 1])
    assert [(c.method, c.seed) for c in cells][:5] == [
        ("pretrained", 0),
        ("experts", 0),
        ("mtl", 0),
        ("average", 0),
        ("ta", 0),
    ]
    assert [(c.method, c.seed) for c in schedule(cells)] == [
        ("experts", 0),
        ("mtl", 0),
        ("experts", 1),
        ("mtl", 1),
        ("pretrained", 0),
        ("average", 0),
        ("ta", 0),
        ("pretrained", 1),
        ("average", 1),
        ("ta", 1),
    ]


def test_expert_jobs_one_per_task_of_each_seed_that_needs_experts():
    cells = runner.plan("digits8", "vit-micro", ["average", "ta"], [0, 1])
    jobs = expert_jobs(cells)
    tasks = registry.get_suite("digits8").tasks
    assert [(j.seed, j.task) for j in jobs] == [(s, t) for s in (0, 1) for t in tasks]
    assert len({j.key for j in jobs}) == 16 and jobs[1].method == "expert:mirror"
    references = [c for c in cells if c.method in ("pretrained", "mtl")]
    assert expert_jobs(references) == []  # nothing there reads the experts
    imported = runner.plan("digits8", "vit-micro", ["ta"], [0], experts="hub:org/x")
    assert expert_jobs(imported) == []  # imported experts are read, not trained


def test_multi_gpu_trains_one_seeds_experts_as_parallel_jobs(reference, shared_home, tmp_path):
    """Missing experts train as jobs on both workers at once, and equal the local ones."""
    home = tmp_path / "home"
    shutil.copytree(shared_home, home, ignore=shutil.ignore_patterns("results.sqlite*"))
    missing = ("rotate90", "mirror", "invert")  # the first jobs: one to each idle worker
    for meta in (home / "experts" / "digits8" / "vit-micro").glob("*/meta.json"):
        key = json.loads(meta.read_text())["key"]
        if key["seed"] == 0 and key["task"] in missing:
            shutil.rmtree(meta.parent)
    cells = runner.plan("digits8", "vit-micro", ["ta:lam=0.3"], [0])
    cells = [c for c in cells if c.method in ("experts", "ta:lam=0.3")]
    store = tmp_path / "jobs.sqlite"
    jobs = []
    options = Options(home, "cpu", progress=False, workers=2)
    summary = run_grid(cells, ResultStore(store), execute_multi_gpu, options, on_job=jobs.append)
    assert (summary.ran, summary.failed) == (2, [])  # the jobs are not cells
    assert sorted(r.method for r in jobs) == sorted(f"expert:{t}" for t in SEED0_TASKS)
    assert all(r.status == "ok" for r in jobs)
    trained = {r.trace[0]["task"]: r.trace[0]["pid"] for r in jobs if r.trace[0]["trained"]}
    # The first two jobs start on both idle workers before any cell is handed out; the
    # third may lose its expert's lock to the `experts` cell (the other worker reaches that
    # cell after five cached jobs), which then trains it once, under the lock, instead.
    assert set(missing[:2]) <= set(trained) <= set(missing)
    assert trained[missing[0]] != trained[missing[1]]  # spread over both workers
    assert rows(store) == {k: v for k, v in reference.items() if k[0] in ("experts", "ta:lam=0.3")}
    # the local executor trains in the cell, as before: no jobs
    assert not getattr(get_executor("local"), "parallel", False)
    assert get_executor("multi-gpu").parallel and get_executor("ray").parallel


def test_cpu_workers_and_gpu_round_robin(monkeypatch):
    assert worker_devices("cpu", 3) == ["cpu", "cpu", "cpu"]
    assert worker_devices("cpu", None) == ["cpu"]
    with pytest.raises(ValueError, match="--workers 0 is invalid"):
        worker_devices("cpu", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert worker_devices(None, None) == ["cuda:0", "cuda:1"]
    assert worker_devices("cuda", 3) == ["cuda:0", "cuda:1", "cuda:0"]
    assert worker_devices("cuda:1", 2) == ["cuda:1", "cuda:1"]


LOCKED_ENTRY = """
import sys, time
from pathlib import Path
import torch
from atmbench.cache import EntryCache

root, log, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
(root / f"ready-{name}").touch()
while not (root / "go").exists():
    time.sleep(0.01)

def compute():
    with open(log, "a") as f:
        f.write(name + "\\n")
    time.sleep(1.5)
    return {"w": torch.full((2,), 7.0)}, {"by": name}

started = time.perf_counter()
fields = {"suite": "s", "model": "m", "task": "t", "seed": 0}
_, meta, created = EntryCache(root).get_or_create(fields, compute)
print(created, meta["by"], round(time.perf_counter() - started, 2))
"""


def test_expert_cache_lock_makes_a_second_process_wait_instead_of_training(tmp_path):
    """The mechanism that keeps parallel workers from fine-tuning one expert twice."""
    log = tmp_path / "computed.log"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", LOCKED_ENTRY, str(tmp_path), str(log), name],
            stdout=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready-{n}").exists() for n in "ab"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    (tmp_path / "go").touch()
    outputs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(log.read_text().split()) == 1  # computed once
    winner = log.read_text().strip()
    created = {name: out for name, out in zip("ab", outputs, strict=True)}
    assert created[winner][:2] == ["True", winner]
    loser = "b" if winner == "a" else "a"
    assert created[loser][:2] == ["False", winner]  # read the winner's entry
    assert float(created[loser][2]) > 1.0  # it waited on the lock while the winner computed


class Boom:
    @hookimpl
    def register_methods(self, register):
        def merge(base, task_vectors, ctx):
            raise RuntimeError("boom")

        register(MergeMethod(name="boom", merge=merge, data="none", description="fails"))


def test_failing_plugin_method_fails_its_cell_only(reference, use_shared_home, tmp_path, register):
    store = tmp_path / "failing.sqlite"
    with register(Boom(), "boom"):
        result = CliRunner().invoke(
            cli, ["run", *TINY, "--methods", f"{METHODS},boom", "--store", str(store)]
        )
    assert result.exit_code == 1
    assert "6 cell(s) run, 0 reused from the store, 1 failed." in result.output
    assert "boom (seed 0): FAILED: RuntimeError: boom" in result.output
    with sqlite3.connect(store) as con:
        status = dict(con.execute("SELECT method, status FROM cells"))
        error = con.execute("SELECT error FROM cells WHERE method = 'boom'").fetchone()[0]
    assert status == {
        m: "ok" for m in ("pretrained", "experts", "mtl", "average", "ta:lam=0.3")
    } | {"boom": "failed"}
    assert error == "RuntimeError: boom"
    assert rows(store) == reference  # the failure changed nothing else


def test_multi_gpu_with_two_cpu_workers_matches_local(reference, use_shared_home, tmp_path):
    store = tmp_path / "multi.sqlite"
    result = invoke(
        "--methods", METHODS, "--store", str(store), "--executor", "multi-gpu", "--workers", "2"
    )
    assert result.exit_code == 0, result.output
    assert "5 cell(s) run, 0 reused from the store, 0 failed." in result.output
    assert rows(store) == reference
    with sqlite3.connect(store) as con:
        devices = {d for (d,) in con.execute("SELECT device FROM cells")}
    assert len(devices) == 1 and "1 threads" in devices.pop()  # each worker: half the threads


def test_ray_on_a_local_instance_matches_local(reference, use_shared_home, tmp_path):
    pytest.importorskip("ray")
    store = tmp_path / "ray.sqlite"
    result = invoke(
        "--methods", METHODS, "--store", str(store), "--executor", "ray", "--workers", "2"
    )
    assert result.exit_code == 0, result.output
    assert "5 cell(s) run, 0 reused from the store, 0 failed." in result.output
    assert rows(store) == reference


def test_dry_run_says_which_experts_are_trained_and_which_reused(
    reference, use_shared_home, tmp_path
):
    store = str(tmp_path / "empty.sqlite")
    result = invoke("--methods", METHODS, "--seeds", "0,1", "--store", store, "--dry-run")
    assert result.exit_code == 0
    tasks = "rotate90, mirror, invert, patch_shuffle, parity, mod3, noise, shift"
    lines = result.output.splitlines()
    assert f"experts  vit-micro  seed=0  train 0: -  |  reuse 8: {tasks}" in lines
    assert f"experts  vit-micro  seed=1  train 8: {tasks}  |  reuse 0: -" in lines
