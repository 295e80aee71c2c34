"""Consensus merging with TALL masks (Wang et al., ICML 2024) over TA (``consensus_ta``) and
TIES (``consensus_ties``).

Per task m_t = 1{|τ_t| > λ_t |τ_MTL − τ_t|}; an entry survives where at least ``agree``
(k = 2) masks keep it; the result is τ_MTL ⊙ consensus, scaled by λ.

Decisions, from the official code (nik-dim/tall_masks ``aggregation.py`` and
``tallmask_utils.py``):

- Strict ``>``, as the code (ALGORITHMS.md writes ≥). The code compares in parameter space,
  |θ0 − θ_t| > λ|(θ0 + τ_MTL) − θ_t|; we compare the same quantities in task-vector space
  (equal up to float rounding; the golden masks match).
- The consensus mask multiplies the *merged* vector τ_MTL (TA's sum or TIES's vector); it is
  not fed back into the base method. For TA the two readings coincide.
- ``consensus_ties`` builds τ_MTL with TIES at k = 0.2 and the disjoint *sum* (the code's
  ``reset_thresh=20, merge_func="dis-sum"``), for the masks and for the output alike.
- The code picks λ_t per task on that task's validation accuracy; here one shared
  ``mask_lam`` is searched over the same grid {0.2, …, 0.6} on the mean validation accuracy
  (the runner selects on the mean). Default 0.6 (FusionBench's TALL-mask default).
- λ (the final scale) uses Task Arithmetic's grid.
- ``consensus`` names ``consensus_ta``, the paper's headline variant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from torch import Tensor

from atmbench import kernels
from atmbench.default_plugins.methods import ta
from atmbench.default_plugins.methods.masking import (
    MERGE,
    ties_finish,
    ties_k,
    ties_merge,
    ties_prepare,
)
from atmbench.hookspecs import hookimpl
from atmbench.hparams import HParam
from atmbench.method import MergeMethod, TaskVectors, TensorContext, sum_tasks

MASK_LAMBDA = HParam(
    "mask_lam",
    default=0.6,
    search=(0.2, 0.3, 0.4, 0.5, 0.6),
    low=0.0,
    help="λ_t of the TALL masks |τ_t| > λ_t |τ_MTL − τ_t| (shared by all tasks)",
)
AGREE = HParam(
    "agree",
    default=2,
    low=0,
    type=int,
    help="how many task masks must keep an entry (0 gives the base method back)",
)
TIES_MERGE = replace(MERGE, default="sum")


def consensus(
    merged: Tensor, task_vectors: Tensor, ctx: TensorContext, mask_lam: float, agree: int
) -> Tensor:
    """τ_MTL ⊙ 1{Σ_t m_t ≥ agree}: ``merged * consensus_mask(tall_masks(...), agree)``, fused
    (:func:`atmbench.kernels.consensus`), into ``ctx.result``."""
    out = ctx.result("consensus", merged.shape)
    return kernels.consensus(task_vectors, merged, mask_lam, agree, out)


def consensus_ta(
    base: Tensor, task_vectors: Sequence[Tensor], ctx: TensorContext, mask_lam: float, agree: int
) -> Tensor:
    merged = sum_tasks(task_vectors, ctx.scratch.empty("sum", task_vectors[0].shape))
    return consensus(merged, task_vectors, ctx, mask_lam, agree)


def prepare_ties(vectors: TaskVectors, seed: int, k: float, **_: object):
    return ties_prepare(vectors, seed, k)


def consensus_ties(
    base: Tensor,
    task_vectors: Tensor,
    ctx: TensorContext,
    mask_lam: float,
    agree: int,
    k: float,
    merge: str,
) -> Tensor:
    return ties_merge(task_vectors, ctx, merge, consensus=(mask_lam, agree))


@hookimpl
def register_methods(register):
    register(
        MergeMethod(
            name="consensus_ta",
            merge=consensus_ta,
            data="none",
            rowwise=True,
            stacked=False,
            version="2",
            hparams=(MASK_LAMBDA, AGREE),
            scale=ta.LAMBDA,
            aliases=("consensus",),
            description="Consensus merging: TALL-mask agreement over Task Arithmetic",
        )
    )
    register(
        MergeMethod(
            name="consensus_ties",
            merge=consensus_ties,
            data="none",
            rowwise=True,
            stacked=False,
            hparams=(MASK_LAMBDA, AGREE, ties_k(search=()), TIES_MERGE),
            scale=ta.LAMBDA,
            prepare=prepare_ties,
            finish=ties_finish,
            description="Consensus merging: TALL-mask agreement over TIES-Merging",
        )
    )
