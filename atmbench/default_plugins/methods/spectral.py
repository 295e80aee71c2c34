"""Linear algebra shared by the SVD-based merges (TSV-M, Iso-C, Iso-CTS).

Pure tensor functions on float32 inputs; nothing here mutates its arguments; outputs keep
the input dtype.

Which decomposition, and why. The merges need only part of each SVD (TSV-M keeps ⌊r/T⌋
triplets per task, Iso-CTS a few per task) or only the polar factor and the singular values,
and these follow from the eigendecomposition of the smaller Gram matrix (AᵀA or AAᵀ):

- **Per-task top-k triplets** (``top_triplets``): the float32 Gram (BLAS ``syrk``, half a
  matrix product) and its top k eigenpairs (LAPACK's subset solver ``syevr`` when k ≤ n/6),
  then U = A V / σ. The result is accepted only when an a-posteriori check passes: the
  residual R = AᵀU − V diag(σ), computed against the task matrix A itself (not its Gram),
  must satisfy ‖R‖_F ≤ ``RESIDUAL_TOL``·σ_k = 3e-5·σ_k. Then (with V orthonormal to working
  precision) the triplets are exact singular triplets of A + E with E = −U Rᵀ, ‖E‖₂ ≤
  ‖R‖_F ≤ 3e-5·σ_k ≤ 3e-5·‖A‖₂ (a backward error of the order of LAPACK's float32 SVD,
  which is what the official code runs), and ‖UᵀU − I‖₂ ≤ ‖R‖/σ_k ≤ 3e-5. Measured on
  tasks of 1536×384 with σ_i ∝ i^-β: the check passes up to β ≈ 0.5 (TSV-M output within
  4e-6 of float64 SVDs', FusionBench's float32 SVDs 7e-6) and sends β = 1 (where float32
  would be off by 1e-4) to float64; random ViT-B-32-sized tasks pass at 5e-6. A task
  whose check fails (a spectrum too steep for float32's 7 digits: σ_k far below σ_1) is
  recomputed in float64 (same route: its error is about ε₆₄ λ₁/λ_k, accepted while
  λ_k ≥ √ε₆₄ λ₁), and a task lacking rank within k (zero or rank-deficient: the triplets
  are not unique) takes LAPACK's SVD, as the official code does (``svd``).
- **Polar factors and singular values** (``singular_values_and_polar``): always float64
  (decorrelating concatenated singular vectors can leave U with a condition number in the
  thousands, which float32 Grams cannot resolve): P = X (XᵀX)^(-1/2) with the float64
  eigendecomposition of the Gram; accepted while λ_min ≥ √ε₆₄ λ_max (error about
  ε₆₄ κ², below float32 rounding), otherwise the SVD's. The final product X·(XᵀX)^(-1/2)
  runs in float32 when κ(X) ≤ ``FLOAT32_PRODUCT_COND`` (its rounding error, about
  ε₃₂ κ √n relative, stays below 1e-5), in float64 otherwise.
- Empty matrices have no spectrum: their polar factor is empty.

A randomized range finder was considered and not used (by operation count, not measured):
at k = n/8 (TSV-M with 8 tasks) a range finder with one power iteration makes four passes
of 2·m·n·(k + p) flops, more than the Gram's m·n², and on spectra without a gap at k (the
random benchmark tower: σ_k/σ_(k+1) ≈ 1.001) its a-posteriori check would fail and pay
for both routes.

Speed on a CPU: a tensor's T per-task decompositions run on ``torch.get_num_threads()``
worker threads, each calling single-threaded BLAS/LAPACK (SciPy): the tridiagonal
reduction inside ``syevr`` barely gains from a second thread, two matrices at once do.
The polar factors (one matrix at a time) run on ``torch.linalg`` with all of torch's
threads. On a GPU (tensors on CUDA) the per-task route runs batched over tasks.

How far this is from FusionBench's float32 SVDs, and why not further (measured on an idle
2-core CPU, 768×768 and 3072×768 float32/float64, two threads): a thin ``gesdd`` of
3072×768 takes 0.17 s; the least the Gram route can spend on one task's top 96 triplets is
its ``syrk`` (0.018 s) plus the subset ``syevr`` (0.023 s), 0.24x of that SVD, and on a
polar factor the float64 Gram, ``syevd`` and product (0.04 + 0.06 + 0.02 s), 0.7x. Exact
decompositions do not reach a tenth of FusionBench's time on this CPU; a GPU does the same
work batched.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import scipy.linalg
import torch
from scipy.linalg import blas
from threadpoolctl import threadpool_limits
from torch import Tensor

from atmbench.hparams import HParam

T = TypeVar("T")
R = TypeVar("R")


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


# Smallest Gram eigenvalue, relative to the largest, that the float64 Gram path divides by.
GRAM_RTOL = torch.finfo(torch.float64).eps ** 0.5
# Largest ‖AᵀU − VΣ‖_F / σ_k accepted from the float32 route (see the module docstring).
RESIDUAL_TOL = 3e-5
# Largest condition number of X for which X·(XᵀX)^(-1/2) is multiplied out in float32.
FLOAT32_PRODUCT_COND = 10.0
# Largest share k/n of eigenpairs for which the subset solver beats a full eigh.
SUBSET_SHARE = 1 / 6


_WORKER = threading.local()
_POOLS: dict[int, ThreadPoolExecutor] = {}  # by size: one for the process, in practice


def _pool(workers: int) -> ThreadPoolExecutor:
    """Worker threads kept for the process rather than started per call: every new thread
    may get its own malloc arena, which keeps the memory it freed (with a pool started per
    call, Iso-C's peak anonymous memory on the ViT-B-32 tower reached 4.97 models)."""
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="atmbench-spectral")
    return _POOLS[workers]


