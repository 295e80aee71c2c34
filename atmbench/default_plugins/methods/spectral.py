"""Linear algebra shared by the SVD-based merges (TSV-M, Iso-C, Iso-CTS).

Pure tensor functions on float32 inputs; nothing here mutates its arguments.
"""

from __future__ import annotations

import torch
from torch import Tensor

from atmbench.hparams import HParam


def alpha_scale() -> HParam:
    """α of TSV-M and Iso: θ = θ0 + α Δ. The TSV code sweeps 0.1 … 3.0; so does the Iso grid."""
    return HParam(
        "alpha",
        default=1.0,
        search=tuple(round(0.1 * i, 1) for i in range(1, 31)),
        low=0.0,
        help="scaling coefficient of the merged task vector",
    )


def is_matrix(base: Tensor) -> bool:
    """The official TSV and Iso code treat exactly the tensors with ``dim() == 2`` as matrices.

    Their extra exclusion of ``text_projection`` never applies here: only image encoders
    are merged.
    """
    return base.dim() == 2


def svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD that survives LAPACK's convergence failures.

    The CPU driver (gesdd) can fail on ill-conditioned float32 inputs — seen on Iso-CTS's
    task-specific residuals at ViT-B-32 size — where float64 converges; only such a
    failure pays for the float64 retry.
    """
    try:
        return torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError:
        u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
        return u.to(matrix.dtype), s.to(matrix.dtype), vh.to(matrix.dtype)


def polar(matrix: Tensor) -> Tensor:
    """The orthogonal polar factor P Qᵀ of ``matrix`` = P Σ Qᵀ (the Procrustes solution).

    It is the matrix with orthonormal columns (or rows, when wide) nearest to ``matrix``:
    how TSV-M and Iso-CTS decorrelate concatenated singular vectors.
    """
    p, _, qh = svd(matrix)
    return p @ qh


def top_triplets(task_vectors: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each task's top-``k`` singular triplets, concatenated task by task.

    ``task_vectors`` is [T, m, n]; returns U [m, T·k], S [T·k] and Vᵀ [T·k, n], the
    layout of ``sum_u``/``sum_s``/``sum_v`` in the official TSV and Iso-CTS code.
    """
    t, m, n = task_vectors.shape
    u, s, vh = svd(task_vectors)
    return (
        u[:, :, :k].permute(1, 0, 2).reshape(m, t * k),
        s[:, :k].reshape(t * k),
        vh[:, :k, :].reshape(t * k, n),
    )
