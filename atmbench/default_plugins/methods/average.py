"""Weight averaging: θ = θ0 + (1/T) Σ_t τ_t, the mean of the experts."""

from __future__ import annotations

from torch import Tensor

from atmbench.hookspecs import hookimpl
from atmbench.method import MergeMethod, TensorContext


def average(base: Tensor, task_vectors: Tensor, ctx: TensorContext) -> Tensor:
    return task_vectors.mean(0)


@hookimpl
def register_methods(register):
    register(
        MergeMethod(
            name="average",
            merge=average,
            data="none",
            rowwise=True,
            description="Weight averaging (model soup of the experts)",
        )
    )
