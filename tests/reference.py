"""The torch definitions of the masking math that :mod:`atmbench.kernels` fuses.

Readable, unfused, and only what the tests (and ``benchmarks/test_kernel_gain.py``) compare
the kernels with: production code runs the kernels. Stacked task vectors ``[T, ...]``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from atmbench.method import TensorContext
from atmbench.streaming import floating_keys


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
    total = (trimmed * agree).sum(0)
    if merge == "sum":
        return total
    return total / agree.sum(0).clamp(min=1)


def dare_keep_masks(task_vectors: Tensor, ctx: TensorContext, p: float) -> Tensor:
    """Keep masks (keep with probability 1 − p) from ``ctx.uniform``: ``uniform > p`` keeps an
    entry, as FusionBench's ``rand > p`` does."""
    return torch.stack([ctx.uniform(t, tv.shape) > p for t, tv in enumerate(task_vectors)])


def dare_rescale(task_vectors: Tensor, keep: Tensor, p: float) -> Tensor:
    """τ ⊙ keep / (1 − p): the survivors are rescaled so that E[result] = τ."""
    return task_vectors * keep / (1.0 - p)


def tall_masks(task_vectors: Tensor, merged: Tensor, lam: float) -> Tensor:
    """m_t = |τ_t| > λ |τ_MTL − τ_t| (the official strict ``>``), in task-vector space."""
    return task_vectors.abs() > lam * (merged.unsqueeze(0) - task_vectors).abs()


def consensus_mask(masks: Tensor, agree: int) -> Tensor:
    """Entries that at least ``agree`` task masks keep (2 drops selfish and catastrophic)."""
    return masks.sum(0) >= agree


def bracket_counts(values: Tensor, lo: float, hi: float) -> tuple[int, Tensor]:
    """How many |values| are < lo, and the |values| in [lo, hi] (``kernels.bracket_counts``
    for one part)."""
    magnitudes = values.abs().reshape(-1)
    return int((magnitudes < lo).sum()), magnitudes[(magnitudes >= lo) & (magnitudes <= hi)]


def partition_thresholds(vectors, k: float, seed: int = 0, transform=None) -> Tensor:
    """TIES' model-wide thresholds by gathering each task's |τ| in float32 and selecting with
    ``np.partition``: ``masking.exact_thresholds``' definition (its fallback until it counted
    the float bits instead), holding a whole task vector."""
    out = torch.zeros(len(vectors.tasks))
    for t, task in enumerate(vectors.tasks):
        pieces = []
        for key in floating_keys(vectors):
            values = vectors.get(task, key).unsqueeze(0)
            if transform:
                values = transform(values.float(), TensorContext(key, (task,), seed))
            pieces.append(values.float().abs().reshape(-1).cpu().numpy())
        magnitudes = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
        rank = magnitudes.size - int(magnitudes.size * k)
        if rank > 0:
            out[t] = float(np.partition(magnitudes, rank - 1)[rank - 1])
    return out


def official_middle_keep(tensor: Tensor, keep: float, outliers: float) -> Tensor:
    """Breadcrumbs' masked task vector as the official ``TaskVectorMiddleKeep`` computes it
    (``remove_first=True``), restated: zero the int(cols·outliers) largest |τ| of each row
    (``torch.topk``), then keep the int(cols·keep) largest |τ| of what remains."""
    if tensor.dim() == 0:
        return tensor
    cols = tensor.shape[-1]
    outlier = torch.topk(tensor.abs(), int(cols * outliers)).indices
    remaining = torch.ones(tensor.shape).scatter_(-1, outlier, 0.0) * tensor
    band = torch.topk(remaining.abs(), int(cols * keep)).indices
    return torch.zeros(tensor.shape).scatter_(-1, band, 1.0) * remaining
