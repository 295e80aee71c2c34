"""Compiled (Numba) kernels for the hot loops of the masking merges.

Why: TIES' trim, sign election and disjoint mean are a dozen elementwise operations per
entry. As separate torch operations each one streams the stacked task vectors through the
cache again, and together they cost ~50x the time of reading the bytes once; fused into one
loop per entry they cost about one read. The torch definitions of the math are in
``tests/reference.py``, which the tests compare these kernels with.

Each kernel here beats the plain torch/numpy code it replaces by 3x to 50x
(``benchmarks/test_kernel_gain.py``, ``benchmarks/README.md``). A kernel compiles on its
first use in a fresh environment (seconds each) and is cached on disk (``cache=True``: in
the package's ``__pycache__`` where that is writable, else in Numba's per-user cache
directory, or ``$NUMBA_CACHE_DIR``), so later processes load it in milliseconds. The first
kernel call of a process starts compiling (or loading) all of them in a background thread,
and calls made before that is done run the torch forms of :mod:`atmbench.torch_kernels`
instead: they give the same values, so a fresh install's first merge does not wait for LLVM
(:func:`compile_kernels` waits, for code that times or checks the compiled path).

Every kernel takes task vectors as one C-contiguous float32 ``[T, n]`` array (a row block
of a parameter, flattened), or T such tensors, never mutates them, and walks the entries in
chunks whose inner loops run over contiguous memory, so LLVM vectorizes them. Order
statistics (TIES' thresholds, Breadcrumbs' band) are found by counting rather than by
sorting or quickselect: a branch the data decides costs more than a few extra passes that
vectorize. DARE, consensus and the Breadcrumbs sum equal the torch reference exactly; TIES
sums over tasks in task order where ``torch.sum(dim=0)`` may pair terms, so it can differ
from it by a rounding of those sums.
"""

from __future__ import annotations

import atexit
import sys
import threading
from collections.abc import Sequence

import numba
import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import intrinsic
from torch import Tensor

from atmbench.torch_kernels import dare_denominator, routed

TaskRows = Tensor | Sequence[Tensor]
"""A block's task vectors: stacked ``[T, ...]``, or T tensors of the same shape (views of
each task's own memory-mapped tensor: no stacked copy). Kernels read both alike."""

CHUNK = 2048
"""Entries per inner loop: the per-chunk accumulators stay in L1."""

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


_ready = threading.Event()
_lock = threading.Lock()
_compiling: threading.Thread | None = None
_failure: list[BaseException] = []


def compiled() -> bool:
    """Whether the kernels are ready; the first call starts compiling them in a background
    thread, which a process that is done first waits for at exit (one line on stderr says
    so): stopping it mid-compile can abort the interpreter, and it leaves the cache to
    every later process."""
    global _compiling
    if _ready.is_set():
        return True
    with _lock:
        if _compiling is None:
            _compiling = threading.Thread(target=_compile, name="atmbench-kernels", daemon=True)
            _compiling.start()
            atexit.register(_finish_at_exit)
    return False


def _finish_at_exit() -> None:
    if _compiling is not None and _compiling.is_alive():
        print("atmbench: finishing the one-time compile of the merge kernels", file=sys.stderr)
        _compiling.join()


def compile_kernels() -> None:
    """Compile (or load from the cache) every kernel and wait until they are ready."""
    compiled()
    assert _compiling is not None
    _compiling.join()
    if _failure:
        raise _failure[0]


