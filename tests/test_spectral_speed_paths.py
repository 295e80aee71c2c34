"""The fast routes of ``spectral`` against float64 SVDs; their fallbacks (float64, then the SVD)."""

from __future__ import annotations

import threading

import numpy as np
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
    assert svd_calls == [shape[1:], shape[1:]]  # tasks 1 and 2 only
    assert torch.isfinite(u).all() and torch.isfinite(vh).all()
    ref_u, ref_s, ref_vh = torch.linalg.svd(vectors, full_matrices=False)
    for t in (1, 2):  # exactly the SVD's triplets
        cols = slice(6 * t, 6 * t + 6)
        assert torch.equal(s[cols], ref_s[t, :6])
        assert torch.equal(u[:, cols], ref_u[t, :, :6])
        assert torch.equal(vh[cols], ref_vh[t, :6])
    _check_triplets(vectors[:1], 6, u[:, :6], s[:6], vh[:6])


def _with_spectrum(m: int, n: int, sigma: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """An m×n float32 matrix with singular values ``sigma`` and random singular vectors."""
    q_u, _ = torch.linalg.qr(_random(m, n, seed=seed).double())
    q_v, _ = torch.linalg.qr(_random(n, n, seed=seed + 1).double())
    return ((q_u * sigma.double()) @ q_v.T).float()


@pytest.fixture
def routes(monkeypatch) -> list[str]:
    """The dtype of each Gram route tried and whether it was accepted, in call order."""
    calls, real = [], spectral._triplets_from_gram

    def recording(b, k):
        found = real(b, k)
        calls.append(f"{b.dtype}:{'ok' if found is not None else 'rejected'}")
        return found

    monkeypatch.setattr(spectral, "_triplets_from_gram", recording)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # in call order
    return calls


def test_top_triplets_take_float32_on_a_gentle_spectrum(routes):
    # σ_i = i^-0.3: σ_1/σ_k = 2.8 at k = 32 of 128; float32's residual is far inside the bound.
    sigma = torch.arange(1, 129, dtype=torch.float64) ** -0.3
    vectors = torch.stack([_with_spectrum(256, 128, sigma, seed=s) for s in (0, 2)])
    u, s, vh = spectral.top_triplets(vectors, 32)
    assert routes == ["float32:ok", "float32:ok"]
    _check_triplets(vectors, 32, u, s, vh, atol=2e-5)


@pytest.mark.parametrize("wide", [False, True])
def test_top_triplets_fall_back_to_float64_on_a_spectrum_float32_cannot_resolve(routes, wide):
    # σ_i = 10^(-i/8): σ_k/σ_1 = 2e-4 at k = 32, so λ_k/λ_1 = 4e-8 is below float32's
    # resolution of the Gram: the residual check rejects float32, float64 passes, and the
    # triplets match the float64 SVD to float32 rounding.
    sigma = 10.0 ** (-torch.arange(128, dtype=torch.float64) / 8)
    task = _with_spectrum(256, 128, sigma)
    vectors = (task.T if wide else task)[None]
    u, s, vh = spectral.top_triplets(vectors, 32)
    assert routes == ["float32:rejected", "float64:ok"]
    ref_u, ref_s, ref_vh = torch.linalg.svd(vectors[0].double(), full_matrices=False)
    assert torch.allclose(s.double(), ref_s[:32], rtol=1e-5, atol=0)
    # each triplet's rank-one term, u_i σ_i v_iᵀ (sign-free), to float32 rounding of σ_1
    for i in (0, 15, 31):
        ours = torch.outer(u[:, i].double() * s[i], vh[i].double())
        exact = torch.outer(ref_u[:, i] * ref_s[i], ref_vh[i])
        assert torch.allclose(ours, exact, atol=1e-6 * ref_s[0]), i


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


@pytest.mark.parametrize("k", [2, 20])  # k ≤ n/6 = 12: LAPACK's subset solver; more: syevd
def test_top_eigh_matches_the_full_eigendecomposition(k):
    x = _random(80, 72).double()
    gram = x.T @ x
    upper = torch.triu(gram).numpy()  # only the upper triangle is read
    lam, w = (torch.from_numpy(a.copy()) for a in spectral._top_eigh(upper, k))
    ref_lam, ref_w = torch.linalg.eigh(gram)
    assert lam.shape == (k,) and w.shape == (72, k) and lam.dtype == torch.float64
    assert torch.allclose(lam, ref_lam[-k:].flip(-1), rtol=1e-12, atol=0)
    # Eigenvectors up to sign: |wᵀ w_ref| is the identity.
    overlap = (w.T @ ref_w[:, -k:].flip(-1)).abs()
    assert torch.allclose(overlap, torch.eye(k, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("layout", ["C", "F"])
def test_gram_reads_either_memory_layout(layout):
    x = _random(40, 12).numpy()
    x = x if layout == "C" else np.asfortranarray(x)
    gram = torch.from_numpy(spectral._gram(x))
    expected = torch.from_numpy(x.T @ x)
    assert torch.allclose(torch.triu(gram), torch.triu(expected), rtol=1e-6, atol=1e-5)


def test_parallel_map_keeps_order_runs_blas_single_threaded_and_does_not_nest(monkeypatch):
    from threadpoolctl import threadpool_info

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    seen = []

    def job(i):
        seen.append({lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"})
        inner = spectral.parallel_map(lambda j: (j, threading.get_ident()), [0, 1])
        return i, len({ident for _, ident in inner})

    assert spectral.parallel_map(job, [0, 1, 2, 3]) == [(0, 1), (1, 1), (2, 1), (3, 1)]
    assert all(threads == {1} for threads in seen)


def test_projected_triplets_are_those_of_the_projected_tasks():
    vectors = _random(3, 30, 20)
    q, _ = torch.linalg.qr(_random(30, 5, seed=3))
    u, s, vh = spectral.top_triplets(vectors, 4, project_out=q)
    projected = vectors - q @ (q.T @ vectors)
    _check_triplets(projected, 4, u, s, vh)
    assert torch.allclose(q.T @ u, torch.zeros(5, 12), atol=1e-5)


def test_batched_route_for_gpus_matches_the_cpu_route_and_falls_back_per_task():
    vectors = _random(3, 40, 24)
    vectors[1] = _low_rank(1, 40, 24, rank=2, seed=5)[0]  # fails the check: SVD for task 1
    u, s, vh = spectral._top_triplets_batched(vectors, 4)
    ref_u, ref_s, ref_vh = spectral.top_triplets(vectors, 4)
    got = (u.permute(1, 0, 2).reshape(40, 12), s.reshape(12), vh.reshape(12, 24))
    assert torch.allclose(got[1], ref_s, rtol=1e-5)
    for a, b in ((got[0], ref_u), (got[2], ref_vh)):  # up to each vector's sign
        dims = (0,) if a.shape[0] == 40 else (1,)
        assert torch.allclose(torch.abs(a).sum(dims), torch.abs(b).sum(dims), rtol=1e-4)
    _check_triplets(
        vectors[[0, 2]],
        4,
        got[0][:, [*range(4), *range(8, 12)]],
        got[1][[*range(4), *range(8, 12)]],
        got[2][[*range(4), *range(8, 12)]],
    )


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


@pytest.mark.parametrize("cond", [3.0, 1e3])  # float32 product (κ ≤ 10), float64 product
def test_polar_of_a_conditioned_matrix_matches_the_float64_svd(cond, svd_calls):
    sigma = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), 48, dtype=torch.float64)
    matrix = _with_spectrum(96, 48, sigma)
    s, p = spectral.singular_values_and_polar(matrix)
    ref_p, ref_s, ref_qh = torch.linalg.svd(matrix.double(), full_matrices=False)
    assert svd_calls == []
    assert torch.allclose(s.double(), ref_s, rtol=1e-5, atol=0)
    assert torch.allclose(p.double(), ref_p @ ref_qh, atol=2e-6)
