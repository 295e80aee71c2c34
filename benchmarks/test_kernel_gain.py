"""Each Numba kernel against the plain torch/numpy code it replaces, on the same inputs.

Run: ``pytest benchmarks/test_kernel_gain.py --benchmark-enable``. A kernel costs a
compilation on a fresh install (cached after) and code to maintain, so it stays only where
it clearly wins: each case reports plain time / kernel time, the median of rounds that run
the two back to back (a shared machine's speed drifts; a ratio in one round does not).

Inputs are what the streaming loop hands a kernel for a ViT-B-32 tower: 8 tasks, blocks of
``streaming.BLOCK`` entries per task; the threshold cases take a whole parameter and TIES'
sample; TIES' exact fallback (a histogram of the float bits) takes a whole parameter of
bf16 differences, against ``torch.bincount`` (the kernel's torch form). One thread (the
kernels follow torch's count): on a shared, oversubscribed machine torch's parallel regions
stall on each other and would inflate the plain side's time.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from atmbench import kernels, torch_kernels
from atmbench.default_plugins.methods.masking import band_limits, middle_band
from atmbench.method import TensorContext
from atmbench.streaming import BLOCK

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
import reference  # noqa: E402

TASKS = 8
RESULTS: dict[str, float] = {}


def _block(cols: int = 768) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(BLOCK // cols, cols, generator=gen) * 1e-3 for _ in range(TASKS)]


def _ties() -> tuple[Callable, Callable]:
    tv = _block()
    stacked = torch.stack(tv)
    thresholds = torch.full((TASKS,), 1.3e-3)
    out = torch.empty(tv[0].shape)

    def plain():
        trimmed = reference.trim(stacked, thresholds)
        return reference.disjoint_merge(trimmed, reference.elect_sign(trimmed, -1.0), "mean")

    return lambda: kernels.ties_merge(tv, thresholds, -1.0, True, out), plain


def _dare() -> tuple[Callable, Callable]:
    tv = _block()
    stacked = torch.stack(tv)
    ctx = TensorContext("w", tuple(str(t) for t in range(TASKS)), seed=1)
    seeds = [ctx.task_seed(t) for t in range(TASKS)]
    out = torch.empty(stacked.shape)

    def plain():
        return reference.dare_rescale(stacked, reference.dare_keep_masks(stacked, ctx, 0.5), 0.5)

    return lambda: kernels.dare(tv, seeds, 0, 0.5, out), plain


def _consensus() -> tuple[Callable, Callable]:
    tv = _block()
    stacked = torch.stack(tv)
    merged = stacked.sum(0)
    out = torch.empty(merged.shape)

    def plain():
        return merged * reference.consensus_mask(reference.tall_masks(stacked, merged, 0.6), 2)

    return lambda: kernels.consensus(tv, merged, 0.6, 2, out), plain


def _bracket() -> tuple[Callable, Callable]:
    values = torch.randn(3072, 768, generator=torch.Generator().manual_seed(2))
    lo, hi = 1.27, 1.29  # about 0.8% of the entries inside, as TIES' bracket at k = 0.2
    parts = 4
    below = torch.zeros(parts, dtype=torch.int64)
    kept = torch.empty(parts, values.numel() // 50 + kernels.CHUNK)
    filled = torch.zeros(parts, dtype=torch.int64)

    def fused():
        below.zero_()
        filled.zero_()
        kernels.bracket_counts(values, lo, hi, below, kept, filled)

    return fused, lambda: reference.bracket_counts(values, lo, hi)


def _band() -> tuple[Callable, Callable]:
    tv = _block()
    out = torch.empty(tv[0].shape)
    start, stop = band_limits(768, 0.15, 0.006)  # Breadcrumbs' defaults

    def plain():  # the official selection (two torch.topk per row), summed in task order
        for t, values in enumerate(tv):
            banded = values * middle_band(values, 0.15, 0.006)
            if t == 0:
                out.copy_(banded)
            else:
                out.add_(banded)

    return lambda: kernels.band_sum(tv, start, stop, out), plain


def _kth() -> tuple[Callable, Callable]:
    sample = torch.rand(TASKS, 1 << 20, generator=torch.Generator().manual_seed(3))
    counts = torch.full((TASKS,), 1 << 20)
    rank = int(0.8 * (1 << 20))  # TIES' threshold at k = 0.2, on its sample
    rows = sample.numpy()

    def plain():
        return [np.partition(row, rank - 1)[rank - 1] for row in rows]

    return lambda: kernels.kth_smallest(sample, counts, torch.full((TASKS,), rank)), plain


def _radix() -> tuple[Callable, Callable]:
    """TIES' exact fallback: the first pass's histogram over bf16 differences (heavy ties)."""
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(3072, 768, generator=gen).bfloat16()
    values = (base.float() + 1e-2 * torch.randn(base.shape, generator=gen)).bfloat16().float()
    values -= base.float()
    counts = torch.zeros(4, kernels.RADIX, dtype=torch.int64)
    return (
        lambda: kernels.radix_counts(values, -1, counts),
        lambda: torch_kernels.radix_counts(values, -1, counts),
    )


CASES = {
    "band_sum": _band,
    "kth_smallest": _kth,
    "ties_merge": _ties,
    "dare": _dare,
    "consensus": _consensus,
    "bracket_counts": _bracket,
    "radix_counts": _radix,
}


def _timed(fn: Callable) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_gain(benchmark, name):
    fused, plain = CASES[name]()
    fused(), plain()  # compile (or load from the cache) and warm up
    plains: list[float] = []
    fuseds: list[float] = []
    benchmark.pedantic(
        lambda: fuseds.append(_timed(fused)),
        setup=lambda: plains.append(_timed(plain)),
        rounds=9,
        iterations=1,
    )
    ratios = sorted(p / f for p, f in zip(plains, fuseds, strict=True))
    RESULTS[name] = statistics.median(ratios)
    benchmark.extra_info.update(plain_over_kernel=RESULTS[name], range=[ratios[0], ratios[-1]])
    print(
        f"\n{name}: the plain version takes {RESULTS[name]:.2f}x the kernel's time (median of "
        f"{len(ratios)} paired rounds, {ratios[0]:.2f}x to {ratios[-1]:.2f}x); kernel best "
        f"{min(fuseds) * 1e3:.1f} ms, plain best {min(plains) * 1e3:.1f} ms"
    )
