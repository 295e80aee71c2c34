"""DOGE's math (Wei et al., 2025, arXiv 2501.01230) as pure tensor functions.

One 2-D parameter at a time, with the task vectors stacked as ``[T, rows, cols]``:

1. task-aware coefficients λ_i = c / ‖τ_i‖_F;
2. the shared subspace B: each task's top ⌊r/T⌋ left singular vectors, stacked, and the
   first ⌊r/subspace⌋ left singular vectors of that stack (r = min(rows, cols));
3. a modification δ (zero at first) minimising
   L(δ) = Σ_j Σ_rows ⟨τ_j, τ_j − Σ_i λ_i τ_i − (Σ_i λ_i) δ⟩²  (the inner product over columns)
   with Adam, each gradient projected out of span(B) from the left: g ← g − B Bᵀ g;
4. the merged task vector Σ_i λ_i (τ_i + δ) ⊙ M_i, with M_i task i's top-k magnitude mask.

The gradient of L is written out by hand (no autograd) and Adam is the textbook update with
PyTorch's defaults (the tests check both against autograd and ``torch.optim.Adam``), so the
functions are deterministic and never touch global state.
Nothing here mutates its inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

BETAS = (0.9, 0.999)
EPS = 1e-8
"""Adam's defaults, as PyTorch (and so the official code) uses them."""


def task_coefficients(task_vectors: Tensor, c: float) -> Tensor:
    """λ_i = c / ‖τ_i‖_F per task, ``[T]``; 0 for an all-zero τ_i, which has nothing to add."""
    norms = task_vectors.flatten(1).norm(dim=1)
    return torch.where(norms > 0, c / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0.0)


def shared_subspace(task_vectors: Tensor, subspace: int) -> Tensor:
    """Orthonormal basis ``[rows, q]`` of the directions the tasks share.

    q = ⌊r/subspace⌋; it is empty (no projection) when a task gets no singular vector
    (r < T) or q = 0. Projectors B Bᵀ built from it do not depend on SVD sign choices.
    """
    tasks, rows, cols = task_vectors.shape
    rank = min(rows, cols)
    per_task, q = rank // tasks, rank // subspace
    if per_task == 0 or q == 0:
        return task_vectors.new_zeros(rows, 0)
    lefts = torch.linalg.svd(task_vectors, full_matrices=False).U[..., :per_task]
    stack = lefts.permute(1, 0, 2).reshape(rows, tasks * per_task)
    return torch.linalg.svd(stack, full_matrices=False).U[:, :q]


def residuals(task_vectors: Tensor, coeffs: Tensor, delta: Tensor) -> Tensor:
    """e_j[row] = ⟨τ_j[row], τ_j[row] − Σ_i λ_i τ_i[row] − (Σ_i λ_i) δ[row]⟩, ``[T, rows]``."""
    merged = torch.einsum("t,tij->ij", coeffs, task_vectors) + coeffs.sum() * delta
    return (task_vectors * (task_vectors - merged)).sum(-1)


def loss(task_vectors: Tensor, coeffs: Tensor, delta: Tensor) -> Tensor:
    """DOGE's objective L(δ) = Σ_j Σ_rows e_j²."""
    return residuals(task_vectors, coeffs, delta).square().sum()


def gradient(task_vectors: Tensor, coeffs: Tensor, delta: Tensor) -> Tensor:
    """∂L/∂δ[row] = −2 (Σ_i λ_i) Σ_j e_j[row] τ_j[row]."""
    e = residuals(task_vectors, coeffs, delta)
    return -2.0 * coeffs.sum() * torch.einsum("tr,trc->rc", e, task_vectors)


def project_out(grad: Tensor, basis: Tensor) -> Tensor:
    """g − B Bᵀ g: keep only the part of each column outside the shared subspace."""
    return grad - basis @ (basis.T @ grad)


def optimise_delta(
    task_vectors: Tensor, coeffs: Tensor, basis: Tensor, steps: int, lr: float
) -> Tensor:
    """δ after ``steps`` projected Adam steps from zero (the paper: 400 steps, lr 1e-4).

    The residuals are affine in δ, e = e(0) − (Σ_i λ_i) ⟨τ_j, δ⟩, so e(0) is computed once
    and each step costs two contractions over the task vectors (same values as
    :func:`gradient`).
    """
    beta1, beta2 = BETAS
    total = coeffs.sum()
    delta = torch.zeros_like(task_vectors[0])
    at_zero = residuals(task_vectors, coeffs, delta)
    first, second = torch.zeros_like(delta), torch.zeros_like(delta)
    for step in range(1, steps + 1):
        e = at_zero - total * torch.einsum("trc,rc->tr", task_vectors, delta)
        grad = project_out(-2.0 * total * torch.einsum("tr,trc->rc", e, task_vectors), basis)
        first = beta1 * first + (1 - beta1) * grad
        second = beta2 * second + (1 - beta2) * grad.square()
        denom = (second / (1 - beta2**step)).sqrt() + EPS
        delta = delta - lr / (1 - beta1**step) * first / denom
    return delta


def topk_masks(task_vectors: Tensor, thresholds: Tensor) -> Tensor:
    """M_i = |τ_i| ≥ threshold_i (thresholds ``[T]``, one per task, global over the model)."""
    return task_vectors.abs() >= thresholds.reshape(-1, *([1] * (task_vectors.dim() - 1)))


def merge_layer(task_vectors: Tensor, coeffs: Tensor, delta: Tensor, masks: Tensor) -> Tensor:
    """Σ_i λ_i (τ_i + δ) ⊙ M_i."""
    return torch.einsum("t,tij->ij", coeffs, (task_vectors + delta) * masks)
