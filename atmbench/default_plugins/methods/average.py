"""Weight averaging: θ = θ0 + (1/T) Σ_t τ_t, the mean of the experts."""

from __future__ import annotations

import torch
from torch import Tensor

from atmbench.hookspecs import hookimpl
from atmbench.method import MergeMethod, TensorContext


def average(base: Tensor, task_vectors: Tensor, ctx: TensorContext) -> Tensor:
    return torch.mean(task_vectors, 0, out=ctx.scratch.empty("mean", task_vectors.shape[1:]))


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
