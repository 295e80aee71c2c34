"""RegMean (Jin et al., ICLR 2023): per linear map, W = (Σ_t G_t)⁻¹ Σ_t G_t W_t.

G_t is the Gram matrix of the map's inputs under expert t (the ``gram`` / ``gram_rows``
statistics), with its off-diagonal entries scaled by α: G̃ = α G + (1 − α) diag(G).
Methods return Δ = W − W0; since (Σ G̃_t)⁻¹ Σ G̃_t W0 = W0, Δ = (Σ G̃_t)⁻¹ Σ G̃_t τ_t exactly.

Orientation: for weights applied as y = x Pᵀ (``gram``: ``nn.Linear`` layout [out, in],
``attn.in_proj_weight``, ``attn.out_proj``, ``mlp.c_fc``, ``mlp.c_proj``) the input meets
P's columns, so Δ = (Σ τ_t G̃_t)(Σ G̃_t)⁻¹; for weights applied as y = x P (``gram_rows``:
open_clip's ``proj`` [in, out]) Δ = (Σ G̃_t)⁻¹ Σ G̃_t τ_t.

Decisions:

- Every other parameter (biases, LayerNorm, embeddings, the patch conv) is averaged, as in
  the official code and FusionBench.
- The system is solved with the pseudo-inverse of Σ G̃_t in float64 (the official code calls
  ``torch.inverse``). They agree when Σ G̃_t is invertible; where it is singular (an input
  direction no example ever excites) the pseudo-inverse leaves that direction at the base.
- α ("reduce_non_diagonal_ratio") defaults to 0.9 (ALGORITHMS.md) and is searched over
  {0.1, 0.3, 0.5, 0.7, 0.9} on validation; α = 1 (plain RegMean) is allowed.
- No final scale: RegMean produces the merged weights. With one task it gives the expert
  back wherever its Gram is invertible (at α < 1 it is whenever every input is non-zero).
"""

from __future__ import annotations

import torch
from torch import Tensor

from atmbench.hookspecs import hookimpl
from atmbench.hparams import HParam
from atmbench.method import MergeInputError, MergeMethod, TensorContext

ALPHA = HParam(
    "alpha",
    default=0.9,
    search=(0.1, 0.3, 0.5, 0.7, 0.9),
    low=0.0,
    high=1.0,
    help="scale of the Gram matrices' off-diagonal entries",
)


def shrink(grams: Tensor, alpha: float) -> Tensor:
    """α G + (1 − α) diag(G), on a stack of Gram matrices."""
    return alpha * grams + (1 - alpha) * torch.diag_embed(torch.diagonal(grams, dim1=-2, dim2=-1))


def solve_rows(grams: Tensor, task_vectors: Tensor) -> Tensor:
    """(Σ G_t)⁺ Σ G_t τ_t for weights whose rows meet the input (y = x P)."""
    g = grams.double()
    rhs = torch.einsum("tij,tjo->io", g, task_vectors.double())
    return (torch.linalg.pinv(g.sum(0), hermitian=True) @ rhs).to(task_vectors.dtype)


def regmean(base: Tensor, task_vectors: Tensor, ctx: TensorContext, alpha: float) -> Tensor:
    if "gram" in ctx.stats:
        grams, inputs = ctx.stats["gram"], base.shape[-1]
    elif "gram_rows" in ctx.stats:
        grams, inputs = ctx.stats["gram_rows"], base.shape[0]
    else:
        return task_vectors.mean(0)
    if base.dim() != 2 or grams.shape != (len(task_vectors), inputs, inputs):
        raise MergeInputError(
            f"parameter {ctx.key!r} of shape {tuple(base.shape)}: Gram matrices of shape "
            f"{tuple(grams.shape)} do not fit its {inputs} inputs and {len(task_vectors)} tasks"
        )
    grams = shrink(grams.to(task_vectors), alpha)
    if "gram" in ctx.stats:
        return solve_rows(grams, task_vectors.transpose(1, 2)).T
    return solve_rows(grams, task_vectors)


@hookimpl
def register_methods(register):
    register(
        MergeMethod(
            name="regmean",
            merge=regmean,
            data="train",
            hparams=(ALPHA,),
            needs=("gram", "gram_rows"),
            description="RegMean: per linear layer, the least-squares merge of the experts",
        )
    )
