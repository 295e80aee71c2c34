"""Masking math shared by TIES, DARE, Model Breadcrumbs and Consensus merging.

The per-block merges (TIES' trim, elect and disjoint merge, DARE's drop, the TALL/consensus
masks) run as fused kernels (:mod:`atmbench.kernels`; their torch definitions, which the
tests compare them with, are in ``tests/reference.py``), Breadcrumbs' band in plain torch,
plus the streaming passes TIES needs for its global view.
``task_vectors`` are stacked on a leading task dimension ``[T, ...]`` (the fused paths also
take T separate tensors, as ``stacked=False`` methods get them); nothing here mutates them
(only TIES' state, which counts the sign vote as the blocks are merged).

TIES follows the official code (prateeky2806/ties-merging ``ties_minimal.ipynb``), checked
against ``tests/data/golden`` (see its RECIPE.md):

- one magnitude threshold per task over the *whole* model, 1-D tensors included: with d
  entries and n = int(k·d), keep |τ| ≥ the (d − n)-th smallest magnitude (n + 1 entries);
- elected sign γ = sign(Σ_t τ̂_t); where that is 0, the sign of Σ_entries γ over the whole
  model (a vote of the elected signs, not of the raw values); where γ is still 0 only the
  negative entries are kept (``where(γ > 0, τ̂ > 0, τ̂ < 0)``);
- disjoint mean divides by the number of agreeing non-zero entries (at least 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from atmbench import kernels
from atmbench.hparams import HParam
from atmbench.kernels import TaskRows
from atmbench.method import Scratch, TaskVectors, TensorContext, peek, sum_tasks, task_rows
from atmbench.streaming import floating_keys

Transform = Callable[[Tensor, TensorContext], Tensor]
"""Maps a parameter's stacked task vectors to what TIES trims (e.g. DARE's dropped ones)."""

MERGE = HParam(
    "merge",
    default="mean",
    choices=("mean", "sum"),
    type=str,
    help="disjoint aggregation of the sign-agreeing entries (FusionBench uses sum)",
)


def ties_k(default: float = 0.2, search: tuple = (0.1, 0.2, 0.3)) -> HParam:
    """TIES' kept fraction k; 0 is refused (it would keep the single largest entry)."""
    return HParam(
        "k",
        default=default,
        search=search,
        low=0.0,
        high=1.0,
        open_low=True,
        help="fraction of each task vector's entries kept by magnitude, over the whole model",
    )


# ---------------------------------------------------------------- TIES: global threshold

SAMPLE = 1 << 20
"""Magnitudes per task sampled to bracket the threshold before the exact counting pass."""

SAMPLE_STRIDE = 64
"""The sample reads one row in this many: about 1.4 M entries per task of a ViT-B-32."""

CAPACITY = 1 << 21
"""Magnitudes per task the counting pass may keep inside the bracket (about 0.8% of a
ViT-B-32 tower's 88 M entries fall there), a share of it per part; more means the bracket
missed."""

PARTS = 4
"""Each task's parameters are counted in this many contiguous parts, in parallel."""


def _task_by_task(vectors: TaskVectors, seed: int, transform: Transform | None):
    """Yield ``(task index, values [1, n], ctx)`` for every parameter and task, straight from
    the task's (memory-mapped) tensor: a count needs no stacked block, and stacking would
    copy every byte once more. Non-finite values are left to the merge pass to report."""
    scratch = Scratch()
    for key in floating_keys(vectors):
        for t, task in enumerate(vectors.tasks):
            values = vectors.get(task, key).unsqueeze(0)  # [1, ...]: a stack of one task
            ctx = TensorContext(key, (task,), seed, scratch=scratch)
            if transform:
                values = transform(values.float(), ctx)
            yield t, values.reshape(1, -1), ctx


