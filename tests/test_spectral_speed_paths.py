"""The Gram-eigendecomposition fast paths of ``spectral`` against float64 SVDs; their fallback."""

from __future__ import annotations

import pytest
import torch

from atmbench.default_plugins.methods import iso, spectral


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


@pytest.mark.parametrize("k", [2, 20])  # k ≤ n/6 = 12: SciPy's subset solver; more: torch
def test_top_eigh_matches_the_full_eigendecomposition(k):
    x = _random(3, 80, 72).double()
    gram = x.mT @ x
    lam, w = spectral.top_eigh(gram, k)
    ref_lam, ref_w = torch.linalg.eigh(gram)
    assert lam.shape == (3, k) and w.shape == (3, 72, k) and lam.dtype == torch.float64
    assert torch.allclose(lam, ref_lam[:, -k:].flip(-1), rtol=1e-12, atol=0)
    # Eigenvectors up to sign: |wᵀ w_ref| is the identity.
    overlap = (w.mT @ ref_w[:, :, -k:].flip(-1)).abs()
    assert torch.allclose(overlap, torch.eye(k, dtype=torch.float64).expand(3, k, k), atol=1e-10)


def _iso_cts_reference(vectors: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """Iso-CTS as the official code computes it, with float64 SVDs throughout."""
    vectors = vectors.double()
    m, cols = vectors.shape[1:]

    def polar(a):
        p, _, qh = torch.linalg.svd(a, full_matrices=False)
        return p @ qh

    u, s, vh = torch.linalg.svd(vectors.sum(0), full_matrices=False)
    u, s, vh = u[:, :k], s[:k], vh[:k]
    u_t, s_t, vh_t = torch.linalg.svd(vectors - u @ (u.T @ vectors), full_matrices=False)
    u = torch.cat([u_t[:, :, :n].permute(1, 0, 2).reshape(m, -1), u], 1)
    s = torch.cat([s_t[:, :n].reshape(-1), s])
    vh = torch.cat([vh_t[:, :n].reshape(-1, cols), vh])
    return s.mean() * (polar(u) @ polar(vh))


@pytest.mark.parametrize("shape", [(3, 20, 40), (3, 30, 30), (4, 40, 20)])
@pytest.mark.parametrize("common_fraction", [0.0, 0.5, 0.8])
def test_iso_cts_matches_the_float64_svd_reference(shape, common_fraction, monkeypatch):
    """The m ≤ n complement path (and the projecting path for m > n) against float64 SVDs."""
    calls, real = [], iso.iso_cts_in_complement

    def recording(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(iso, "iso_cts_in_complement", recording)
    vectors = _random(*shape)
    k, n = iso.split_rank(min(shape[1:]), shape[0], common_fraction)
    delta = iso.iso_cts(torch.zeros(shape[1:]), vectors, None, common_fraction)
    assert delta.dtype == torch.float32
    assert calls == ([shape] if n and shape[1] <= shape[2] else [])
    ref = _iso_cts_reference(vectors, k, n)
    assert torch.allclose(delta.double(), ref, atol=1e-5 * ref.abs().max())


def test_iso_cts_in_complement_declines_a_sum_lacking_rank_within_k():
    vectors = _low_rank(3, 20, 40, rank=2)  # the sum has rank ≤ 6 < k = 17
    assert iso.split_rank(20, 3, 0.8) == (17, 1)
    assert iso.iso_cts_in_complement(vectors, 17, 1) is None
    delta = iso.iso_cts(torch.zeros(20, 40), vectors, None, 0.8)
    assert torch.isfinite(delta).all()
