"""TSV-M, Iso-C and Iso-CTS: hand-worked spectra, the official golden outputs, invariants."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import atmbench
from atmbench import registry
from atmbench.default_plugins.methods.iso import split_rank
from atmbench.default_plugins.methods.spectral import polar
from atmbench.method import InMemoryTaskVectors
from atmbench.spec import SpecError, parse_spec
from atmbench.streaming import merged_task_vector

GOLDEN = "tests/data/golden"
METHODS = ("tsv", "iso_c", "iso_cts")


def _delta(name: str, vectors: dict, base: dict | None = None, **hparams) -> dict:
    """The unscaled merged task vector of registered method ``name`` (defaults filled in)."""
    method = registry.methods()[name]
    values = {h.name: hparams.get(h.name, h.default) for h in method.hparams}
    base = base or {k: torch.zeros_like(v) for k, v in next(iter(vectors.values())).items()}
    return merged_task_vector(method, base, InMemoryTaskVectors(vectors), values)


def test_tsv_keeps_each_tasks_top_triplets_and_averages_other_tensors():
    # r = 3, T = 2: ⌊3/2⌋ = 1 triplet per task. τ_a = diag(3, 1, 0) keeps 3·e1e1ᵀ (its σ = 1
    # direction is dropped); τ_b = diag(0, 0, 2) keeps 2·e3e3ᵀ. U = [e1 e3] and V = [e1 e3]
    # are already orthonormal, so Δ = diag(3, 0, 2). The bias is the mean (Σ/T).
    vectors = {
        "a": {"w": torch.diag(torch.tensor([3.0, 1.0, 0.0])), "b": torch.tensor([2.0, 0.0])},
        "b": {"w": torch.diag(torch.tensor([0.0, 0.0, 2.0])), "b": torch.tensor([0.0, 4.0])},
    }
    delta = _delta("tsv", vectors)
    assert torch.allclose(delta["w"], torch.diag(torch.tensor([3.0, 0.0, 2.0])), atol=1e-6)
    assert torch.equal(delta["b"], torch.tensor([1.0, 2.0]))


def test_tsv_decorrelates_overlapping_singular_vectors():
    # 2x2, T = 2: one triplet each. τ_a = 2·e1e1ᵀ, τ_b = 1·u e2ᵀ with u = (e1 + e2)/√2.
    # U = [e1 u] (columns 45° apart) is not orthogonal; its polar factor turns them 22.5°
    # apart each way: p1 = (cos, -sin), p2 = (sin, cos) at 22.5°. V = [e1 e2] is orthonormal.
    # Δ = 2·p1 e1ᵀ + 1·p2 e2ᵀ = [[2cos, sin], [-2sin, cos]].
    u = torch.tensor([1.0, 1.0]) / 2**0.5
    vectors = {
        "a": {"w": torch.tensor([[2.0, 0.0], [0.0, 0.0]])},
        "b": {"w": torch.outer(u, torch.tensor([0.0, 1.0]))},
    }
    c, s = torch.cos(torch.tensor(torch.pi / 8)), torch.sin(torch.tensor(torch.pi / 8))
    expected = torch.stack([torch.stack([2 * c, s]), torch.stack([-2 * s, c])])
    assert torch.allclose(_delta("tsv", vectors)["w"], expected, atol=1e-6)


def test_tsv_keeps_nothing_of_a_matrix_when_tasks_outnumber_its_rank():
    vectors = {t: {"w": torch.randn(2, 5)} for t in "abc"}  # ⌊2/3⌋ = 0, as the official code
    assert torch.equal(_delta("tsv", vectors)["w"], torch.zeros(2, 5))


def test_iso_c_flattens_the_spectrum_of_the_sum():
    # Σ τ = diag(3, -1, 2): singular values 3, 2, 1 (mean 2), U Vᵀ = diag(1, -1, 1),
    # so Δ = diag(2, -2, 2). The bias is the mean, not the sum.
    vectors = {
        "a": {"w": torch.diag(torch.tensor([3.0, 0.0, 0.0])), "b": torch.tensor([1.0])},
        "b": {"w": torch.diag(torch.tensor([0.0, -1.0, 2.0])), "b": torch.tensor([3.0])},
    }
    delta = _delta("iso_c", vectors)
    assert torch.allclose(delta["w"], torch.diag(torch.tensor([2.0, -2.0, 2.0])), atol=1e-6)
    assert torch.equal(delta["b"], torch.tensor([2.0]))


def test_iso_cts_adds_task_specific_directions_before_flattening():
    # r = 4, T = 2, f = 0.5: k0 = 2, n = round(2/2) = 1, k = 2.
    # τ_a = diag(6, 0, 1, 0.5), τ_b = diag(0, 5, 0, 2); Σ = diag(6, 5, 1, 2.5).
    # Common: e1 (6), e2 (5). Residuals: a → diag(0, 0, 1, 0.5), top e3 (σ 1); b → e4 (σ 2).
    # Spectrum (6, 5, 1, 2) → mean 3.5: Δ = 3.5·I. Iso-C keeps a's 0.5 on e4 in the sum:
    # spectrum (6, 5, 2.5, 1) → mean 3.625.
    vectors = {
        "a": {"w": torch.diag(torch.tensor([6.0, 0.0, 1.0, 0.5]))},
        "b": {"w": torch.diag(torch.tensor([0.0, 5.0, 0.0, 2.0]))},
    }
    cts = _delta("iso_cts", vectors, common_fraction=0.5)["w"]
    assert torch.allclose(cts, 3.5 * torch.eye(4), atol=1e-6)
    assert torch.allclose(_delta("iso_c", vectors)["w"], 3.625 * torch.eye(4), atol=1e-6)


@pytest.mark.parametrize(
    ("rank", "tasks", "fraction", "expected"),
    [
        (4, 3, 0.8, (4, 0)),  # golden shapes: Iso-CTS = Iso-C at 0.8
        (5, 3, 0.8, (5, 0)),
        (4, 3, 0.5, (1, 1)),  # iso_cts_f05
        (5, 3, 0.5, (2, 1)),
        (768, 8, 0.8, (616, 19)),  # ViT-B/32 width: int(614.4) = 614, round(154/8) = 19
        (5, 8, 0.1, (5, 0)),  # round(5/8) = 1 would need 8 > 5 directions: capped
        (6, 2, 0.5, (2, 2)),  # round(3/2) = 2: half rounds to even
    ],
)
def test_iso_cts_splits_the_rank_as_the_official_code(rank, tasks, fraction, expected):
    assert split_rank(rank, tasks, fraction) == expected


def _golden_inputs():
    inputs = load_file(f"{GOLDEN}/inputs.safetensors")
    base = {k[5:]: v for k, v in inputs.items() if k.startswith("base.")}
    vectors = {t: {k: inputs[f"tv.{t}.{k}"] for k in base} for t in ("t0", "t1", "t2")}
    return base, vectors


@pytest.mark.parametrize(
    ("golden", "name", "hparams"),
    [
        ("tsv", "tsv", {}),
        ("iso_c", "iso_c", {}),
        ("iso_cts", "iso_cts", {}),
        ("iso_cts_f05", "iso_cts", {"common_fraction": 0.5}),
    ],
)
def test_matches_the_official_implementation(golden, name, hparams):
    base, vectors = _golden_inputs()
    expected = load_file(f"{GOLDEN}/{golden}.safetensors")
    delta = _delta(name, vectors, base, **hparams)
    assert set(delta) == set(expected)
    for key, value in expected.items():  # sign-invariant outputs: compare directly
        assert torch.allclose(delta[key], value, atol=2e-6, rtol=0), key


def test_polar_factor_is_the_nearest_orthonormal_matrix():
    m = torch.tensor([[3.0, 0.0], [4.0, 5.0], [0.0, 0.0]])
    p = polar(m)
    assert torch.allclose(p.T @ p, torch.eye(2), atol=1e-6)
    assert torch.allclose(p.T @ m, (p.T @ m).T, atol=1e-5)  # Pᵀ M is symmetric PSD


def _experts(tasks: int = 3, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(5, 4, generator=gen), "b": torch.randn(4, generator=gen)}
    experts = {
        f"t{i}": {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        for i in range(tasks)
    }
    cast = {k: v.to(dtype) for k, v in base.items()}
    return cast, {t: {k: v.to(dtype) for k, v in s.items()} for t, s in experts.items()}


def test_tsv_with_one_task_gives_the_expert_back():
    base, experts = _experts(tasks=1)
    merged = atmbench.merge("tsv", base, experts, alpha=1.0)
    assert all(torch.allclose(merged[k], experts["t0"][k], atol=1e-6) for k in base)


def test_iso_with_one_task_flattens_the_expert_and_cts_equals_c():
    base, experts = _experts(tasks=1)
    tau = experts["t0"]["w"] - base["w"]
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    for spec in ("iso_c", "iso_cts"):
        merged = atmbench.merge(spec, base, experts, alpha=1.0)
        assert torch.allclose(merged["w"], base["w"] + s.mean() * u @ vh, atol=1e-6)
        assert torch.allclose(merged["b"], experts["t0"]["b"], atol=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_no_experts_gives_the_base(name):
    base, _ = _experts()
    assert all(torch.equal(v, base[k]) for k, v in atmbench.merge(name, base, {}).items())


@pytest.mark.parametrize("name", METHODS)
def test_task_order_does_not_matter_and_inputs_are_not_mutated(name):
    base, experts = _experts()
    before = {t: {k: v.clone() for k, v in s.items()} for t, s in experts.items()}
    merged = atmbench.merge(name, base, experts)
    reversed_ = atmbench.merge(name, base, dict(reversed(list(experts.items()))))
    assert all(torch.allclose(merged[k], reversed_[k], atol=1e-6) for k in base)
    assert all(torch.equal(experts[t][k], before[t][k]) for t in before for k in before[t])


@pytest.mark.parametrize("name", METHODS)
def test_bf16_inputs_keep_dtype_and_shape(name):
    base, experts = _experts(dtype=torch.bfloat16)
    merged = atmbench.merge(name, base, experts)
    assert {k: (v.dtype, v.shape) for k, v in merged.items()} == {
        k: (torch.bfloat16, v.shape) for k, v in base.items()
    }


def test_alpha_scales_the_merged_task_vector():
    base, experts = _experts()
    one = atmbench.merge("tsv", base, experts, alpha=1.0)
    two = atmbench.merge("tsv:alpha=2", base, experts)
    assert torch.allclose(two["w"] - base["w"], 2 * (one["w"] - base["w"]), atol=1e-5)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tsv:alpha=-1", "alpha=-1 is invalid"),
        ("iso_c:alpha=x", "alpha=x is invalid"),
        ("iso_cts:common_fraction=1.5", r"common_fraction=1.5 is invalid: expected a float in \[0"),
        ("iso_c:common_fraction=0.5", "iso_c has no hyperparameter 'common_fraction'"),
    ],
)
def test_bad_hyperparameters_are_rejected(spec, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(spec, registry.methods(), registry.refiners())


def test_svd_retries_in_float64_when_lapack_fails_to_converge(monkeypatch):
    from atmbench.default_plugins.methods import spectral

    real = torch.linalg.svd

    def flaky(matrix, full_matrices=True):
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(matrix, full_matrices=full_matrices)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    matrix = torch.tensor([[3.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    u, s, vh = spectral.svd(matrix)
    assert s.dtype == torch.float32 and torch.allclose(s, torch.tensor([3.0, 2.0]))
    assert torch.allclose((u * s) @ vh, matrix)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0)])
def test_an_empty_matrix_merges_to_an_empty_delta(name, shape):
    base = {"w": torch.zeros(shape), "b": torch.zeros(2)}
    experts = {
        t: {"w": torch.zeros(shape), "b": torch.full((2,), 1.0 + i)} for i, t in enumerate("abc")
    }
    merged = atmbench.merge(name, base, experts, alpha=1.0)
    assert merged["w"].shape == shape
    assert torch.equal(merged["b"], torch.full((2,), 2.0))  # the mean of the task vectors