def parallel_map(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``fn`` over independent ``items`` on ``torch.get_num_threads()`` threads.

    Each worker's BLAS/LAPACK calls are single-threaded (SciPy's and NumPy's OpenBLAS
    release the GIL), so two matrices are factorized at once instead of one on two
    threads; on a loaded machine this also avoids multithreaded LAPACK's spinning
    barriers (one float64 ``syevd`` of 768×768 on a machine with load average ~20 took
    1.0 – 1.2 s on one thread, 13 – 19 s on two). A single item also runs single-threaded;
    calls from inside a worker run in turn.
    """
    workers = min(len(items), torch.get_num_threads())
    if getattr(_WORKER, "active", False):
        return [fn(item) for item in items]
    if workers <= 1:
        with threadpool_limits(1, user_api="blas"):
            return [fn(item) for item in items]

    def run(item: T) -> R:
        _WORKER.active = True
        return fn(item)

    with threadpool_limits(1, user_api="blas"):
        return list(_pool(torch.get_num_threads()).map(run, items))


def _gram(b: np.ndarray) -> np.ndarray:
    """bᵀb with BLAS ``syrk`` (upper triangle filled), without copying ``b``."""
    syrk = blas.dsyrk if b.dtype == np.float64 else blas.ssyrk
    if b.flags.f_contiguous:
        return syrk(1.0, b, trans=1, lower=0)
    return syrk(1.0, np.ascontiguousarray(b).T, trans=0, lower=0)


def _top_eigh(gram: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` eigenpairs (descending) of a symmetric matrix given by its upper triangle."""
    n = gram.shape[0]
    if 0 < k <= SUBSET_SHARE * n:
        lam, w = scipy.linalg.eigh(
            gram,
            lower=False,
            subset_by_index=[n - k, n - 1],
            driver="evr",
            check_finite=False,
            overwrite_a=True,
        )
    else:
        lam, w = scipy.linalg.eigh(
            gram, lower=False, driver="evd", check_finite=False, overwrite_a=True
        )
        lam, w = lam[n - k :], w[:, n - k :]  # k = 0 keeps nothing
    return lam[::-1], w[:, ::-1]


def _triplets_from_gram(b: np.ndarray, k: int) -> tuple[np.ndarray, ...] | None:
    """Top-k (U, σ, V) of tall ``b`` [p, q] from its Gram in ``b``'s dtype, or ``None``.

    ``None`` when the check of the module docstring fails: float32 by the residual against
    ``b``, float64 by the size of λ_k.
    """
    lam, w = _top_eigh(_gram(b), k)
    if b.dtype == np.float64:
        if not lam[-1] > GRAM_RTOL * lam[0]:
            return None
        s = np.sqrt(lam)
        return (b @ w) / s, s, w
    if not lam[-1] > 0:
        return None
    s = np.sqrt(lam)
    u = (b @ w) / s
    residual = b.T @ u
    residual -= w * s
    if not np.linalg.norm(residual) <= RESIDUAL_TOL * s[-1]:
        return None
    return u, s, w


