"""MagMax (Marczak et al., ECCV 2024, arXiv 2407.06322): θ = θ0 + α τ_max.

Per entry, τ_max takes the task vector entry of largest magnitude, sign included. It follows
the official code (danielm1405/magmax ``src/merging/task_vectors.py::merge_max_abs``) and
FusionBench 0.2.33 (``fusion_bench/method/magmax/magmax.py``), checked against the latter in
``tests/data/golden/magmax.safetensors``:

- Ties: tasks are folded in order and an entry is replaced when the new magnitude is ≥ the
  running one, so the **later task wins a tie** (also between +x and −x).
- Every floating-point parameter is merged, 1-D ones included; integer buffers never
  reach a merge.
- α defaults to 0.5, hard-coded in every released merge script and FusionBench's default.
  The paper fixes it rather than tuning it; the search grid 0.1 … 1.0 is the
  ``linspace(0, 1, 11)[1:]`` sweep left commented out in the official script (FusionBench's
  docs report α = 0.6 as the best on ViT-B/32, 71.10 vs 70.70 at 0.5).

Departure: the paper's τ_t come from *sequential* fine-tuning (each task starts from the
previous expert, still measured against θ0); atmbench merges the suite's independent experts
like every other method, which is FusionBench's "independent fine-tunes" row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from atmbench.hookspecs import hookimpl
from atmbench.hparams import HParam
from atmbench.method import MergeMethod, TensorContext

ALPHA = HParam(
    "alpha",
    default=0.5,
    search=tuple(round(0.1 * i, 1) for i in range(1, 11)),
    low=0.0,
    help="scaling coefficient of the max-magnitude task vector",
)


def magmax(base: Tensor, task_vectors: Sequence[Tensor], ctx: TensorContext) -> Tensor:
    shape = task_vectors[0].shape
    out = ctx.result("magmax", shape).copy_(task_vectors[0])
    best = torch.abs(out, out=ctx.scratch.empty("best", shape))
    size = ctx.scratch.empty("size", shape)
    wins = torch.empty(shape, dtype=torch.bool)
    for tau in task_vectors[1:]:
        torch.ge(torch.abs(tau, out=size), best, out=wins)  # ≥: the later task wins ties
        torch.where(wins, tau, out, out=out)
        torch.where(wins, size, best, out=best)
    return out


@hookimpl
def register_methods(register):
    register(
        MergeMethod(
            name="magmax",
            merge=magmax,
            data="none",
            rowwise=True,
            stacked=False,
            scale=ALPHA,
            description="MagMax: per entry, the task vector value of largest magnitude",
        )
    )
