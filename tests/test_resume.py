"""Never lose work: kill real ``atmbench run`` processes, run two at once, then check the store.

Subprocesses run with one torch thread (see tests/test_executors.py) over a copy of, or
the session's shared home itself, whose vit-micro experts are trained once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from atmbench.cli import cli

TINY = ["--model", "vit-micro", "--quiet"]
METHODS = "average,ta:lam=0.1,ta:lam=0.2,ta:lam=0.3,ta:lam=0.4,ta:lam=0.5"
CELLS = 3 + 6  # the reference rows (pretrained, experts, mtl) and six methods
REFERENCES = "('pretrained', 'experts', 'mtl')"


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def atmbench(home: Path, *args: str, **kwargs) -> subprocess.Popen:
    """A real ``atmbench run`` process on ``home``."""
    env = dict(os.environ, ATMBENCH_HOME=str(home), OMP_NUM_THREADS="1")
    command = [sys.executable, "-c", "from atmbench.cli import cli; cli()", "run", *args]
    return subprocess.Popen(command, env=env, **kwargs)


def query(store: Path, sql: str) -> list[tuple]:
    if not store.exists():
        return []
    with sqlite3.connect(store, timeout=30) as con:
        try:
            return con.execute(sql).fetchall()
        except sqlite3.OperationalError as exc:  # polled before the run made its tables
            if "no such table" in str(exc):
                return []
            raise


def method_cells_done(store: Path) -> int:
    sql = f"SELECT COUNT(*) FROM cells WHERE status = 'ok' AND method NOT IN {REFERENCES}"
    found = query(store, sql)
    return found[0][0] if found else 0


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def rows(store: Path) -> dict[tuple[str, str, str], float]:
    sql = "SELECT method, task, split, accuracy FROM rows"
    return {(m, t, s): a for m, t, s, a in query(store, sql)}


def assert_complete_and_unique(store: Path) -> None:
    assert query(store, "PRAGMA integrity_check") == [("ok",)]
    assert query(store, "SELECT COUNT(*), SUM(status = 'ok') FROM cells") == [(CELLS, CELLS)]
    per_cell = query(store, "SELECT cell_key, COUNT(*) FROM results GROUP BY cell_key")
    assert sorted(n for _, n in per_cell) == [16] * CELLS  # 8 tasks x (val, test), no duplicates


@pytest.fixture(scope="module")
def reference(shared_home, tmp_path_factory) -> dict:
    """Rows of an uninterrupted in-process run; trains the shared home's experts if needed."""
    store = tmp_path_factory.mktemp("resume") / "uninterrupted.sqlite"
    os.environ["ATMBENCH_HOME"] = str(shared_home)
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(
            cli, ["run", *TINY, "--methods", METHODS, "--store", str(store)]
        )
    finally:
        del os.environ["ATMBENCH_HOME"]
    assert result.exit_code == 0, result.output
    assert_complete_and_unique(store)
    return rows(store)


def test_kill9_mid_grid_then_rerun_completes_with_identical_numbers(
    reference, shared_home, tmp_path, monkeypatch
):
    store = tmp_path / "killed.sqlite"
    proc = atmbench(shared_home, *TINY, "--methods", METHODS, "--store", str(store))
    wait_for(lambda: method_cells_done(store) >= 1)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    stored = query(store, "SELECT COUNT(*) FROM cells")[0][0]
    assert 4 <= stored < CELLS  # killed mid-grid: references and >= 1 method done, not all
    assert query(store, "PRAGMA integrity_check") == [("ok",)]

    monkeypatch.setenv("ATMBENCH_HOME", str(shared_home))
    result = CliRunner().invoke(cli, ["run", *TINY, "--methods", METHODS, "--store", str(store)])
    assert result.exit_code == 0, result.output
    summary = f"{CELLS - stored} cell(s) run, {stored} reused from the store, 0 failed."
    assert summary in result.output
    assert_complete_and_unique(store)
    assert rows(store) == reference