def _task_triplets(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k (U [m, k], σ [k], Vᵀ [k, n]) of one float32 matrix, by the first route that passes."""
    tall = x.shape[0] >= x.shape[1]
    b = x if tall else x.T
    found = _triplets_from_gram(b, k) or _triplets_from_gram(b.astype(np.float64), k)
    if found is None:
        u, s, vh = svd(torch.from_numpy(x))
        return u[:, :k].numpy(), s[:k].numpy(), vh[:k].numpy()
    other, s, w = found
    u, v = (other, w) if tall else (w, other)
    return u.astype(x.dtype), s.astype(x.dtype), v.T.astype(x.dtype)


def _top_triplets_batched(x: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """``_task_triplets`` for [T, m, n] on a GPU: batched float32 Grams and eigh; a task that
    fails the check is redone by ``_task_triplets`` on the CPU."""
    tall = x.shape[1] >= x.shape[2]
    b = x if tall else x.mT
    lam, w = torch.linalg.eigh(b.mT @ b)
    lam, w = lam[:, -k:].flip(-1), w[:, :, -k:].flip(-1)
    s = lam.clamp_min(0).sqrt()
    other = (b @ w) / s[:, None, :]
    residual = torch.linalg.matrix_norm(b.mT @ other - w * s[:, None, :])
    ok = (lam[:, -1] > 0) & (residual <= RESIDUAL_TOL * s[:, -1])
    u, vh = (other, w.mT) if tall else (w, other.mT)
    for t in torch.nonzero(~ok).flatten().tolist():
        found = _task_triplets(x[t].cpu().numpy(), k)
        u[t], s[t], vh[t] = (torch.from_numpy(a).to(x.device) for a in found)
    return u, s, vh


def top_triplets(
    task_vectors: Tensor, k: int, project_out: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Each task's top-``k`` singular triplets, concatenated task by task.

    ``task_vectors`` is [T, m, n]; returns U [m, T·k], S [T·k] and Vᵀ [T·k, n], the
    layout of ``sum_u``/``sum_s``/``sum_vh`` in the official TSV and Iso-CTS code, in
    descending order within each task. With ``project_out`` = Q [m, c] (orthonormal
    columns) they are the triplets of (I − Q Qᵀ) τ_t instead, each task projected by its
    own worker (Iso-CTS's task-specific residuals). Route and error bound: see the module
    docstring.
    """
    t, m, n = task_vectors.shape
    x = task_vectors.float()
    if project_out is not None:
        q = project_out.float()
        if x.is_cuda or k == 0:
            x = x - q @ (q.mT @ x)
    if k == 0:
        u, s, vh = x.new_zeros(t, m, 0), x.new_zeros(t, 0), x.new_zeros(t, 0, n)
    elif x.is_cuda:
        u, s, vh = _top_triplets_batched(x, k)
    else:
        q_np = None if project_out is None else q.numpy()

        def one(task: Tensor) -> tuple[np.ndarray, ...]:
            a = task.numpy()
            if q_np is not None:
                a = a - q_np @ (q_np.T @ a)
            return _task_triplets(a, k)

        found = parallel_map(one, list(x))
        u, s, vh = (torch.from_numpy(np.stack(parts)) for parts in zip(*found, strict=True))
    dtype = task_vectors.dtype
    return (
        u.permute(1, 0, 2).reshape(m, t * k).to(dtype),
        s.reshape(t * k).to(dtype),
        vh.reshape(t * k, n).to(dtype),
    )


def gram_eigh(x: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors of the float64 Gram xᵀx of [m, n] ``x``.

    ``torch.linalg`` on torch's threads, CPU or GPU alike: on an idle 2-core CPU a
    two-thread ``syevd`` of 768×768 takes 0.061 s against 0.083 s on one thread (and
    SciPy's ``syrk`` and row-block workers measured slower than torch's product here).
    """
    x64 = x.double()
    return torch.linalg.eigh(x64.mT @ x64)


def singular_values_and_polar(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Descending singular values σ and orthogonal polar factor P Qᵀ of ``matrix`` = P Σ Qᵀ.

    P Qᵀ (the Procrustes solution) is the matrix with orthonormal columns (or rows, when
    wide) nearest to ``matrix``. For a tall full-rank X it is X (XᵀX)^(-1/2), computed from
    the float64 eigendecomposition XᵀX = W Λ Wᵀ with σ = √Λ; when X is (nearly)
    rank-deficient the factor is not unique and the SVD's is returned.
    """
    if matrix.shape[-2] == 0 or matrix.shape[-1] == 0:
        return matrix.new_zeros(0), torch.zeros_like(matrix)
    wide = matrix.shape[-2] < matrix.shape[-1]
    x = matrix.mT if wide else matrix
    x64 = x.double()
    lam, w = gram_eigh(x64)
    if not lam[0] > GRAM_RTOL * lam[-1]:
        p, s, qh = svd(matrix)
        return s, p @ qh
    inverse_sqrt = (w * lam.rsqrt()) @ w.mT
    if lam[-1] <= FLOAT32_PRODUCT_COND**2 * lam[0]:
        x64, inverse_sqrt = x.float(), inverse_sqrt.float()
    p = x64 @ inverse_sqrt
    return lam.flip(0).sqrt().to(matrix.dtype), (p.mT if wide else p).to(matrix.dtype)


def polar(matrix: Tensor) -> Tensor:
    """The orthogonal polar factor of ``matrix`` (see ``singular_values_and_polar``).

    How TSV-M and Iso-CTS decorrelate concatenated singular vectors.
    """
    return singular_values_and_polar(matrix)[1]
