"""Weight averaging: θ = θ0 + (1/T) Σ_t τ_t, the mean of the experts."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from atmbench.hookspecs import hookimpl
from atmbench.method import MergeMethod, TensorContext, sum_tasks


def average(base: Tensor, task_vectors: Sequence[Tensor], ctx: TensorContext) -> Tensor:
    total = sum_tasks(task_vectors, ctx.result("mean", task_vectors[0].shape))
    return total.div_(len(task_vectors))


@hookimpl
def register_methods(register):
    register(
        MergeMethod(
            name="average",
            merge=average,
            data="none",
            rowwise=True,
            stacked=False,
            version="2",
            description="Weight averaging (model soup of the experts)",
        )
    )
