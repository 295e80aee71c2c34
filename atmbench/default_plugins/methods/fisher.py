"""Fisher merging (Matena & Raffel, NeurIPS 2022): θ = Σ_t F_t θ_t / Σ_t F_t, entry by entry.

F_t is the diagonal Fisher of expert t on ``statistics.EXAMPLES`` training examples of its
task (the ``fisher`` statistic: exact expectation over labels under the frozen head).
Methods return Δ = θ − θ0; since Σ F_t θ0 / Σ F_t = θ0, Δ = Σ_t F_t τ_t / Σ_t F_t exactly.

Decisions:

- Every Fisher entry is floored at ``FLOOR`` = 1e-6 (the official code's ``fisher_floor``
  and FusionBench's ``minimal_fisher_weight``), so entries no example moves fall back to
  the plain average instead of 0/0. A parameter with no Fisher at all is averaged too.
- Equal per-task coefficients, no per-model Fisher normalisation (FusionBench's
  ``normalize_fisher_weight`` divides each model's Fisher by its global norm; the paper
  does not), and no final scale: the result is a weighted average of the experts, and with
  one task it is the expert.
"""

from __future__ import annotations

from torch import Tensor

from atmbench.hookspecs import hookimpl
from atmbench.method import MergeInputError, MergeMethod, TensorContext

FLOOR = 1e-6


def fisher_merge(base: Tensor, task_vectors: Tensor, ctx: TensorContext) -> Tensor:
    fisher = ctx.stats.get("fisher")
    if fisher is None:
        return task_vectors.mean(0)
    if fisher.shape != task_vectors.shape:
        raise MergeInputError(
            f"parameter {ctx.key!r}: Fisher of shape {tuple(fisher.shape)}, expected "
            f"{tuple(task_vectors.shape)} (tasks x parameter)"
        )
    weights = fisher.to(task_vectors).clamp_min(FLOOR)
    return (weights * task_vectors).sum(0) / weights.sum(0)


@hookimpl
def register_methods(register):
    register(
        MergeMethod(
            name="fisher",
            merge=fisher_merge,
            data="train",
            needs=("fisher",),
            description="Fisher merging: experts averaged with diagonal-Fisher weights",
        )
    )