def _compile() -> None:
    """Call each kernel once on tiny inputs of the types the methods pass, which compiles
    (or loads) the specializations they use; any other compiles on its first call."""
    try:
        rows = [torch.linspace(-1.0, 1.0, 3 * CHUNK).view(3, CHUNK) * s for s in (1.0, -0.5)]
        thresholds = torch.full((2,), 0.5)
        ties_merge.__wrapped__(rows, thresholds, -1.0, True, drop=([1, 2], 0, 0.5))
        ties_merge.__wrapped__(rows, thresholds, 1.0, False, consensus=(0.5, 1))
        dare.__wrapped__(rows, [1, 2], 0, 0.5)
        consensus.__wrapped__(rows, rows[0], 0.5, 1)
        band_sum.__wrapped__(rows, 1, 3)
        uniform.__wrapped__(1, 0, 8)
        below, filled = torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
        kept = torch.empty(2, 4 * CHUNK)
        bracket_counts.__wrapped__(rows[0], 0.1, 0.9, below, kept, filled, (1, 0.5))
        kth_smallest.__wrapped__(kept[:, :8].abs(), torch.full((2,), 8), torch.full((2,), 3))
        histograms = torch.zeros(2, RADIX, dtype=torch.int64)
        radix_counts.__wrapped__(rows[0], -1, histograms, (1, 0.5))
        radix_counts.__wrapped__(rows[0], 0x3F00, histograms)
    except BaseException as error:  # surfaced by compile_kernels; calls stay on torch
        _failure.append(error)
        return
    _ready.set()


def _threads() -> None:
    """Use as many threads as torch does (1 in the parallel executors' workers)."""
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def _pointer_at(dtype: types.Type):
    """An intrinsic giving the ``dtype`` pointer at an address: how a kernel reads T
    separate tensors, which Numba cannot take as one argument without a costly per-call
    dispatch (~0.35 ms)."""

    @intrinsic
    def at(typingctx, address):
        signature = types.CPointer(dtype)(types.uint64)

        def codegen(context, builder, sig, args):
            return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

        return signature, codegen

    return at


_floats_at = _pointer_at(types.float32)
_bits_at = _pointer_at(types.int32)


@njit(inline="always")
def _task(addresses, t, n):
    """Task t's n float32 values, from :func:`_addresses`."""
    return numba.carray(_floats_at(addresses[t]), n)


def _addresses(task_vectors: TaskRows) -> tuple[np.ndarray, int, list[Tensor]]:
    """Each task's values as float32, C-contiguous: their addresses, their size, and the
    tensors themselves, which the caller keeps alive while a kernel reads them."""
    tensors = [t.detach().float().contiguous() for t in task_vectors]
    addresses = np.array([t.data_ptr() for t in tensors], dtype=np.uint64)
    return addresses, tensors[0].numel(), tensors


# ---------------------------------------------------------------- random streams


@njit(inline="always")
def _bits24(seed, index):
    """The top 24 bits of SplitMix64's output ``index`` of the stream of ``seed``."""
    z = seed + (index + np.uint64(1)) * _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return (z ^ (z >> np.uint64(31))) >> np.uint64(40)


@njit(inline="always")
def _splitmix(seed, index):
    return np.float32(_bits24(seed, index)) * np.float32(2.0**-24)


@njit(parallel=True, cache=True)
def _uniforms(seed, offset, out):
    for j in prange(out.shape[0]):
        out[j] = _splitmix(seed, offset + np.uint64(j))


@routed(compiled)
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


@njit(inline="always")
def _dropped(row, seed, first, p, survivors, out):
    """DARE's τ ⊙ (u > p) / (1 − p) of one contiguous row piece into ``out``, u drawn from
    the stream of ``seed`` from entry ``first``: one expression for every kernel that fuses
    the drop, so that they all give :func:`dare`'s float32 values.

    u = m · 2⁻²⁴ > p exactly when the integer m > ⌊p · 2²⁴⌋: an integer compare, no
    conversion to float per entry."""
    cut = np.uint64(np.float64(p) * 16777216.0)
    for j in range(row.shape[0]):
        keep = np.float32(_bits24(seed, first + np.uint64(j)) > cut)
        out[j] = row[j] * keep / survivors


# ---------------------------------------------------------------- selection by counting

_MAGNITUDE = np.int32(0x7FFFFFFF)
"""float32 bits & this = the bits of |x|, and for x ≥ 0 the order of the bits (as int32) is
the order of the values: selections compare integers, which vectorize without branches."""


