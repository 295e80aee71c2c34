"""Masking math shared by TIES, DARE, Model Breadcrumbs and Consensus merging.

Pure tensor functions (trim, elect, disjoint merge, DARE drop, TALL/consensus masks, the
middle band of Breadcrumbs) plus the one streaming pass TIES needs for its global view.
``task_vectors`` are always stacked on a leading task dimension ``[T, ...]``; nothing here
mutates its inputs.

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

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from atmbench.hparams import HParam
from atmbench.method import TaskVectors, TensorContext

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

_HI_BINS = 1 << 15  # |x| as float32 bits has a clear sign bit: 15 high bits, 16 low bits
_LO_BINS = 1 << 16


def _float_bits(magnitudes: Tensor) -> Tensor:
    """Non-negative float32 values as int32 bit patterns: the order of the bits is the order
    of the values, which makes an exact radix selection by histograms possible."""
    return magnitudes.float().contiguous().view(torch.int32).reshape(magnitudes.shape[0], -1)


def _per_task_histogram(values: Tensor, bins: int) -> Tensor:
    """``values``: [T, m] ints in [0, bins); returns the [T, bins] counts."""
    tasks = values.shape[0]
    offsets = torch.arange(tasks, dtype=torch.int64).unsqueeze(1) * bins
    flat = (values.long() + offsets).reshape(-1)
    return torch.bincount(flat, minlength=tasks * bins).reshape(tasks, bins)


def _locate(counts: Tensor, rank: Tensor) -> tuple[Tensor, Tensor]:
    """Per task, the bin holding the ``rank``-th smallest value (1-based) and the rank
    left inside that bin."""
    cum = counts.cumsum(1)
    index = torch.searchsorted(cum, rank.unsqueeze(1)).squeeze(1)
    before = torch.where(
        index > 0, cum.gather(1, (index - 1).clamp(min=0).unsqueeze(1)).squeeze(1), 0
    )
    return index, rank - before


def _magnitudes(vectors: TaskVectors, seed: int, transform: Transform | None):
    """Yield (ctx, |transformed τ| stacked [T, ...]) for every floating-point parameter."""
    tasks = tuple(vectors.tasks)
    for key in vectors.keys(tasks[0]):
        stacked = vectors.stacked(key)
        if not stacked.is_floating_point():
            continue
        ctx = TensorContext(key, tasks, seed)
        stacked = stacked.float()
        yield ctx, (transform(stacked, ctx) if transform else stacked)


def global_thresholds(
    vectors: TaskVectors, k: float, seed: int = 0, transform: Transform | None = None
) -> Tensor:
    """Per task, the (d − int(k·d))-th smallest |τ| over all parameters: ``[T]`` float32.

    Public: third-party methods (atmbench-doge) build their global masks on it.

    Exact, yet streaming: two passes of per-task histograms over the float32 bit patterns
    (15 high bits, then the 16 low bits inside the chosen bin), so memory stays at one
    parameter per task instead of one flattened model per task. ``k = 1`` gives 0 (keep all).
    """
    tasks = len(vectors.tasks)
    hi_counts = torch.zeros(tasks, _HI_BINS, dtype=torch.int64)
    for _, tv in _magnitudes(vectors, seed, transform):
        hi_counts += _per_task_histogram(_float_bits(tv.abs()) >> 16, _HI_BINS)
    total = int(hi_counts[0].sum())
    rank = total - int(total * k)
    if rank <= 0:
        return torch.zeros(tasks)
    ranks = torch.full((tasks,), rank, dtype=torch.int64)
    hi, rank_in_bin = _locate(hi_counts, ranks)
    lo_counts = torch.zeros(tasks, _LO_BINS, dtype=torch.int64)
    for _, tv in _magnitudes(vectors, seed, transform):
        bits = _float_bits(tv.abs())
        in_bin = (bits >> 16) == hi.unsqueeze(1).int()
        outside = torch.where(in_bin, bits & 0xFFFF, _LO_BINS)  # one spare bin, sliced off
        lo_counts += _per_task_histogram(outside, _LO_BINS + 1)[:, :_LO_BINS]
    lo, _ = _locate(lo_counts, rank_in_bin)
    return ((hi << 16) | lo).int().view(torch.float32)


def _per_entry(thresholds: Tensor, like: Tensor) -> Tensor:
    return thresholds.reshape(-1, *([1] * (like.dim() - 1)))


def trim(task_vectors: Tensor, thresholds: Tensor) -> Tensor:
    """Keep the entries with |τ_t| ≥ threshold_t (the official ``>=``), zero the rest."""
    keep = task_vectors.abs() >= _per_entry(thresholds, task_vectors)
    return task_vectors * keep


def elect_sign(trimmed: Tensor, majority: float) -> Tensor:
    """γ = sign(Σ_t τ̂_t), with the model-wide ``majority`` sign where the sum is 0."""
    sign = torch.sign(trimmed.sum(0))
    return torch.where(sign == 0, torch.as_tensor(majority, dtype=sign.dtype), sign)


def disjoint_merge(trimmed: Tensor, sign: Tensor, merge: str) -> Tensor:
    """Sum or mean of the entries agreeing with ``sign``; a 0 sign keeps negative entries."""
    agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * agree
    total = selected.sum(0)
    if merge == "sum":
        return total
    return total / agree.sum(0).clamp(min=1)


@dataclass(frozen=True)
class TiesState:
    """TIES' global view: one threshold per task and the model-wide majority sign."""

    thresholds: Tensor
    majority: float


