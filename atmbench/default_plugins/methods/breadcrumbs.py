"""Model Breadcrumbs (Davari & Belilovsky, 2023): per task and row, drop the largest
(outliers) and the smallest magnitudes, keep the middle band, then Task Arithmetic with λ.

Decisions, from the official code (rezazzr/breadcrumbs ``TaskVectorMiddleKeep``, with
``remove_first=True``; FusionBench has no Breadcrumbs):

- The band is taken per row along the last dimension (2-D weights row by row, 1-D tensors
  as a whole; a 4-D conv kernel row by row of its last axis), not per tensor.
- ``outliers`` (official ``top_k_remove``, paper γ) is the fraction of each row's largest
  |τ| dropped first; ``keep`` (official ``top_k_keep``, paper β read as a density) is the
  fraction of the row kept from what remains. Both are floored: int(cols·fraction).
- Defaults are the official tuning script's starting point (keep 0.15, outliers 0.006,
  the paper's ≈85% sparsity); the grid samples the script's ranges β ∈ [0.05, 0.2],
  γ ∈ [0.001, 0.01]. λ uses Task Arithmetic's grid (the script searches α ∈ [0.01, 1]).
- Ties at the band's bounds are broken as the official code's two ``torch.topk`` calls
  break them. (Version 1 broke them by position, a stable sort: it differed from the
  official band only in rows where a non-zero |τ| is repeated across the band's edge.)
"""

from __future__ import annotations

from torch import Tensor

from atmbench.default_plugins.methods import ta
from atmbench.default_plugins.methods.masking import breadcrumbs_sum
from atmbench.hookspecs import hookimpl
from atmbench.hparams import HParam
from atmbench.method import MergeMethod, TensorContext

KEEP = HParam(
    "keep",
    default=0.15,
    search=(0.05, 0.1, 0.15, 0.2),
    low=0.0,
    high=1.0,
    help="fraction of each row kept after the outliers are dropped",
)
OUTLIERS = HParam(
    "outliers",
    default=0.006,
    search=(0.001, 0.006, 0.01),
    low=0.0,
    high=1.0,
    help="fraction of each row's largest magnitudes dropped",
)


def breadcrumbs(
    base: Tensor, task_vectors: Tensor, ctx: TensorContext, keep: float, outliers: float
) -> Tensor:
    out = ctx.result("band", task_vectors[0].shape)
    return breadcrumbs_sum(task_vectors, keep, outliers, out)


@hookimpl
def register_methods(register):
    register(
        MergeMethod(
            name="breadcrumbs",
            merge=breadcrumbs,
            data="none",
            rowwise=True,
            stacked=False,
            version="2",
            hparams=(KEEP, OUTLIERS),
            scale=ta.LAMBDA,
            description="Model Breadcrumbs: middle magnitude band per row, then Task Arithmetic",
        )
    )