def _expert_dirs(home: Path) -> dict[str, Path]:
    """task -> cached expert directory (seed 0) of vit-micro."""
    found = {}
    for meta in (home / "experts" / "digits8" / "vit-micro").glob("*/meta.json"):
        key = json.loads(meta.read_text())["key"]
        if key["seed"] == 0:
            found[key["task"]] = meta.parent
    return found


def test_two_concurrent_runs_on_one_home_train_each_expert_once(reference, shared_home, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(shared_home, home, ignore=shutil.ignore_patterns("results.sqlite*"))
    experts = _expert_dirs(home)
    for task in ("mirror", "parity"):  # both runs need these two experts at the same time
        shutil.rmtree(experts[task])
    args = ("--model", "vit-micro", "--methods", "average,ta:lam=0.3")
    procs = [atmbench(home, *args, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    trained = {t: sum(f"expert {t}" in e for e in errors) for t in ("mirror", "parity", "shift")}
    assert trained == {"mirror": 1, "parity": 1, "shift": 0}
    assert sorted(_expert_dirs(home)) == sorted(experts)  # eight experts, each intact
    store = home / "results.sqlite"
    assert query(store, "PRAGMA integrity_check") == [("ok",)]
    assert query(store, "SELECT COUNT(*), SUM(status = 'ok') FROM cells") == [(5, 5)]
    duplicates = "SELECT 1 FROM results GROUP BY cell_key, task, split HAVING COUNT(*) > 1"
    assert query(store, duplicates) == []
    assert query(store, "SELECT COUNT(*) FROM results") == [(5 * 16,)]
    mine = rows(store)
    assert mine == {k: v for k, v in reference.items() if k[0] in set(m for m, _, _ in mine)}


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def _gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status  # a zombie waits only for its reaper


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill9"])
def test_killing_a_multi_gpu_run_leaves_no_worker_behind(reference, shared_home, tmp_path, sig):
    if not Path("/proc/self/task").exists():
        pytest.skip("needs /proc to find the worker processes")
    store = tmp_path / "multi.sqlite"
    args = ("--methods", METHODS, "--store", str(store), "--executor", "multi-gpu")
    proc = atmbench(shared_home, *TINY, *args, "--workers", "2", stderr=subprocess.PIPE, text=True)
    wait_for(lambda: method_cells_done(store) >= 1)
    workers = _children(proc.pid)
    assert len(workers) >= 2
    proc.send_signal(sig)
    stderr = proc.communicate(timeout=60)[1]
    if sig == signal.SIGTERM:
        assert proc.returncode == 130
        assert "Interrupted: finished cells are stored" in stderr
    else:
        assert proc.returncode == -signal.SIGKILL
    wait_for(lambda: all(_gone(p) for p in workers), timeout=60)
    assert query(store, "PRAGMA integrity_check") == [("ok",)]
    assert rows(store).items() <= reference.items()  # whatever was stored is right


def test_kill9_while_experts_train_then_rerun_matches_an_uninterrupted_run(
    reference, shared_home, tmp_path
):
    """Crash inside fine-tuning; the re-run retrains what was lost and gets the same numbers,
    which also checks that training is deterministic across processes on the CPU.

    Three experts are missing from a copy of the shared home: the run is killed once the
    first of them is stored, while it fine-tunes the second (a fresh home would train all
    eight, twice, for the same proof)."""
    home = tmp_path / "home"
    shutil.copytree(shared_home, home, ignore=shutil.ignore_patterns("results.sqlite*"))
    experts = _expert_dirs(home)
    missing = ("invert", "mod3", "shift")
    for task in missing:
        shutil.rmtree(experts[task])
    store = home / "results.sqlite"
    proc = atmbench(home, *TINY, "--methods", METHODS)
    wait_for(lambda: len(_expert_dirs(home)) >= 6, timeout=600)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert 6 <= len(_expert_dirs(home)) < 8  # one retrained, killed while tuning the next
    assert query(store, "SELECT COUNT(*) FROM cells WHERE method NOT IN " + REFERENCES) == [(0,)]
    rerun = atmbench(home, *TINY, "--methods", METHODS)
    assert rerun.wait(timeout=900) == 0
    assert sorted(_expert_dirs(home)) == sorted(experts)
    assert_complete_and_unique(store)
    assert rows(store) == reference
