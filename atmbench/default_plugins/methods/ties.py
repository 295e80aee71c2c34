"""TIES-Merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint merge; θ = θ0 + λ τ_m.

Decisions (official code vs ALGORITHMS.md; details in :mod:`.masking` and
``tests/data/golden/RECIPE.md``):

- Trim is global, as in the official notebook: one threshold per task over every
  floating-point parameter, 1-D ones included, keeping |τ| ≥ the (d − int(k·d))-th smallest
  magnitude (n + 1 entries). ``prepare`` computes it exactly by streaming the task vectors.
- Zero-sum sign rule as the code does it (majority of the elected signs), not as
  ALGORITHMS.md words it (sign of the sum over all entries).
- ``merge=mean`` (the paper and official code) is the default; ``merge=sum`` reproduces
  FusionBench, whose λ default is 0.3.
- k is searched over {0.1, 0.2, 0.3} (the paper's grid). λ is searched over 0.1 … 1.8: the
  paper's 0.8 … 1.8 for the disjoint mean, extended down so that ``merge=sum`` (FusionBench
  λ = 0.3) is covered too. The default λ = 1 is the official notebook's value.
"""

from __future__ import annotations

from torch import Tensor

from atmbench.default_plugins.methods.masking import (
    MERGE,
    ties_finish,
    ties_k,
    ties_merge,
    ties_prepare,
)
from atmbench.hookspecs import hookimpl
from atmbench.hparams import HParam
from atmbench.method import MergeMethod, TaskVectors, TensorContext

K = ties_k()

LAMBDA = HParam(
    "lam",
    default=1.0,
    search=tuple(round(0.1 * i, 1) for i in range(1, 19)),
    low=0.0,
    help="scaling coefficient of the merged task vector",
)


def prepare(vectors: TaskVectors, seed: int, k: float, **_: object):
    return ties_prepare(vectors, seed, k)


def ties(base: Tensor, task_vectors: Tensor, ctx: TensorContext, k: float, merge: str) -> Tensor:
    return ties_merge(task_vectors, ctx, merge)


@hookimpl
def register_methods(register):
    register(
        MergeMethod(
            name="ties",
            merge=ties,
            data="none",
            rowwise=True,
            stacked=False,
            hparams=(K, MERGE),
            scale=LAMBDA,
            prepare=prepare,
            finish=ties_finish,
            description="TIES-Merging: global top-k trim, sign election, disjoint mean",
        )
    )
