"""Task Arithmetic (Ilharco et al., ICLR 2023): θ = θ0 + λ Σ_t τ_t.

λ is searched on validation over {0.05, ..., 1.0} as in the paper; FusionBench instead
fixes λ = 0.3 (``ta:lam=0.3`` reproduces that).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from atmbench.hookspecs import hookimpl
from atmbench.hparams import HParam
from atmbench.method import MergeMethod, TensorContext, sum_tasks

LAMBDA = HParam(
    "lam",
    default=0.3,
    search=tuple(round(0.05 * i, 2) for i in range(1, 21)),
    low=0.0,
    help="scaling coefficient of the summed task vectors",
)


def task_arithmetic(base: Tensor, task_vectors: Sequence[Tensor], ctx: TensorContext) -> Tensor:
    return sum_tasks(task_vectors, ctx.result("sum", task_vectors[0].shape))


@hookimpl
def register_methods(register):
    register(
        MergeMethod(
            name="ta",
            merge=task_arithmetic,
            data="none",
            rowwise=True,
            stacked=False,
            version="2",
            scale=LAMBDA,
            description="Task Arithmetic: sum of task vectors scaled by λ",
        )
    )
