"""Compiled (Numba) kernels for the elementwise hot loops of the masking merges.

Why: TIES' trim, sign election and disjoint mean are a dozen elementwise operations per
entry. As separate torch operations each one streams the stacked task vectors through the
cache again, and together they cost ~50x the time of reading the bytes once; fused into one
loop per entry they cost about one read. The torch functions in
:mod:`atmbench.default_plugins.methods.masking` stay the readable definition of the math
(and what the tests compare these kernels against).

Every kernel takes task vectors as one C-contiguous float32 ``[T, n]`` array (a row block
of a parameter, flattened), never mutates it, and walks the entries in chunks whose inner
loops run over contiguous memory, so LLVM vectorizes them. DARE, consensus and the band
equal the torch reference exactly; TIES sums over tasks in task order where
``torch.sum(dim=0)`` may pair terms, so it can differ from it by a rounding of those sums.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

CHUNK = 2048
"""Entries per inner loop: the per-chunk accumulators stay in L1."""

SPAN = 32
"""Entries per compaction test in the bracket count: about 0.8% of entries fall inside a
bracket, so most spans of 32 hold none and skip the serial compaction loop."""

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _threads() -> None:
    """Use as many threads as torch does (1 in the parallel executors' workers)."""
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def _array(tensor: Tensor) -> np.ndarray:
    return tensor.detach().float().contiguous().reshape(tensor.shape[0], -1).numpy()


# ---------------------------------------------------------------- random streams


@njit(inline="always")
def _splitmix(seed, index):
    z = seed + (index + np.uint64(1)) * _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    z = z ^ (z >> np.uint64(31))
    return np.float32(z >> np.uint64(40)) * np.float32(2.0**-24)


@njit(parallel=True, cache=True)
def _uniforms(seed, offset, out):
    for j in prange(out.shape[0]):
        out[j] = _splitmix(seed, offset + np.uint64(j))


def uniform(seed: int, offset: int, count: int) -> Tensor:
    """Entries ``offset … offset + count − 1`` of the SplitMix64 stream of ``seed`` as float32
    uniforms in [0, 1) (24 random bits each, the resolution of ``torch.rand``'s float32).

    Counter-based: any range of the stream is computed directly, in parallel, so a
    parameter's draws do not depend on how it is split into blocks.
    """
    _threads()
    out = np.empty(count, dtype=np.float32)
    _uniforms(np.uint64(seed), np.uint64(offset), out)
    return torch.from_numpy(out)


# ---------------------------------------------------------------- TIES
#
# Style that LLVM vectorizes: 1-D row slices, and selects written as products with 0/1
# (v · 1{cond}); ternaries and 2-D indexing in the inner loops cost 3x.


@njit(inline="always")
def _trimmed_sums(tv, thresholds, start, stop, total):
    total[:] = 0.0
    for t in range(tv.shape[0]):
        threshold = thresholds[t]
        row = tv[t, start:stop]
        for j in range(stop - start):
            v = row[j]
            total[j] += v * np.float32(abs(v) >= threshold)


@njit(parallel=True, cache=True)
def _ties(tv, thresholds, majority, mean, out):
    n = tv.shape[1]
    fallback = np.float32(1.0) if majority > 0 else np.float32(-1.0)
    for chunk in prange((n + CHUNK - 1) // CHUNK):
        start = chunk * CHUNK
        stop = min(n, start + CHUNK)
        size = stop - start
        total = np.empty(size, dtype=np.float32)
        _trimmed_sums(tv, thresholds, start, stop, total)
        # Elected direction: sign of the sum, the majority where it is 0; a 0 majority
        # keeps the negative entries (the official where(γ > 0, τ̂ > 0, τ̂ < 0)).
        direction = np.empty(size, dtype=np.float32)
        for j in range(size):
            d = np.float32(total[j] > 0) - np.float32(total[j] < 0)
            direction[j] = d + fallback * np.float32(d == 0)
        picked = np.zeros(size, dtype=np.float32)
        count = np.zeros(size, dtype=np.float32)
        for t in range(tv.shape[0]):
            threshold = thresholds[t]
            row = tv[t, start:stop]
            for j in range(size):
                v = row[j]
                agree = np.float32((abs(v) >= threshold) & (v * direction[j] > 0))
                picked[j] += v * agree
                count[j] += agree
        if mean:
            for j in range(size):
                out[start + j] = picked[j] / max(count[j], np.float32(1.0))
        else:
            out[start:stop] = picked


def ties_merge(task_vectors: Tensor, thresholds: Tensor, majority: float, mean: bool) -> Tensor:
    """Trim at ``thresholds``, elect signs (``majority`` where the sum is 0), disjoint mean
    (or sum) of one parameter block ``[T, ...]``: the fused form of ``masking.ties_merge``."""
    _threads()
    out = np.empty(task_vectors[0].numel(), dtype=np.float32)
    _ties(_array(task_vectors), thresholds.float().contiguous().numpy(), majority, mean, out)
    return torch.from_numpy(out).view(task_vectors.shape[1:])


@njit(parallel=True, cache=True)
def _votes(tv, thresholds):
    n = tv.shape[1]
    votes = 0.0
    for chunk in prange((n + CHUNK - 1) // CHUNK):
        start = chunk * CHUNK
        stop = min(n, start + CHUNK)
        total = np.empty(stop - start, dtype=np.float32)
        _trimmed_sums(tv, thresholds, start, stop, total)
        part = 0  # an integer sum vectorizes
        for j in range(stop - start):
            part += np.int32(total[j] > 0) - np.int32(total[j] < 0)
        votes += part
    return votes


def sign_votes(task_vectors: Tensor, thresholds: Tensor) -> float:
    """Σ_entries sign(Σ_t trim(τ_t)) over one block: TIES' model-wide majority, in parts."""
    _threads()
    return float(_votes(_array(task_vectors), thresholds.float().contiguous().numpy()))


@njit(parallel=True, cache=True)
def _bracket(tv, lo, hi, below, kept, filled):
    capacity = kept.shape[1] - CHUNK  # slack: a chunk is compacted before it is checked
    for t in prange(tv.shape[0]):
        low, high, count, f = lo[t], hi[t], 0, filled[t]
        target = kept[t]
        for start in range(0, tv.shape[1], SPAN):
            row = tv[t, start : start + SPAN]
            under = 0  # integer sums vectorize; float ones would need reassociation
            inside = 0
            for j in range(row.shape[0]):
                a = abs(row[j])
                under += np.int32(a < low)
                inside += np.int32((a >= low) & (a <= high))
            count += under
            if inside and f <= capacity:  # compact the few spans holding [lo, hi] values
                for j in range(row.shape[0]):
                    a = abs(row[j])
                    target[f] = a
                    f += np.int64((a >= low) & (a <= high))
            else:
                f += inside
        below[t] += count
        filled[t] = f


def bracket_counts(
    task_vectors: Tensor, lo: Tensor, hi: Tensor, below: Tensor, kept: Tensor, filled: Tensor
) -> None:
    """Per task, add the number of |τ| < lo to ``below`` and append the |τ| in [lo, hi] to
    ``kept`` (a preallocated ``[T, capacity + CHUNK]`` buffer; ``filled`` counts past
    capacity too, so an overflow is visible). The only kernel that writes its arguments:
    the accumulators.
    """
    _threads()
    _bracket(
        _array(task_vectors),
        lo.numpy(),
        hi.numpy(),
        below.numpy(),
        kept.numpy(),
        filled.numpy(),
    )


# ---------------------------------------------------------------- DARE


@njit(parallel=True, cache=True)
def _dare(tv, seeds, offset, p, survivors, out):
    tasks, n = tv.shape
    chunks = (n + CHUNK - 1) // CHUNK
    for index in prange(tasks * chunks):
        t = np.int64(index) // chunks
        start = (np.int64(index) - t * chunks) * CHUNK
        row = tv[t, start : start + CHUNK]
        target = out[t, start : start + CHUNK]
        first = offset + np.uint64(start)
        for j in range(row.shape[0]):
            keep = np.float32(_splitmix(seeds[t], first + np.uint64(j)) > p)
            target[j] = row[j] * keep / survivors


def dare(task_vectors: Tensor, seeds: list[int], offset: int, p: float) -> Tensor:
    """τ_t ⊙ (u_t > p) / (1 − p) with u_t the :func:`uniform` stream of ``seeds[t]`` from
    ``offset``: the fused form of ``masking.dare_rescale(τ, masks, p)``, same float32 steps."""
    _threads()
    out = np.empty((task_vectors.shape[0], task_vectors[0].numel()), dtype=np.float32)
    _dare(
        _array(task_vectors),
        np.array(seeds, dtype=np.uint64),
        np.uint64(offset),
        np.float32(p),
        np.float32(1.0 - p),
        out,
    )
    return torch.from_numpy(out).view(task_vectors.shape)


# ---------------------------------------------------------------- Consensus / TALL masks


@njit(parallel=True, cache=True)
def _consensus(tv, merged, lam, agree, out):
    n = tv.shape[1]
    for chunk in prange((n + CHUNK - 1) // CHUNK):
        start = chunk * CHUNK
        stop = min(n, start + CHUNK)
        base = merged[start:stop]
        votes = np.zeros(stop - start, dtype=np.float32)
        for t in range(tv.shape[0]):
            row = tv[t, start:stop]
            for j in range(stop - start):
                votes[j] += np.float32(abs(row[j]) > lam * abs(base[j] - row[j]))
        for j in range(stop - start):
            out[start + j] = base[j] * np.float32(votes[j] >= agree)


def consensus(task_vectors: Tensor, merged: Tensor, lam: float, agree: int) -> Tensor:
    """τ_MTL ⊙ 1{#{t : |τ_t| > λ|τ_MTL − τ_t|} ≥ agree} of one block: the fused form of
    ``merged * consensus_mask(tall_masks(τ, merged, λ), agree)``."""
    _threads()
    out = np.empty(merged.numel(), dtype=np.float32)
    flat = merged.float().contiguous().reshape(-1).numpy()
    _consensus(_array(task_vectors), flat, np.float32(lam), agree, out)
    return torch.from_numpy(out).view(merged.shape)


# ---------------------------------------------------------------- Breadcrumbs band


@njit(inline="always")
def _select(a, lo, hi, k):
    """The k-th smallest of a[lo..hi] (quickselect, median-of-three Hoare partitions), left
    at a[k] with a[lo..k] ≤ a[k] ≤ a[k..hi]."""
    while hi > lo:
        mid = (lo + hi) >> 1
        if a[mid] < a[lo]:
            a[mid], a[lo] = a[lo], a[mid]
        if a[hi] < a[lo]:
            a[hi], a[lo] = a[lo], a[hi]
        if a[hi] < a[mid]:
            a[hi], a[mid] = a[mid], a[hi]
        pivot = a[mid]
        i, j = lo, hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while a[j] > pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            break
    return a[k]


ROWS = 16
"""Rows per parallel task in the band kernel: one scratch row serves them all."""


@njit(parallel=True, cache=True)
def _band(rows, start, stop, band, repeats):
    count, cols = rows.shape
    for group in prange((count + ROWS - 1) // ROWS):
        scratch = np.empty(cols, dtype=np.float32)
        for r in range(group * ROWS, min(count, (group + 1) * ROWS)):
            row = rows[r]
            for j in range(cols):
                scratch[j] = abs(row[j])
            # Linear-time selection instead of a sort: the stop-th largest bounds the band
            # below; the (start+1)-th largest, among the values above it, bounds it above.
            lower = _select(scratch, 0, cols - 1, cols - stop)
            upper = _select(scratch, cols - stop, cols - 1, cols - start - 1)
            inside = 0
            for j in range(cols):
                keep = (abs(row[j]) <= upper) & (abs(row[j]) >= lower)
                band[r, j] = keep
                inside += np.int32(keep)
            repeats[r] = inside != stop - start


def middle_band(tensor: Tensor, start: int, stop: int) -> tuple[Tensor, Tensor]:
    """Per row of ``tensor`` (last dimension), the entries whose |τ| lies between the
    stop-th and the (start+1)-th largest: Breadcrumbs' band wherever those bounds are not
    repeated. Returns the mask and, per row, whether it holds ≠ stop − start entries (a
    repeat at a bound, which only a position rule can settle). Needs 0 ≤ start < stop."""
    _threads()
    rows = tensor.detach().float().contiguous().reshape(-1, tensor.shape[-1]).numpy()
    band = np.empty(rows.shape, dtype=np.bool_)
    repeats = np.empty(rows.shape[0], dtype=np.bool_)
    _band(rows, start, stop, band, repeats)
    return torch.from_numpy(band).view(tensor.shape), torch.from_numpy(repeats).view(
        tensor.shape[:-1]
    )