@njit(inline="always")
def _count_at_least(values, size, floor):
    floor = np.int32(floor)  # an int32 compare packs twice the lanes of an int64 one
    count = 0
    for j in range(size):
        count += np.int32(values[j] >= floor)
    return count


@njit(inline="always")
def _kth_largest(values, size, above, k, lo, hi):
    """The k-th largest of ``values[:size]`` (int32), given that ``above`` of them are ≥ lo
    (the others are padding below it) and fewer than k are ≥ hi.

    Search by counting: each step counts the values ≥ a probe, a vectorized compare and sum
    with no data-dependent branch (a quickselect mispredicts a branch on about every other
    value, which on a few hundred values is slower). Probes interpolate where the count
    crosses k, with a bisection whenever that gained less than half; the search ends once
    exactly k or k − 1 values lie above a probe, with one pass for the nearest value.
    """
    count_lo, count_hi = above, 0
    bisect = False
    while hi - lo > 1:
        if count_lo == k:  # the k-th largest is the smallest value ≥ lo
            least = hi
            for j in range(size):
                v = values[j]
                least = min(least, v if v >= lo else hi)
            return least
        if count_hi == k - 1:  # the k-th largest is the largest value < hi
            most = lo
            for j in range(size):
                v = values[j]
                most = max(most, v if v < hi else lo)
            return most
        if bisect:
            probe = lo + (hi - lo) // 2
        else:
            share = (count_lo - k + 0.5) / (count_lo - count_hi)
            probe = min(max(lo + np.int64(share * (hi - lo)), lo + 1), hi - 1)
        width = hi - lo
        count = _count_at_least(values, size, probe)
        if count >= k:
            lo, count_lo = probe, count
        else:
            hi, count_hi = probe, count
        bisect = 2 * (hi - lo) > width
    return lo


@njit(parallel=True, cache=True)
def _kth_smallest(bits, counts, ranks, out):
    for t in prange(bits.shape[0]):
        values = bits[t]
        size = counts[t]
        top = np.int32(0)
        for j in range(size):
            top = max(top, values[j])
        out[t] = _kth_largest(values, size, size, size - ranks[t] + 1, 0, top + 1)


@routed(compiled)
def kth_smallest(magnitudes: Tensor, counts: Tensor, ranks: Tensor) -> Tensor:
    """Per task t, the ``ranks[t]``-th smallest (1-based) of ``magnitudes[t, :counts[t]]``,
    all ≥ 0: ``[T]`` float32. Selects by counting over the float bits (:func:`_kth_largest`),
    a few vectorized passes, where ``torch.kthvalue`` sorts its way through a copy."""
    _threads()
    bits = magnitudes.float().contiguous().view(torch.int32).numpy()
    out = np.empty(bits.shape[0], dtype=np.int32)
    _kth_smallest(bits, counts.long().numpy(), ranks.long().numpy(), out)
    return torch.from_numpy(out).view(torch.float32)


# ---------------------------------------------------------------- TIES
#
# Style that LLVM vectorizes: 1-D row slices, and selects written as products with 0/1
# (v · 1{cond}); ternaries and 2-D indexing in the inner loops cost 3x.


@njit(inline="always")
def _load(addresses, n, start, stop, out):
    """Entries start … stop of every task into ``out`` ``[T, ≥ size]``: a chunk-sized
    buffer the later loops find in L1/L2."""
    for t in range(addresses.shape[0]):
        out[t, : stop - start] = _task(addresses, t, n)[start:stop]


@njit(inline="always")
def _trimmed_sum(source, row, threshold, total):
    """``row = source`` (a chunk of one task, loaded into L1) and ``total += trim(row)``."""
    for j in range(row.shape[0]):
        v = source[j]
        row[j] = v
        total[j] += v * np.float32(abs(v) >= threshold)