def ties_prepare(
    vectors: TaskVectors, seed: int, k: float, transform: Transform | None = None
) -> TiesState | None:
    """Thresholds (two passes), then the majority of the elected signs (a third pass)."""
    if not vectors.tasks:
        return None
    thresholds = global_thresholds(vectors, k, seed, transform)
    votes = 0.0
    for _, tv in _magnitudes(vectors, seed, transform):
        votes += float(torch.sign(trim(tv, thresholds).sum(0)).sum())
    return TiesState(thresholds, float(torch.sign(torch.tensor(votes))))


def ties_merge(task_vectors: Tensor, state: TiesState, merge: str) -> Tensor:
    """Trim, elect, disjoint merge of one parameter, given the global ``state``."""
    trimmed = trim(task_vectors, state.thresholds)
    return disjoint_merge(trimmed, elect_sign(trimmed, state.majority), merge)


# ---------------------------------------------------------------- DARE


def dare_keep_masks(task_vectors: Tensor, ctx: TensorContext, p: float) -> Tensor:
    """Bernoulli keep masks (keep with probability 1 − p), one generator per task.

    Seeded by (seed, parameter, task) through ``ctx.generator``, so a task's mask does not
    depend on the other tasks or their order. ``rand > p`` keeps an entry, as FusionBench does.
    """
    return torch.stack(
        [torch.rand(tv.shape, generator=ctx.generator(t)) > p for t, tv in enumerate(task_vectors)]
    )


def dare_rescale(task_vectors: Tensor, keep: Tensor, p: float) -> Tensor:
    """τ ⊙ keep / (1 − p): the survivors are rescaled so that E[result] = τ."""
    return task_vectors * keep / (1.0 - p)


def dare(task_vectors: Tensor, ctx: TensorContext, p: float) -> Tensor:
    return dare_rescale(task_vectors, dare_keep_masks(task_vectors, ctx, p), p)


# ---------------------------------------------------------------- Consensus / TALL masks


def tall_masks(task_vectors: Tensor, merged: Tensor, lam: float) -> Tensor:
    """m_t = |τ_t| > λ |τ_MTL − τ_t| (the official strict ``>``), in task-vector space."""
    return task_vectors.abs() > lam * (merged.unsqueeze(0) - task_vectors).abs()


def consensus_mask(masks: Tensor, agree: int) -> Tensor:
    """Entries that at least ``agree`` task masks keep (2 drops selfish and catastrophic)."""
    return masks.sum(0) >= agree


# ---------------------------------------------------------------- Model Breadcrumbs


def middle_band(tensor: Tensor, keep: float, outliers: float) -> Tensor:
    """Mask of the official Breadcrumbs band, per row along the last dimension.

    With c = ``tensor.shape[-1]``, drop the int(c·outliers) largest |τ| of each row, then
    keep the int(c·keep) largest of what remains (a 1-D tensor is one row; a 0-D tensor is
    kept whole). Ties are broken by a stable sort, i.e. by position.
    """
    if tensor.dim() == 0:
        return torch.ones_like(tensor, dtype=torch.bool)
    cols = tensor.shape[-1]
    start = int(cols * outliers)
    stop = min(start + int(cols * keep), cols)
    order = torch.argsort(tensor.abs(), dim=-1, descending=True, stable=True)
    mask = torch.zeros_like(tensor, dtype=torch.bool)
    return mask.scatter(-1, order[..., start:stop], True)
