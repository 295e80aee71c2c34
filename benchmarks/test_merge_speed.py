"""Data-free merges over ViT-B-32-shaped task vectors (8 tasks, CPU), against the read floor.

Run: ``pytest benchmarks/test_merge_speed.py --benchmark-enable``. Each method's time is
reported as a multiple of the floor, the time to read every task-vector byte once (a
bandwidth-bound sum), read right before each round: the median of the paired ratios. Peak
memory is measured in a fresh process per method: total RSS (which counts the touched pages
of the memory-mapped task-vector files) and the peak of the memory the process allocated
itself, as a multiple of one model's size (a streaming merge with ``combine(consume=True)``
should stay near 2: base and merged model, plus one block per task).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

import atmbench

sys.path.insert(0, str(Path(__file__).parent))
from tower import TASKS, merge_once, read_all, write_tower  # noqa: E402

DATA_FREE = sorted(n for n, m in atmbench.methods().items() if m.data == "none" and not m.needs)
SVD = {"tsv", "iso_c", "iso_cts"}
RESULTS: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="session")
def tower(tmp_path_factory):
    directory = tmp_path_factory.mktemp("vit-b-32-tower")
    base, files = write_tower(directory)
    return directory, base, files


def _floor(files: list[Path]) -> float:
    """Best of two reads of every task-vector byte."""
    times = []
    for _ in range(2):
        started = time.perf_counter()
        read_all(files)
        times.append(time.perf_counter() - started)
    return min(times)


@pytest.mark.parametrize("name", DATA_FREE)
def test_merge_time(benchmark, tower, name):
    """Each round reads the floor, then merges: the ratio of a pair compares a merge and a
    read in the same phase of a shared machine (whose speed drifts by 2x over minutes, and
    whose VM pages out files cold for ~30 s); the median over the rounds is reported."""
    directory, base, files = tower
    floors: list[float] = []
    times: list[float] = []
    benchmark.pedantic(
        lambda: times.append(merge_once(directory, name)),
        setup=lambda: floors.append(_floor(files)),
        rounds=1 if name in SVD else 5,
        iterations=1,
    )
    ratios = sorted(t / f for t, f in zip(times, floors, strict=True))
    median = statistics.median(ratios)
    benchmark.extra_info.update(x_floor=median, x_floor_range=[ratios[0], ratios[-1]])
    RESULTS.setdefault(name, {}).update(
        x_floor=median, low=ratios[0], high=ratios[-1], seconds=min(times), floor=min(floors)
    )
    RESULTS["read floor"] = {"model_gb": base.stat().st_size / 2**30}
    print(
        f"\n{name}: {median:.2f}x the read floor (median of {len(ratios)} paired rounds, "
        f"{ratios[0]:.2f}x to {ratios[-1]:.2f}x); best {min(times):.2f} s, "
        f"floor {min(floors):.3f} s"
    )


@pytest.mark.parametrize("name", DATA_FREE)
def test_peak_rss(tower, name):
    directory, base, _ = tower
    out = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "tower.py"), str(directory), name],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    peak_gb, anon_gb = float(out[1]), float(out[2])
    model_gb = base.stat().st_size / 2**30
    RESULTS.setdefault(name, {}).update(peak_rss_gb=peak_gb, x_model=anon_gb / model_gb)
    print(
        f"\n{name}: peak RSS {peak_gb:.2f} GB (mapped task-vector pages included), "
        f"peak anonymous {anon_gb:.2f} GB = {anon_gb / model_gb:.2f}x one model"
    )
    # Streaming: base + the merged model (written into the merged task vector) + a block
    # per task (+ a whole-tensor method's temporaries), never the T models FusionBench holds.
    assert anon_gb < 4 * model_gb


def pytest_terminal_summary_lines() -> list[str]:
    lines = [
        "method | time / read floor: median of paired rounds (range) | peak RSS (GB) | "
        "peak anonymous RSS / one model"
    ]
    for name, r in RESULTS.items():
        if name == "read floor":
            continue
        lines.append(
            f"{name} | {r.get('x_floor', float('nan')):.2f}x ({r.get('low', float('nan')):.2f}"
            f"–{r.get('high', float('nan')):.2f}; best {r.get('seconds', 0):.2f} s, "
            f"floor {r.get('floor', float('nan')):.3f} s) | "
            f"{r.get('peak_rss_gb', float('nan')):.2f} | {r.get('x_model', float('nan')):.2f}x"
        )
    if "read floor" in RESULTS:
        lines.append(f"read floor: {TASKS} x {RESULTS['read floor']['model_gb']:.2f} GB")
    return lines