def _sample(vectors: TaskVectors, seed: int, transform: Transform | None) -> Tensor:
    """About :data:`SAMPLE` magnitudes per task: one row in :data:`SAMPLE_STRIDE` of every
    parameter (1-D ones whole), so every layer is represented.

    Only a guess at where the threshold lies (the counting pass checks it); a transform sees
    the rows as if they were contiguous, which changes its draws but not their law. Copied
    straight into one buffer: stacking and concatenating the pieces cost ~0.1 s a merge.
    """
    tasks = len(vectors.tasks)
    pieces = []  # per parameter, T tensors: the sampled rows (or their transform)
    for key in floating_keys(vectors):
        first = peek(vectors, vectors.tasks[0], key)
        rows = slice(None, None, SAMPLE_STRIDE) if first.dim() > 1 else ...
        views = [task_rows(vectors, task, key, rows) for task in vectors.tasks]
        if transform:
            ctx = TensorContext(key, tuple(vectors.tasks), seed)
            views = transform(torch.stack(views).float(), ctx).reshape(tasks, -1)
        pieces.append(views)
    every = torch.empty(tasks, sum(piece[0].numel() for piece in pieces))
    start = 0
    for piece in pieces:
        count = piece[0].numel()
        for row, values in zip(every[:, start : start + count], piece, strict=True):
            row.view(values.shape).copy_(values)
        start += count
    return every.abs_()[:, :: max(1, every.shape[1] // SAMPLE)]


def _bracket(sample: Tensor, k: float) -> tuple[Tensor, Tensor]:
    """Per task [lo, hi] around the sample's (1 − k) quantile, wide enough (10 standard
    deviations of a sample quantile, plus slack) that the true threshold is almost surely
    inside; ``lo = 0`` / ``hi = inf`` where the margin runs off the sample."""
    tasks, size = sample.shape
    center = (1.0 - k) * size
    margin = 10.0 * math.sqrt(size * k * (1.0 - k)) + 16
    low, high = int(center - margin), int(math.ceil(center + margin))
    counts = torch.full((tasks,), size, dtype=torch.int64)

    def quantile(rank: int) -> Tensor:
        return kernels.kth_smallest(sample, counts, torch.full((tasks,), rank))

    lo = quantile(low + 1) if 0 <= low < size else torch.zeros(tasks)
    hi = quantile(high + 1) if 0 <= high < size else torch.full((tasks,), math.inf)
    return lo, hi


def global_thresholds(
    vectors: TaskVectors, k: float, seed: int = 0, transform: Transform | None = None
) -> Tensor:
    """Per task, the (d − int(k·d))-th smallest |τ| over all parameters: ``[T]`` float32.

    Public: third-party methods (atmbench-doge) build their global masks on it.

    Exact, streaming, and about one read of the task vectors: a small sample brackets each
    task's threshold, one pass counts the magnitudes below the bracket and keeps those
    inside it (a fraction of a percent), and the threshold is the right order statistic of
    what was kept. Where the bracket misses (heavy ties, odd distributions) it falls back to
    :func:`exact_thresholds`. ``k = 1`` gives 0 (keep all).
    """
    tasks, parts = len(vectors.tasks), PARTS
    lo, hi = _bracket(_sample(vectors, seed, transform), k)
    below = torch.zeros(tasks, parts, dtype=torch.int64)
    kept = torch.empty(tasks, parts, CAPACITY // parts + kernels.CHUNK)
    filled = torch.zeros(tasks, parts, dtype=torch.int64)
    total = 0
    drop = transform.p if isinstance(transform, Drop) else None  # drawn by the kernel
    for t, values, ctx in _task_by_task(vectors, seed, None if drop is not None else transform):
        total += values.numel() if t == 0 else 0
        dropping = (ctx.task_seed(0), drop) if drop is not None else None
        one = (below[t], kept[t], filled[t])
        kernels.bracket_counts(values, float(lo[t]), float(hi[t]), *one, dropping)
    rank = total - int(total * k)
    if rank <= 0:
        return torch.zeros(tasks)
    within = rank - below.sum(1)
    missed = (within < 1) | (within > filled.sum(1)) | (filled > CAPACITY // parts).any(1)
    if bool(missed.any()):
        return exact_thresholds(vectors, k, seed, transform)  # the bracket missed
    rows = kept.view(tasks, -1)
    for t in range(tasks):  # each task's parts joined at the front of its row, in place
        end = int(filled[t, 0])
        for i in range(1, parts):
            count = int(filled[t, i])
            rows[t, end : end + count] = kept[t, i, :count].clone()
            end += count
    return kernels.kth_smallest(rows, filled.sum(1), within)


def exact_thresholds(
    vectors: TaskVectors, k: float, seed: int = 0, transform: Transform | None = None
) -> Tensor:
    """:func:`global_thresholds` without a guess: exact whatever the distribution, in two
    passes over the task vectors with :data:`kernels.RADIX` counters per task and part
    (:func:`atmbench.kernels.radix_counts`): the first counts the high 16 bits of every
    |τ|'s float32 pattern and finds the bin holding the rank, the second counts the low 16
    bits of the entries in that bin. The fallback where the bracket misses: differences of
    bf16 weights take few distinct values, and millions of them can tie at an LLM's
    threshold. Memory stays at one parameter, where gathering a task's magnitudes for a
    selection would hold its whole task vector in float32 (more than the RAM for a large
    model). The threshold is the same value: the rank-th smallest |τ|.
    """
    tasks = len(vectors.tasks)
    counts = torch.zeros(tasks, PARTS, kernels.RADIX, dtype=torch.int64)
    drop = transform.p if isinstance(transform, Drop) else None  # drawn by the kernel

    def count(prefixes: list[int]) -> int:
        total = 0
        for t, values, ctx in _task_by_task(vectors, seed, None if drop is not None else transform):
            total += values.numel() if t == 0 else 0
            dropping = (ctx.task_seed(0), drop) if drop is not None else None
            kernels.radix_counts(values, prefixes[t], counts[t], dropping)
        return total

    total = count([-1] * tasks)
    rank = total - int(total * k)
    if rank <= 0:
        return torch.zeros(tasks)
    high, within = _bin_of_rank(counts, torch.full((tasks,), rank))
    counts.zero_()
    count(high.tolist())
    low, _ = _bin_of_rank(counts, within)
    return ((high << 16) | low).to(torch.int32).view(torch.float32)


def _bin_of_rank(counts: Tensor, rank: Tensor) -> tuple[Tensor, Tensor]:
    """Per task, the bin of ``counts`` (``[T, parts, bins]``) holding the ``rank``-th smallest
    entry (1-based), and that entry's rank within its bin."""
    cumulative = counts.sum(1).cumsum(1)  # [T, bins]
    where = torch.searchsorted(cumulative, rank.unsqueeze(1)).squeeze(1)
    before = cumulative.gather(1, (where - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    return where, rank - before * (where > 0)


@dataclass
class TiesState:
    """TIES' global view: one threshold per task, and the model-wide vote of the elected
    signs, counted while the blocks are merged.

    The vote only matters where the elected sign is a tie (kept entries of both signs summing
    to exactly 0). Blocks are merged as if the majority were negative, and each such entry is
    kept in ``pending`` with its value under a positive majority; :func:`ties_finish`
    settles them once the vote is complete. That saves a whole pass over the task vectors.
    """

    thresholds: Tensor
    votes: int = 0
    pending: list[tuple[str, Tensor, Tensor]] = field(default_factory=list)
    """(parameter, flat indices, values under a positive majority)."""


def ties_prepare(
    vectors: TaskVectors, seed: int, k: float, transform: Transform | None = None
) -> TiesState | None:
    """The thresholds: a sample and one counting pass."""
    if not vectors.tasks:
        return None
    return TiesState(global_thresholds(vectors, k, seed, transform))


def ties_merge(
    task_vectors: Tensor,
    ctx: TensorContext,
    merge: str,
    drop: Drop | None = None,
    consensus: tuple[float, int] | None = None,
) -> Tensor:
    """Trim, elect, disjoint merge of one parameter (or block), given ``ctx.state``.

    Runs fused (:func:`atmbench.kernels.ties_merge`): it computes
    ``disjoint_merge(t, elect_sign(t, majority), merge)`` with ``t = trim(τ, thresholds)``,
    up to the rounding of the sums over tasks (summed in task order). ``drop`` merges
    ``drop(task_vectors, ctx)`` instead, drawn by the kernel (DARE-TIES); ``consensus =
    (λ, agree)`` masks the result as ``consensus_mask(tall_masks(τ, merged, λ), agree)``
    does (Consensus-TIES). The entries a tie leaves to the majority are recorded after both.
    """
    state: TiesState = ctx.state
    mean = merge == "mean"
    out = ctx.result("ties", task_vectors[0].shape)
    dropping = None
    if drop:  # the seeds are derived (hashed) per block only where masks are drawn
        dropping = ([ctx.task_seed(t) for t in range(len(task_vectors))], ctx.offset, drop.p)

    def fused(majority: float, out: Tensor | None = None) -> tuple[Tensor, int, int]:
        return kernels.ties_merge(
            task_vectors, state.thresholds, majority, mean, out, dropping, consensus
        )

    result, votes, undecided = fused(-1.0, out)
    state.votes += votes
    if undecided:
        positive = fused(1.0)[0]
        where = (positive != result).reshape(-1).nonzero().squeeze(1)
        state.pending.append((ctx.key, where + ctx.offset, positive.reshape(-1)[where]))
    return result


def ties_finish(state: TiesState | None, delta: dict[str, Tensor]) -> None:
    """Give the entries whose elected sign was a tie the majority's sign, if it is positive
    (the blocks were merged as for a negative or zero majority)."""
    if state is not None and state.votes > 0:
        for key, where, values in state.pending:
            delta[key].view(-1)[where] = values


# ---------------------------------------------------------------- DARE


def dare(task_vectors: Tensor, ctx: TensorContext, p: float) -> Tensor:
    """τ ⊙ (u > p) / (1 − p) with u from ``ctx.uniform`` (the keep masks of FusionBench's
    ``rand > p``), fused (:func:`atmbench.kernels.dare`), in a ``ctx.scratch`` buffer: valid
    until the next block."""
    seeds = [ctx.task_seed(t) for t in range(len(task_vectors))]
    out = ctx.scratch.empty("dare", (len(task_vectors), *task_vectors[0].shape))
    return kernels.dare(task_vectors, seeds, ctx.offset, p, out)


@dataclass(frozen=True)
class Drop:
    """DARE's drop as TIES' transform (DARE-TIES): ``Drop(p)(τ, ctx) == dare(τ, ctx, p)``.

    The counting and merging kernels recognize it and draw the masks themselves, chunk by
    chunk, instead of writing the dropped vectors out and reading them back.
    """

    p: float

    def __call__(self, task_vectors: Tensor, ctx: TensorContext) -> Tensor:
        return dare(task_vectors, ctx, self.p)


# ---------------------------------------------------------------- Model Breadcrumbs


def band_limits(cols: int, keep: float, outliers: float) -> tuple[int, int]:
    """The band's ranks [start, stop) in a row of ``cols`` sorted by descending |τ|: the
    int(cols·outliers) largest are dropped, the int(cols·keep) next ones kept."""
    start = int(cols * outliers)
    return start, min(start + int(cols * keep), cols)


def middle_band(tensor: Tensor, keep: float, outliers: float) -> Tensor:
    """Mask of the official Breadcrumbs band, per row along the last dimension, selected as
    the official ``TaskVectorMiddleKeep`` selects it: ``torch.topk`` of |τ| drops the
    outliers (zeroed), then ``torch.topk`` of what remains keeps the band, so ties at the
    band's bounds are broken as topk breaks them. A 1-D tensor is one row; a 0-D tensor is
    kept whole.

    :func:`breadcrumbs_sum` needs it only for rows where a bound is repeated across the
    band's edge: elsewhere the band is the same whatever the tie rule.
    """
    if tensor.dim() == 0:
        return torch.ones_like(tensor, dtype=torch.bool)
    start, stop = band_limits(tensor.shape[-1], keep, outliers)
    magnitude = tensor.abs()
    outlier = magnitude.topk(start, dim=-1).indices
    magnitude.scatter_(-1, outlier, 0.0)
    band = torch.zeros_like(tensor, dtype=torch.bool)
    band.scatter_(-1, magnitude.topk(stop - start, dim=-1).indices, True)
    return band.scatter_(-1, outlier, False)


def breadcrumbs_sum(
    task_vectors: TaskRows, keep: float, outliers: float, out: Tensor | None = None
) -> Tensor:
    """Σ_t τ_t ⊙ middle_band(τ_t), summed in task order (the official code's ``sum()``), of
    stacked task vectors ``[T, ...]`` or T tensors, into ``out`` if given.

    Two order statistics per row and task bound the band (:func:`atmbench.kernels.band_sum`,
    fused with the sum; 8x to 40x faster than the two ``torch.topk`` per row); only rows
    where a task repeats a bound across the band's edge need the tie rule, and only those
    pay for :func:`middle_band`.
    """
    shape = task_vectors[0].shape
    if not shape:  # 0-D parameters: kept whole
        return sum_tasks(task_vectors, torch.empty((), device=task_vectors[0].device))
    cols = shape[-1]
    start, stop = band_limits(cols, keep, outliers)
    if stop <= start:
        return torch.zeros(shape, device=task_vectors[0].device)
    total, repeats = kernels.band_sum(task_vectors, start, stop, out)
    repeated = repeats.reshape(-1)
    if bool(repeated.any()):
        rows = [tv.float().reshape(-1, cols)[repeated] for tv in task_vectors]
        banded = [row * middle_band(row, keep, outliers) for row in rows]
        total.view(-1, cols)[repeated] = sum_tasks(banded, torch.empty_like(banded[0]))
    return total
