"""Linear algebra shared by the SVD-based merges (TSV-M, Iso-C, Iso-CTS).

Pure tensor functions on float32 inputs; nothing here mutates its arguments.

Speed: the merges need only part of each SVD (TSV-M keeps ⌊r/T⌋ triplets per task) or
only the polar factor and the singular values, and these follow from the eigendecomposition
of the smaller Gram matrix (AᵀA or AAᵀ). In float64 that costs roughly half a float32 CPU
SVD of a 3072×768 matrix and a third of a 768×3072 one (square matrices gain nothing, but
lose nothing either). Squaring a matrix squares its condition number, so the Gram path is taken
only where the eigenvalues it divides by are at least √ε₆₄ ≈ 1.5e-8 of the largest: the
relative error this adds, about ε₆₄ λ_max/λ, stays below float32 rounding, and the results
match float64 SVDs more closely than float32 SVDs do. Otherwise (zero or rank-deficient
tasks, where the triplets or the polar factor are not unique) the SVD path runs, as the
official code does. Outputs keep the input dtype.
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


# Smallest Gram eigenvalue, relative to the largest, that the Gram path divides by.
GRAM_RTOL = torch.finfo(torch.float64).eps ** 0.5


def singular_values_and_polar(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Descending singular values σ and orthogonal polar factor P Qᵀ of ``matrix`` = P Σ Qᵀ.

    P Qᵀ (the Procrustes solution) is the matrix with orthonormal columns (or rows, when
    wide) nearest to ``matrix``. For a tall full-rank X it is X (XᵀX)^(-1/2), computed from
    the float64 eigendecomposition XᵀX = W Λ Wᵀ with σ = √Λ; when X is (nearly)
    rank-deficient the factor is not unique and the SVD's is returned.
    """
    wide = matrix.shape[-2] < matrix.shape[-1]
    x = (matrix.mT if wide else matrix).double()
    lam, w = torch.linalg.eigh(x.mT @ x)
    if not lam[0] > GRAM_RTOL * lam[-1]:
        p, s, qh = svd(matrix)
        return s, p @ qh
    p = x @ ((w * lam.rsqrt()) @ w.mT)
    return lam.flip(0).sqrt().to(matrix.dtype), (p.mT if wide else p).to(matrix.dtype)


def polar(matrix: Tensor) -> Tensor:
    """The orthogonal polar factor of ``matrix`` (see ``singular_values_and_polar``).

    How TSV-M and Iso-CTS decorrelate concatenated singular vectors.
    """
    return singular_values_and_polar(matrix)[1]


def top_triplets(task_vectors: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each task's top-``k`` singular triplets, concatenated task by task.

    ``task_vectors`` is [T, m, n]; returns U [m, T·k], S [T·k] and Vᵀ [T·k, n], the
    layout of ``sum_u``/``sum_s``/``sum_v`` in the official TSV and Iso-CTS code, in
    descending order within each task. They come from the float64 Gram eigendecomposition
    (V from AᵀA, then U = A V / σ; U from AAᵀ when wide) unless some task's k-th
    eigenvalue is too small to divide by, e.g. that of a zero task vector.
    """
    t, m, n = task_vectors.shape
    tall = m >= n
    x = task_vectors.double()
    x = x if tall else x.mT
    lam, w = torch.linalg.eigh(x.mT @ x)
    top = slice(lam.shape[-1] - k, None)  # eigh sorts ascending; k = 0 keeps nothing
    lam, w = lam[:, top].flip(-1), w[:, :, top].flip(-1)
    # [:, -1:] and [:, :1] rather than [:, -1] and [:, 0], which k = 0 has not.
    if bool((lam[:, -1:] > GRAM_RTOL * lam[:, :1]).all()):
        s = lam.sqrt()
        other = (x @ w) / s[:, None, :]
        u, vh = (other, w.mT) if tall else (w, other.mT)
    else:
        u, s, vh = svd(task_vectors)
        u, s, vh = u[:, :, :k], s[:, :k], vh[:, :k, :]
    dtype = task_vectors.dtype
    return (
        u.permute(1, 0, 2).reshape(m, t * k).to(dtype),
        s.reshape(t * k).to(dtype),
        vh.reshape(t * k, n).to(dtype),
    )
