"""TALL masks, Task-Localized masks (Wang et al., ICML 2024, arXiv 2405.07813).

One shared multi-task vector τ_MTL = Σ_t τ_t plus a 1-bit mask per task: task t is
evaluated with its own model θ_t = θ0 + m_t ⊙ τ_MTL, m_t = 1[|τ_t| > λ_t·|τ_MTL − τ_t|]
(the entries where task t's own vector is large next to what the other tasks add), so it
needs the task id at inference.

Follows the official code (nik-dim/tall_masks @d10af8b, ``src/utils/tallmask_utils.py::
generate_task_masks``, ``construct_tall_mask``, ``find_optimal_mask``; the same file ships
with LiNeS), checked against FusionBench 0.2.33's ``TallMaskTaskArithmeticAlgorithm`` in
``tests/data/golden/tall_masks.safetensors``:

- the strict ``>``; τ_MTL unscaled (the task-arithmetic sum, ``use_ties=false``) and the
  masked vector applied with coefficient 1; every floating-point parameter masked;
- λ_t ∈ {0.2, 0.3, 0.4, 0.5, 0.6}, chosen **per task** by that task's validation accuracy:
  the runner picks a per-task method's hyperparameters task by task (stored as
  ``lam.TASK`` where the tasks' choices differ).

Departures: FusionBench compares |θ0 − τ_t| where the official code has |τ_t| (its golden
is made with θ0 = 0, where the two agree) and uses one fixed λ (0.6, the default here);
the official ``use_ties`` variant (τ_MTL from TIES, top 20 %, disjoint sum) is not offered.
"""

from __future__ import annotations

from torch import Tensor

from atmbench.hookspecs import hookimpl
from atmbench.hparams import HParam
from atmbench.method import MergeMethod, TensorContext, sum_tasks

LAMBDA = HParam(
    "lam",
    default=0.6,
    search=(0.2, 0.3, 0.4, 0.5, 0.6),
    low=0.0,
    help="a task keeps the entries where |τ_t| > lam · |τ_MTL − τ_t| (chosen per task)",
)


def tall_masks(base: Tensor, task_vectors: Tensor, ctx: TensorContext, lam: float) -> Tensor:
    return sum_tasks(task_vectors, ctx.result("tall", task_vectors[0].shape))


def tall_task(
    shared: Tensor, task_vector: Tensor, index: int, ctx: TensorContext, lam: float
) -> Tensor:
    """m_t ⊙ τ_MTL of one parameter."""
    return (task_vector.abs() > lam * (shared - task_vector).abs()) * shared


@hookimpl
def register_methods(register):
    register(
        MergeMethod(
            name="tall_masks",
            merge=tall_masks,
            data="none",
            rowwise=True,
            stacked=False,
            hparams=(LAMBDA,),
            per_task=tall_task,
            per_task_bytes=lambda entries: (entries + 7) // 8,  # a 1-bit mask
            description="TALL masks: the task-arithmetic sum under a 1-bit mask per task",
        )
    )
