"""Iso-C and Iso-CTS, isotropic merging (Marczak et al., ICML 2025): θ = θ0 + α Δ_iso.

Iso-C, per matrix: Σ_t τ_t = U S Vᵀ and Δ = σ̄ U Vᵀ with σ̄ the mean singular value.
Iso-CTS, per matrix: the top k singular directions of Σ_t τ_t form the common subspace;
each task adds its top n directions of (I − U_c U_cᵀ) τ_t; the concatenated U and Vᵀ are
replaced by their polar factors and every singular value by the mean of the combined
spectrum (common singular values of the sum included).

Decisions, checked against ``tests/data/golden/iso_{c,cts,cts_f05}.safetensors``
(RECIPE.md; official ``danielm1405/iso-merging`` ``src/utils/iso.py``):

- "Other" (non-2-D) tensors get the **mean** of the task vectors, Σ/T, in both methods, as
  the official code does; ALGORITHMS.md's "other tensors as TA" (the sum) is not what it does.
- Iso-CTS sizes as the code: k0 = int(r·f), n = round((r − k0)/T) with Python's
  round-half-to-even, k = r − T·n, so the task-specific part divides evenly among tasks.
  At f = 0.8 on small matrices n can be 0 and Iso-CTS equals Iso-C. Where rounding up
  would ask for more than r directions (T·n > r, e.g. f = 0.1 with r = 5, T = 8, a case
  the official code crashes on), n is capped at ⌊r/T⌋.
- The task-specific projection is one-sided (left singular vectors only), as in the code.
- With one task neither method gives the expert back: the spectrum is flattened (Iso-CTS
  then equals Iso-C); the "other" tensors are the expert's.
- α defaults to 1 (official config and FusionBench); searched over 0.1 … 3.0 on validation.

Decompositions and error bounds (``spectral``'s module docstring has the details): Iso-C
takes σ (all of them: σ̄ is the nuclear norm over r) and U Vᵀ of the sum from its float64
Gram eigendecomposition, accepted while λ_min ≥ 1.5e-8·λ_max (error about ε₆₄·κ², below
float32 rounding), otherwise from the SVD; the final product X·(XᵀX)^(-1/2) runs in
float32 only when κ(X) ≤ 10 (relative rounding error about ε₃₂·κ·√n < 1e-5). Iso-CTS's
task-specific triplets take ``top_triplets``' route (float32 Gram with the a-posteriori
residual check ‖AᵀU − VΣ‖_F ≤ 3e-5·σ_n, then float64, then the SVD) on each projected task
side by side, and the polar factors Iso-C's.

Speed: when m ≤ n the sum's left singular vectors form a complete basis of ℝᵐ, so the
projector I − U_c U_cᵀ is B Bᵀ with B the other m − k = T·n of them, all from one float64
eigendecomposition of the sum's Gram. Each residual B Bᵀ τ_t then has the triplets of the
small Bᵀ τ_t (T·n rows) with left vectors mapped by B, and since [B, U_c] is orthogonal,
polar([B A, U_c]) = [B polar(A), U_c]: neither the residuals nor the m×m polar factor are
formed (the m > n matrices project explicitly, as the official code does).
"""

from __future__ import annotations

import torch
from torch import Tensor

from atmbench.default_plugins.methods.spectral import (
    GRAM_RTOL,
    alpha_scale,
    gram_eigh,
    is_matrix,
    polar,
    singular_values_and_polar,
    top_triplets,
)
from atmbench.hookspecs import hookimpl
from atmbench.hparams import HParam
from atmbench.method import MergeMethod, TensorContext

COMMON_FRACTION = HParam(
    "common_fraction",
    default=0.8,
    low=0.0,
    high=1.0,
    help="share of the rank budget kept as the common subspace of the summed task vectors",
)


def iso_c(base: Tensor, task_vectors: Tensor, ctx: TensorContext) -> Tensor:
    if not is_matrix(base):
        return task_vectors.mean(0)
    if base.numel() == 0:  # no spectrum: nothing to flatten
        return torch.zeros_like(base)
    s, p = singular_values_and_polar(task_vectors.sum(0))
    return s.mean() * p


def split_rank(rank: int, tasks: int, common_fraction: float) -> tuple[int, int]:
    """(common directions k, directions per task n) with k + T·n = rank, as the code sizes them."""
    per_task = round((rank - int(rank * common_fraction)) / tasks)
    per_task = min(per_task, rank // tasks)
    return rank - tasks * per_task, per_task


def iso_cts_in_complement(task_vectors: Tensor, k: int, n: int) -> Tensor | None:
    """Iso-CTS's Δ for [T, m, n'] task vectors with m ≤ n' (see the module docstring).

    The sum's float64 Gram eigendecomposition S Sᵀ = W Λ Wᵀ gives U_c (top k columns of W),
    σ_c = √λ and V_cᵀ = U_cᵀ S / σ_c, and B (the other T·n columns). ``None`` when the k-th
    eigenvalue is too small to divide by (``spectral.GRAM_RTOL``): the general path's SVD
    fallback then handles the sum.
    """
    total = task_vectors.sum(0).double()
    lam, w = gram_eigh(total.mT)  # ascending
    rest = lam.shape[0] - k
    lam_c, u_c, basis = lam[rest:].flip(0), w[:, rest:].flip(1), w[:, :rest]
    if not bool((lam_c[-1:] > GRAM_RTOL * lam_c[:1]).all()):  # k = 0 has no eigenvalue
        return None
    s_c = lam_c.sqrt()
    vh_c = (u_c.mT @ total) / s_c[:, None]
    u_t, s_t, vh_t = top_triplets(basis.mT @ task_vectors.double(), n)
    s = torch.cat([s_t, s_c])
    p_t, p_vh = polar(u_t), polar(torch.cat([vh_t, vh_c]))
    p_u = torch.cat([basis @ p_t, u_c], 1)
    return (s.mean() * (p_u @ p_vh)).to(task_vectors.dtype)


def iso_cts(
    base: Tensor, task_vectors: Tensor, ctx: TensorContext, common_fraction: float
) -> Tensor:
    if not is_matrix(base):
        return task_vectors.mean(0)
    if base.numel() == 0:
        return torch.zeros_like(base)
    k, n = split_rank(min(base.shape), len(task_vectors), common_fraction)
    if n and base.shape[0] <= base.shape[1]:
        delta = iso_cts_in_complement(task_vectors, k, n)
        if delta is not None:
            return delta
    u, s, vh = top_triplets(task_vectors.sum(0, keepdim=True), k)
    if n:
        u_t, s_t, vh_t = top_triplets(task_vectors, n, project_out=u)
        u, s, vh = torch.cat([u_t, u], 1), torch.cat([s_t, s]), torch.cat([vh_t, vh])
    p_u, p_vh = polar(u), polar(vh)
    return s.mean() * (p_u @ p_vh)


@hookimpl
def register_methods(register):
    register(
        MergeMethod(
            name="iso_c",
            merge=iso_c,
            data="none",
            scale=alpha_scale(),
            description="Iso-C: summed task vectors with a flat (isotropic) spectrum",
        )
    )
    register(
        MergeMethod(
            name="iso_cts",
            merge=iso_cts,
            data="none",
            hparams=(COMMON_FRACTION,),
            scale=alpha_scale(),
            description="Iso-CTS: common + task-specific subspaces, isotropic spectrum",
        )
    )
