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

import os
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
SVD = {"tsv", "iso_c", "iso_cts", "cart", "wudi"}
"""Whole-tensor methods with SVDs or optimisation (WUDI: 300 Adam steps per matrix): one round."""
RESULTS: dict[str, dict[str, float]] = {}


FUSIONBENCH_PYTHON = os.environ.get("ATMBENCH_FUSIONBENCH_PYTHON")
BEFORE_SRC = os.environ.get("ATMBENCH_BEFORE_SRC")
HERE = Path(__file__).parent


@pytest.fixture(scope="session")
def tower(tmp_path_factory):
    kept = os.environ.get("ATMBENCH_TOWER_DIR")
    directory = Path(kept) if kept else tmp_path_factory.mktemp("vit-b-32-tower")
    files = [directory / f"task{t}.safetensors" for t in range(TASKS)]
    if kept and all(f.exists() for f in [directory / "base.safetensors", *files]):
        return directory, directory / "base.safetensors", files
    blocks = os.environ.get("ATMBENCH_TOWER_BLOCKS")
    base, files = write_tower(directory, int(blocks) if blocks else None)
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


def _fresh_process(command: list[str], env: dict[str, str] | None = None) -> tuple[float, ...]:
    """(seconds, peak RSS GB, peak anonymous RSS GB) printed by a one-merge process."""
    out = subprocess.run(
        command, capture_output=True, text=True, check=True, env=env
    ).stdout.split()
    return float(out[-3]), float(out[-2]), float(out[-1])


WUDI_STEPS = int(os.environ.get("ATMBENCH_WUDI_STEPS", "300"))
ANCHORED = {
    "tsv": "fusionbench.tsv",
    "iso_c": "fusionbench.iso_c",
    "iso_cts": "fusionbench.iso_cts",
    f"wudi:scope=matrices,steps={WUDI_STEPS}": "fusionbench.wudi",
    "magmax": "fusionbench.magmax",
    "model_stock:average=angle": "fusionbench.model_stock",
    "emr": "fusionbench.emr",
    "tall_masks": "fusionbench.tall_masks",
    "model_stock": "mergekit.model_stock",
    "della": "mergekit.della",
    "cart": "official.cart",
    "pcb": "official.pcb",
    "ta+lines": "official.lines",
}
"""atmbench's spec -> the anchor (``anchor_merge.ANCHORS``) that computes the same merge:
FusionBench 0.2.33 where it has the method (WUDI with its scope, Model Stock with its
averaged angles), mergekit 0.1.5 (Model Stock's averaged cosines, DELLA), else the
authors' code (CART, PCB, LiNeS: FusionBench 0.2.33 has none of them)."""
ANCHOR_PYTHON = {
    "fusionbench": FUSIONBENCH_PYTHON,
    "mergekit": os.environ.get("ATMBENCH_MERGEKIT_PYTHON"),
    "official": os.environ.get("ATMBENCH_OFFICIAL_PYTHON"),
}


@pytest.mark.parametrize("spec", list(ANCHORED))
def test_against_anchor(benchmark, tower, spec):
    """The read floor, the anchor's merge, then ours, each merge in a fresh process (then the
    ``before`` checkout's): ratios of timings taken a minute apart on the same inputs. The
    anchor's Python comes from ATMBENCH_FUSIONBENCH_PYTHON, ATMBENCH_MERGEKIT_PYTHON or
    ATMBENCH_OFFICIAL_PYTHON (with ATMBENCH_{CART,PCB,LINES}_SRC, see ``anchor_merge.py``)."""
    anchor = ANCHORED[spec]
    python = ANCHOR_PYTHON[anchor.split(".")[0]]
    if not python:
        pytest.skip(f"no Python for {anchor} (see anchor_merge.py)")
    directory, base, files = tower
    figures: dict[str, tuple[float, ...]] = {}
    command = [python, str(HERE / "anchor_merge.py"), str(directory), anchor, str(WUDI_STEPS)]
    ours = [sys.executable, str(HERE / "tower.py"), str(directory), spec]

    def setup() -> None:
        figures["floor"] = (_floor(files),)
        figures[anchor] = _fresh_process(command)

    benchmark.pedantic(
        lambda: figures.update(ours=_fresh_process(ours)), setup=setup, rounds=1, iterations=1
    )
    if BEFORE_SRC:
        # the other checkout's own tower.py: today's may import modules it lacks
        env = {**os.environ, "PYTHONPATH": BEFORE_SRC}
        before = [sys.executable, str(Path(BEFORE_SRC) / "benchmarks" / "tower.py"), *ours[2:]]
        figures["before"] = _fresh_process(before, env)
    model_gb = base.stat().st_size / 2**30
    result = {
        "anchor": anchor,
        "floor": figures["floor"][0],
        "x_anchor": figures["ours"][0] / figures[anchor][0],
        "x_anchor_rss": figures["ours"][1] / figures[anchor][1],
        **{f"{who}_s_rss_anon": v for who, v in figures.items() if who != "floor"},
    }
    benchmark.extra_info.update(result)
    RESULTS.setdefault(spec, {}).update(result)
    for who, (seconds, peak, anon) in ((k, v) for k, v in figures.items() if k != "floor"):
        print(
            f"\n{spec} {who}: {seconds:.2f} s = {seconds / result['floor']:.1f}x the read floor, "
            f"peak RSS {peak:.2f} GB, anonymous {anon:.2f} GB = {anon / model_gb:.2f}x one model"
        )
    print(
        f"{spec}: {result['x_anchor']:.3f}x {anchor}'s time, {result['x_anchor_rss']:.2f}x its RSS"
    )


def pytest_terminal_summary_lines() -> list[str]:
    lines = [
        "method | time / read floor: median of paired rounds (range) | peak RSS (GB) | "
        "peak anonymous RSS / one model"
    ]
    for name, r in RESULTS.items():
        if name == "read floor" or not {"x_floor", "x_model"} & set(r):
            continue
        lines.append(
            f"{name} | {r.get('x_floor', float('nan')):.2f}x ({r.get('low', float('nan')):.2f}"
            f"–{r.get('high', float('nan')):.2f}; best {r.get('seconds', 0):.2f} s, "
            f"floor {r.get('floor', float('nan')):.3f} s) | "
            f"{r.get('peak_rss_gb', float('nan')):.2f} | {r.get('x_model', float('nan')):.2f}x"
        )
    for name, r in RESULTS.items():
        if "x_anchor" in r:
            ours, anchor = r["ours_s_rss_anon"], r[f"{r['anchor']}_s_rss_anon"]
            before = (
                f", before {r['before_s_rss_anon'][0]:.2f} s" if "before_s_rss_anon" in r else ""
            )
            lines.append(
                f"{name} | {r['x_anchor']:.3f}x {r['anchor']}'s time ({ours[0]:.2f} s against "
                f"{anchor[0]:.2f} s{before}; floor {r['floor']:.3f} s) | RSS {ours[1]:.2f} GB "
                f"against {anchor[1]:.2f} GB ({r['x_anchor_rss']:.2f}x)"
            )
    if "read floor" in RESULTS:
        lines.append(f"read floor: {TASKS} x {RESULTS['read floor']['model_gb']:.2f} GB")
    return lines
