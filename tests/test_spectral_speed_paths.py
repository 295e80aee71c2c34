"""The Gram-eigendecomposition fast paths of ``spectral`` against float64 SVDs; their fallback."""

from __future__ import annotations

import pytest
import torch

from atmbench.default_plugins.methods import spectral


def _random(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _low_rank(tasks: int, m: int, n: int, rank: int, seed: int = 0) -> torch.Tensor:
    return _random(tasks, m, rank, seed=seed) @ _random(tasks, rank, n, seed=seed + 1)


@pytest.fixture
def svd_calls(monkeypatch) -> list[tuple[int, ...]]:
    """Shapes passed to ``spectral.svd``: empty when only the fast path ran."""
    calls, real = [], spectral.svd

    def recording(matrix):
        calls.append(tuple(matrix.shape))
        return real(matrix)

    monkeypatch.setattr(spectral, "svd", recording)
    return calls


def _check_triplets(vectors: torch.Tensor, k: int, u, s, vh, atol: float = 1e-5) -> None:
    """Per task: σ as float64's, descending; orthonormal U and V; U diag(σ) Vᵀ the rank-k SVD."""
    ref_u, ref_s, ref_vh = torch.linalg.svd(vectors.double(), full_matrices=False)
    for t, task in enumerate(ref_s):
        cols = slice(t * k, (t + 1) * k)
        tu, ts, tvh = u[:, cols].double(), s[cols].double(), vh[cols].double()
        assert torch.allclose(ts, task[:k], rtol=1e-5, atol=0)
        assert torch.all(ts[:-1] >= ts[1:])
        assert torch.allclose(tu.T @ tu, torch.eye(k, dtype=torch.float64), atol=atol)
        assert torch.allclose(tvh @ tvh.T, torch.eye(k, dtype=torch.float64), atol=atol)
        truncated = (ref_u[t, :, :k] * task[:k]) @ ref_vh[t, :k]
        assert torch.allclose((tu * ts) @ tvh, truncated, atol=atol * task[0])


@pytest.mark.parametrize("shape", [(3, 40, 12), (3, 12, 40), (2, 16, 16)])
def test_top_triplets_fast_path_matches_the_float64_svd(shape, svd_calls):
    vectors, k = _random(*shape), min(shape[1:]) // shape[0]
    u, s, vh = spectral.top_triplets(vectors, k)
    assert u.shape == (shape[1], shape[0] * k) and vh.shape == (shape[0] * k, shape[2])
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    _check_triplets(vectors, k, u, s, vh)
    assert svd_calls == []


def test_top_triplets_stay_fast_when_a_task_lacks_rank_only_beyond_k(svd_calls):
    vectors = _low_rank(3, 30, 20, rank=4)
    u, s, vh = spectral.top_triplets(vectors, 3)
    _check_triplets(vectors, 3, u, s, vh)
    assert svd_calls == []


@pytest.mark.parametrize("shape", [(3, 30, 20), (3, 20, 30)])
def test_top_triplets_fall_back_to_the_svd_when_a_task_lacks_rank_within_k(shape, svd_calls):
    vectors = _random(*shape)
    vectors[1] = _low_rank(1, *shape[1:], rank=2, seed=5)[0]  # rank 2 < k = 6
    vectors[2] = 0.0
    u, s, vh = spectral.top_triplets(vectors, 6)
    assert svd_calls == [shape]
    assert torch.isfinite(u).all() and torch.isfinite(vh).all()
    ref_u, ref_s, ref_vh = torch.linalg.svd(vectors, full_matrices=False)
    assert torch.equal(s, ref_s[:, :6].reshape(-1))
    assert torch.equal(u, ref_u[:, :, :6].permute(1, 0, 2).reshape(shape[1], 18))
    assert torch.equal(vh, ref_vh[:, :6].reshape(18, shape[2]))


def test_top_triplets_with_k_zero_keep_nothing():
    u, s, vh = spectral.top_triplets(_random(3, 7, 5), 0)
    assert (u.shape, s.shape, vh.shape) == ((7, 0), (0,), (0, 5))


@pytest.mark.parametrize("shape", [(40, 12), (12, 40), (16, 16)])
def test_polar_fast_path_matches_the_float64_svd(shape, svd_calls):
    matrix = _random(*shape)
    s, p = spectral.singular_values_and_polar(matrix)
    ref_p, ref_s, ref_qh = torch.linalg.svd(matrix.double(), full_matrices=False)
    assert svd_calls == []
    assert p.dtype == s.dtype == torch.float32 and p.shape == shape
    assert torch.allclose(s.double(), ref_s, rtol=1e-5, atol=0)
    assert torch.allclose(p.double(), ref_p @ ref_qh, atol=1e-5)
    assert torch.equal(spectral.polar(matrix), p)


@pytest.mark.parametrize("transpose", [False, True])
def test_polar_falls_back_to_the_svd_on_a_rank_deficient_matrix(transpose, svd_calls):
    matrix = _low_rank(1, 20, 8, rank=5)[0]
    matrix = matrix.T if transpose else matrix
    s, p = spectral.singular_values_and_polar(matrix)
    assert svd_calls == [tuple(matrix.shape)]
    ref_p, ref_s, ref_qh = torch.linalg.svd(matrix, full_matrices=False)
    assert torch.equal(s, ref_s) and torch.equal(p, ref_p @ ref_qh)
