"""Linear algebra shared by the SVD-based merges (TSV-M, Iso-C, Iso-CTS).

Pure tensor functions on float32 inputs; nothing here mutates its arguments.

Speed: the merges need only part of each SVD (TSV-M keeps ⌊r/T⌋ triplets per task) or
only the polar factor and the singular values, and these follow from the eigendecomposition
of the smaller Gram matrix (AᵀA or AAᵀ). In float64 that costs roughly half a float32 CPU
SVD of a 3072×768 matrix and a third of a 768×3072 one (square matrices gain nothing, but
lose nothing either). Where only a few eigenpairs are wanted (k ≤ n/6) they come from
LAPACK's subset solver (syevr via SciPy), which skips the eigenvectors not asked for: at
ViT-B-32 size the top 96 of 768 cost about 75 % of a full eigh and the top 19 about 40 %.
Squaring a matrix squares its condition number, so the Gram path is taken
only where the eigenvalues it divides by are at least √ε₆₄ ≈ 1.5e-8 of the largest: the
relative error this adds, about ε₆₄ λ_max/λ, stays below float32 rounding, and the results
match float64 SVDs more closely than float32 SVDs do. Otherwise (zero or rank-deficient
tasks, where the triplets or the polar factor are not unique) the SVD path runs, as the
official code does. Outputs keep the input dtype.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
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


# Largest share k/n of eigenpairs for which the subset solver beats torch's full eigh.
SUBSET_SHARE = 1 / 6


def top_eigh(gram: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-``k`` eigenpairs of each symmetric float64 matrix in ``gram`` [T, n, n], descending.

    Returns λ [T, k] and W [T, n, k]. Few pairs (k ≤ n/6) come from SciPy's syevr with an
    index subset, one matrix at a time (it is not batched); more from ``torch.linalg.eigh``,
    which computes all n. Both read the lower triangle only.
    """
    n = gram.shape[-1]
    if 0 < k <= SUBSET_SHARE * n:
        pairs = [
            scipy.linalg.eigh(
                g.numpy(), subset_by_index=[n - k, n - 1], driver="evr", check_finite=False
            )
            for g in gram
        ]
        lam = torch.from_numpy(np.stack([p[0] for p in pairs]))
        w = torch.from_numpy(np.stack([p[1] for p in pairs]))
    else:
        lam, w = torch.linalg.eigh(gram)
        lam, w = lam[:, n - k :], w[:, :, n - k :]  # k = 0 keeps nothing
    return lam.flip(-1), w.flip(-1)


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
    lam, w = top_eigh(x.mT @ x, k)
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