@njit(parallel=True, cache=True)
def _ties(
    addresses,
    n,
    thresholds,
    majority,
    mean,
    out,
    drop,
    seeds,
    offset,
    p,
    survivors,
    masking,
    lam,
    quorum,
):
    tasks = addresses.shape[0]
    fallback = np.float32(1.0) if majority > 0 else np.float32(-1.0)
    votes = 0.0
    undecided = 0.0
    for chunk in prange((n + CHUNK - 1) // CHUNK):
        start = chunk * CHUNK
        stop = min(n, start + CHUNK)
        size = stop - start
        tv = np.empty((tasks, CHUNK), dtype=np.float32)  # the chunk, loaded once into L1
        total = np.zeros(size, dtype=np.float32)
        for t in range(tasks):
            row = tv[t, :size]
            source = _task(addresses, t, n)[start:stop]
            if drop:  # DARE-TIES: the chunk's dropped vectors, drawn here
                _dropped(source, seeds[t], offset + np.uint64(start), p, survivors, row)
                _trimmed_sum(row, row, thresholds[t], total)
            else:
                _trimmed_sum(source, row, thresholds[t], total)
        # Elected direction: sign of the sum, the majority where it is 0; a 0 majority
        # keeps the negative entries (the official where(γ > 0, τ̂ > 0, τ̂ < 0)).
        direction = np.empty(size, dtype=np.float32)
        for j in range(size):
            d = np.float32(total[j] > 0) - np.float32(total[j] < 0)
            direction[j] = d + fallback * np.float32(d == 0)
        picked = np.zeros(size, dtype=np.float32)
        count = np.zeros(size, dtype=np.float32)
        for t in range(tasks):
            threshold = thresholds[t]
            row = tv[t, :size]
            for j in range(size):
                v = row[j]
                agree = np.float32((abs(v) >= threshold) & (v * direction[j] > 0))
                picked[j] += v * agree
                count[j] += agree
        merged = out[start:stop]
        if mean:
            for j in range(size):
                merged[j] = picked[j] / max(count[j], np.float32(1.0))
        else:
            merged[:] = picked
        if masking:  # Consensus-TIES: the TALL-mask vote on the chunk, while it is in L1
            _consensus_chunk(tv, size, merged, lam, quorum, merged)
        # The votes of the elected signs, and the entries the majority decided: a zero sum
        # of non-zero kept entries, i.e. kept entries of both signs (integer sums vectorize).
        part = 0
        ties = 0
        for j in range(size):
            part += np.int32(total[j] > 0) - np.int32(total[j] < 0)
            ties += np.int32((total[j] == 0) & (count[j] > 0))
        votes += part
        undecided += ties
    return votes, undecided


@routed(compiled)
def ties_merge(
    task_vectors: TaskRows,
    thresholds: Tensor,
    majority: float,
    mean: bool,
    out: Tensor | None = None,
    drop: tuple[list[int], int, float] | None = None,
    consensus: tuple[float, int] | None = None,
) -> tuple[Tensor, int, int]:
    """Trim at ``thresholds``, elect signs (``majority`` where the sum is 0), disjoint mean
    (or sum) of one parameter block ``[T, ...]``: the fused form of (``tests/reference.py``)
    ``disjoint_merge(t, elect_sign(t, majority), merge)`` with ``t = trim(τ, thresholds)``.

    Also returns the block's votes Σ sign(Σ_t t) and how many entries the majority decided
    (kept entries of both signs summing to 0), so that one pass serves both. Into ``out``
    (float32, C-contiguous, shape ``[...]``) if given.

    ``drop = (seeds, offset, p)`` merges :func:`dare`'s dropped and rescaled vectors instead,
    drawn chunk by chunk into L1 rather than written out as a block and read back.
    ``consensus = (λ, agree)`` masks the merged chunks as :func:`consensus` does (comparing
    with the task vectors as merged), while they are still in L1 (Consensus-TIES).
    """
    _threads()
    addresses, n, alive = _addresses(task_vectors)
    out = torch.empty(alive[0].shape) if out is None else out
    seeds, offset, p = drop if drop else ([0] * len(alive), 0, 0.0)
    lam, agree = consensus if consensus else (0.0, 0)
    votes, undecided = _ties(
        addresses,
        n,
        thresholds.float().contiguous().numpy(),
        majority,
        mean,
        out.view(-1).numpy(),
        drop is not None,
        np.array(seeds, dtype=np.uint64),
        np.uint64(offset),
        np.float32(p),
        dare_denominator(p),
        consensus is not None,
        np.float32(lam),
        agree,
    )
    return out, int(votes), int(undecided)


@njit(parallel=True, cache=True)
def _bracket(values, low, high, below, kept, filled, dropping, seed, p, survivors):
    parts = kept.shape[0]
    capacity = kept.shape[1] - CHUNK  # slack: a chunk is compacted before it is checked
    step = (values.shape[0] + parts - 1) // parts
    for part in prange(parts):
        count, f = 0, filled[part]
        target = kept[part]
        dropped = np.empty(CHUNK, dtype=np.float32)
        inside = np.zeros(CHUNK + 24, dtype=np.uint8)
        groups = inside.view(np.uint64)  # 8 flags per word, 32 per test: most are 0
        end = min(values.shape[0], (part + 1) * step)
        for start in range(part * step, end, CHUNK):
            row = values[start : min(end, start + CHUNK)]
            size = row.shape[0]
            if dropping:
                _dropped(row, seed, np.uint64(start), p, survivors, dropped)
                row = dropped[:size]
            under = 0  # integer sums vectorize; float ones would need reassociation
            for j in range(size):
                a = abs(row[j])
                under += np.int32(a < low)
                inside[j] = np.uint8((a >= low) & (a <= high))
            inside[size:] = 0
            count += under
            for g in range(0, (size + 7) // 8, 4):
                if groups[g] | groups[g + 1] | groups[g + 2] | groups[g + 3] == 0:
                    continue
                for w in range(g, g + 4):
                    if groups[w] == 0:
                        continue
                    for j in range(w * 8, w * 8 + 8):  # compact the few groups holding some
                        target[min(f, capacity + CHUNK - 1)] = abs(row[min(j, size - 1)])
                        f += np.int64(inside[j])
        below[part] += count
        filled[part] = f


@routed(compiled)
def bracket_counts(
    values: Tensor,
    lo: float,
    hi: float,
    below: Tensor,
    kept: Tensor,
    filled: Tensor,
    drop: tuple[int, float] | None = None,
) -> None:
    """Add the number of |values| < lo to ``below`` and append the |values| in [lo, hi] to
    ``kept``; the only kernel that writes its arguments, the accumulators.

    ``values`` (one task's tensor, any shape) is split into as many contiguous parts as
    ``kept`` has rows, counted in parallel: part i adds to ``below[i]`` and appends to
    ``kept[i]`` (``[parts, capacity + CHUNK]``) past ``filled[i]``, which counts past the
    capacity too, so that an overflow is visible.

    ``drop = (seed, p)`` counts :func:`dare`'s dropped and rescaled values instead (the stream
    of ``seed`` from entry 0), drawn on the fly: no dropped copy is written and read back.
    """
    _threads()
    seed, p = drop if drop else (0, 0.0)
    _bracket(
        values.detach().float().contiguous().reshape(-1).numpy(),
        np.float32(lo),
        np.float32(hi),
        below.numpy(),
        kept.numpy(),
        filled.numpy(),
        drop is not None,
        np.uint64(seed),
        np.float32(p),
        dare_denominator(p),
    )


RADIX = 1 << 16
"""Bins of :func:`radix_counts`' histograms: one per value of 16 bits of a float32."""


@njit(inline="always")
def _histogram(bits, prefix, histogram):
    """Count each int32 of ``bits`` (float32 bit patterns, any sign) as |x| in ``histogram``:
    by its high 16 bits if ``prefix < 0``, else by its low 16 bits if its high 16 bits are
    ``prefix`` (an add of 0 where not: no branch the data decides)."""
    if prefix < 0:
        for j in range(bits.shape[0]):
            histogram[(bits[j] & _MAGNITUDE) >> 16] += 1
    else:
        for j in range(bits.shape[0]):
            b = bits[j] & _MAGNITUDE
            histogram[b & 0xFFFF] += np.int64((b >> 16) == prefix)


@njit(parallel=True, cache=True)
def _radix(values, bits, prefix, counts, dropping, seed, p, survivors):
    parts = counts.shape[0]
    step = (values.shape[0] + parts - 1) // parts
    for part in prange(parts):
        dropped = np.empty(CHUNK, dtype=np.float32)
        drawn = dropped.view(np.int32)
        end = min(values.shape[0], (part + 1) * step)
        for start in range(part * step, end, CHUNK):
            stop = min(end, start + CHUNK)
            if dropping:
                _dropped(values[start:stop], seed, np.uint64(start), p, survivors, dropped)
                _histogram(drawn[: stop - start], prefix, counts[part])
            else:
                _histogram(bits[start:stop], prefix, counts[part])


@routed(compiled)
def radix_counts(
    values: Tensor, prefix: int, counts: Tensor, drop: tuple[int, float] | None = None
) -> None:
    """Add the histogram of |values|' float32 bits to ``counts``: of their high 16 bits if
    ``prefix < 0``, else of the low 16 bits of those whose high 16 bits are ``prefix``. Two
    such passes find any order statistic exactly in :data:`RADIX` counters (for x ≥ 0 the
    order of the bits is the order of the values), where a selection over the values would
    hold them all.

    Like :func:`bracket_counts`: ``values`` (one task's tensor, any shape) is split into as
    many contiguous parts as ``counts`` (int64 ``[parts, RADIX]``) has rows, counted in
    parallel; ``drop = (seed, p)`` counts :func:`dare`'s dropped values, drawn on the fly.
    """
    _threads()
    seed, p = drop if drop else (0, 0.0)
    flat = values.detach().float().contiguous().reshape(-1)
    _radix(
        flat.numpy(),
        flat.view(torch.int32).numpy(),
        np.int32(prefix),
        counts.numpy(),
        drop is not None,
        np.uint64(seed),
        np.float32(p),
        dare_denominator(p),
    )


# ---------------------------------------------------------------- DARE


@njit(parallel=True, cache=True)
def _dare(addresses, n, seeds, offset, p, survivors, out):
    tasks = addresses.shape[0]
    chunks = (n + CHUNK - 1) // CHUNK
    for index in prange(tasks * chunks):
        t = np.int64(index) // chunks
        start = (np.int64(index) - t * chunks) * CHUNK
        row = _task(addresses, t, n)[start : start + CHUNK]
        target = out[t, start : start + CHUNK]
        _dropped(row, seeds[t], offset + np.uint64(start), p, survivors, target)


@routed(compiled)
def dare(
    task_vectors: TaskRows, seeds: list[int], offset: int, p: float, out: Tensor | None = None
) -> Tensor:
    """τ_t ⊙ (u_t > p) / (1 − p) with u_t the :func:`uniform` stream of ``seeds[t]`` from
    ``offset``: the fused form of ``dare_rescale(τ, masks, p)`` (``tests/reference.py``),
    same float32 steps.

    Into ``out`` if given (a C-contiguous float32 tensor of the same shape, not overlapping
    ``task_vectors``: in place, LLVM's overlap check takes the loop's scalar path, 4x
    slower), else into a new tensor.
    """
    _threads()
    addresses, n, alive = _addresses(task_vectors)
    out = torch.empty(len(alive), *alive[0].shape) if out is None else out
    _dare(
        addresses,
        n,
        np.array(seeds, dtype=np.uint64),
        np.uint64(offset),
        np.float32(p),
        dare_denominator(p),
        out.view(out.shape[0], -1).numpy(),
    )
    return out


# ---------------------------------------------------------------- Consensus / TALL masks


@njit(inline="always")
def _consensus_chunk(tv, size, merged, lam, agree, out):
    """``out = merged ⊙ 1{#{t : |τ_t| > λ|merged − τ_t|} ≥ agree}`` for a chunk's ``size``
    entries, its task vectors loaded in ``tv`` ``[T, ≥ size]`` (``out`` may be ``merged``)."""
    votes = np.zeros(size, dtype=np.float32)
    for t in range(tv.shape[0]):
        row = tv[t, :size]
        for j in range(size):
            votes[j] += np.float32(abs(row[j]) > lam * abs(merged[j] - row[j]))
    for j in range(size):
        out[j] = merged[j] * np.float32(votes[j] >= agree)


@njit(parallel=True, cache=True)
def _consensus(addresses, n, merged, lam, agree, out):
    for chunk in prange((n + CHUNK - 1) // CHUNK):
        start = chunk * CHUNK
        stop = min(n, start + CHUNK)
        tv = np.empty((addresses.shape[0], CHUNK), dtype=np.float32)
        _load(addresses, n, start, stop, tv)
        _consensus_chunk(tv, stop - start, merged[start:stop], lam, agree, out[start:stop])


@routed(compiled)
def consensus(
    task_vectors: TaskRows, merged: Tensor, lam: float, agree: int, out: Tensor | None = None
) -> Tensor:
    """τ_MTL ⊙ 1{#{t : |τ_t| > λ|τ_MTL − τ_t|} ≥ agree} of one block: the fused form of
    ``merged * consensus_mask(tall_masks(τ, merged, λ), agree)``. Into ``out`` (float32,
    C-contiguous, not overlapping the inputs) if given."""
    _threads()
    out = torch.empty(merged.shape) if out is None else out
    flat = merged.float().contiguous().reshape(-1).numpy()
    addresses, n, _alive = _addresses(task_vectors)
    _consensus(addresses, n, flat, np.float32(lam), agree, out.view(-1).numpy())
    return out


# ---------------------------------------------------------------- Breadcrumbs band


ROWS = 16
"""Rows per parallel task in the band kernel: one set of scratch buffers serves them all."""

LANES = 64
"""Selections on a row's few hundred values pad them to a multiple of this (LLVM's
vectorized loop step) with values below the search: a remainder would run scalar."""

STRIDE = 8
"""One entry in STRIDE is sampled to guess a row's lower band bound."""

MARGIN = np.int32(1 << 20)
"""The next row's floor is this much below a row's lower band bound, in float32 bits: a
factor of 2^-(2^20 / 2^23) ≈ 0.917 in magnitude."""


@njit(inline="always")
def _pad(values, size):
    """Fill ``values`` from ``size`` up to the next multiple of :data:`LANES` with -1 (below
    every magnitude's bits); return that length."""
    padded = (size + LANES - 1) // LANES * LANES
    values[size:padded] = -1
    return padded


@njit(inline="always")
def _compact_at_least(bits, floor, kept):
    """Write the magnitude bits ≥ ``floor`` of a row to ``kept``; return how many."""
    filled = 0
    for j in range(bits.shape[0]):
        v = bits[j] & _MAGNITUDE
        kept[filled] = v
        filled += np.int64(v >= floor)
    return filled


@njit(inline="always")
def _bounds(bits, start, stop, guess, sample, kept):
    """The stop-th and the (start+1)-th largest |x| of a row given as float32 bits: the
    band's lower and upper bound, as magnitude bits.

    One pass keeps the entries at least as large as a floor a little below the stop-th
    largest (a few times ``stop`` of them), and the two selections run on those alone.
    The floor is ``guess`` (from the previous row of the same tensor: rows of a weight
    matrix have alike magnitudes) if it is positive, else a strided sample's guess; a floor
    that keeps fewer than ``stop`` entries is retried from the sample, then from the row.
    """
    cols = bits.shape[0]
    filled = 0
    floor = np.int32(guess)
    if floor > 0:
        filled = _compact_at_least(bits, floor, kept)
    size = cols // STRIDE
    if filled < stop and size >= 16 and stop * 4 <= cols:
        top = np.int32(0)
        for i in range(size):
            sample[i] = bits[i * STRIDE] & _MAGNITUDE
            top = max(top, sample[i])
        expected = stop * size / cols
        rank = int(expected + 3.0 * np.sqrt(expected) + 2.0)
        if rank < size:
            floor = _kth_largest(sample, _pad(sample, size), size, rank, 0, top + 1)
            filled = _compact_at_least(bits, floor, kept)
    if filled < stop:
        filled = _compact_at_least(bits, np.int32(0), kept)
        floor = np.int32(0)
    padded = _pad(kept, filled)
    top = np.int32(0)
    for j in range(padded):
        top = max(top, kept[j])
    lower = _kth_largest(kept, padded, filled, stop, floor, top + 1)
    upper = _kth_largest(kept, padded, filled, start + 1, floor, top + 1)
    return lower, upper


@njit(parallel=True, cache=True)
def _band_sum(addresses, count, cols, start, stop, out, repeats):
    tasks = addresses.shape[0]
    for group in prange((count + ROWS - 1) // ROWS):
        sample = np.empty(cols // STRIDE + LANES, dtype=np.int32)
        kept = np.empty(cols + LANES, dtype=np.int32)
        guesses = np.zeros(tasks, dtype=np.int32)
        for r in range(group * ROWS, min(count, (group + 1) * ROWS)):
            total = out[r]
            total[:] = 0.0
            repeated = False
            for t in range(tasks):
                row = _task(addresses, t, count * cols)[r * cols : (r + 1) * cols]
                bits = numba.carray(_bits_at(addresses[t]), count * cols)
                row_bits = bits[r * cols : (r + 1) * cols]
                lower, upper = _bounds(row_bits, start, stop, guesses[t], sample, kept)
                guesses[t] = max(lower - MARGIN, 0)
                above = 0
                atleast = 0
                for j in range(cols):
                    v = row_bits[j] & _MAGNITUDE
                    total[j] += row[j] * np.float32((v >= lower) & (v <= upper))
                    above += np.int32(v > upper)
                    atleast += np.int32(v >= lower)
                # A bound repeated across the band's edge: only a position rule can settle
                # which copies are in, unless the copies are zeros (then none adds anything).
                repeated |= (upper > 0) & (above != start)
                repeated |= (lower > 0) & (atleast != stop)
            repeats[r] = repeated


@routed(compiled)
def band_sum(
    task_vectors: TaskRows, start: int, stop: int, out: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Σ_t τ_t ⊙ band_t, where per row (last dimension) and task the band holds the |τ|
    between the stop-th and the (start+1)-th largest: Breadcrumbs' merge wherever those
    bounds are not repeated. ``task_vectors`` are T tensors ``[..., cols]`` (or stacked);
    returns the sum ``[..., cols]`` and, per row, whether a task repeats a non-zero bound
    across the band's edge (those rows need the position rule). Needs 0 ≤ start < stop ≤
    cols. The sum goes into ``out`` (float32, C-contiguous, shape ``[..., cols]``) if given."""
    _threads()
    addresses, n, alive = _addresses(task_vectors)
    shape = alive[0].shape
    cols = shape[-1]
    out = torch.empty(shape) if out is None else out
    repeats = np.empty(n // cols if cols else 0, dtype=np.bool_)
    _band_sum(addresses, n // cols, cols, start, stop, out.view(-1, cols).numpy(), repeats)
    return out, torch.from_numpy(repeats).view(shape[:-1])
