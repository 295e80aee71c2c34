"""MagMax, Model Stock and DELLA: hand-worked examples and the official implementations' outputs.

Goldens: ``tests/data/golden/inputs_clip.safetensors`` (a miniature open_clip tower, four
tasks, task-vector entries on a 0.01 grid so that equal magnitudes are common) merged by
FusionBench 0.2.33 and mergekit 0.1.5; scripts in ``tests/data/golden/scripts/``, facts in
RECIPE.md. Goldens are float64 results stored as float32; we merge in float32.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import atmbench
from atmbench import registry
from atmbench.method import InMemoryTaskVectors, TensorContext
from atmbench.streaming import merged_task_vector

GOLDEN = Path(__file__).parent / "data" / "golden"
TASKS = ("t0", "t1", "t2", "t3")


def clip_inputs() -> tuple[dict, dict]:
    raw = load_file(GOLDEN / "inputs_clip.safetensors")
    base = {k.removeprefix("base."): v for k, v in raw.items() if k.startswith("base.")}
    vectors = {t: {k: raw[f"tv.{t}.{k}"] for k in base} for t in TASKS}
    return base, vectors


def golden_delta(name: str, hparams: dict) -> dict:
    base, vectors = clip_inputs()
    method = registry.methods()[name]
    return merged_task_vector(method, base, InMemoryTaskVectors(vectors), hparams)


def assert_matches(got: dict, golden: str, atol: float) -> None:
    expected = load_file(GOLDEN / f"{golden}.safetensors")
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.allclose(got[key], value, atol=atol, rtol=0), (golden, key)


def _experts(base: dict, *taus: torch.Tensor) -> dict:
    return {f"e{i}": {"w": base["w"] + tau} for i, tau in enumerate(taus)}


# --- MagMax -------------------------------------------------------------------------------

BASE = {"w": torch.tensor([[1.0, -1.0, 0.0], [2.0, 0.5, 0.0]])}


def test_magmax_takes_the_largest_magnitude_and_the_later_task_wins_ties():
    tau_a = torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.25, 0.0]])
    tau_b = torch.tensor([[-1.0, 1.0, 0.0], [-4.0, 0.5, 0.0]])
    tau_c = torch.tensor([[0.5, 2.0, 0.0], [1.0, -0.5, 0.0]])
    merged = atmbench.merge("magmax:alpha=1", BASE, _experts(BASE, tau_a, tau_b, tau_c))
    # entry (0,0): |1| = |−1| tie between a and b, c smaller -> b's −1
    # entry (0,1): |−2| = |2| tie between a and c -> c's +2; (1,1): b 0.5 vs c −0.5 -> c's −0.5
    tau_max = torch.tensor([[-1.0, 2.0, 0.0], [-4.0, -0.5, 0.0]])
    assert torch.equal(merged["w"], BASE["w"] + tau_max)
    default = atmbench.merge("magmax", BASE, _experts(BASE, tau_a, tau_b, tau_c))
    assert torch.equal(default["w"], BASE["w"] + 0.5 * tau_max)  # α = 0.5, the official value


def test_magmax_matches_fusionbench():
    assert_matches(golden_delta("magmax", {}), "magmax", atol=0.0)  # a selection: exact


# --- Model Stock --------------------------------------------------------------------------

ONE = {"w": torch.tensor([1.0, 2.0])}


@pytest.mark.parametrize(
    ("average", "ratio"),
    [
        # cosines 0, 1/√2, 1/√2: mean √2/3, t = 3·(√2/3) / (2·(√2/3) + 1)
        ("cosine", math.sqrt(2) / (1 + 2 * math.sqrt(2) / 3)),
        # angles 90°, 45°, 45°: mean 60°, cos 0.5, t = 1.5 / 2
        ("angle", 0.75),
    ],
)
def test_model_stock_ratio_from_the_mean_pairwise_cosine_or_angle(average, ratio):
    taus = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])
    merged = atmbench.merge(f"model_stock:average={average}", ONE, _experts(ONE, *taus))
    mean = torch.tensor([2 / 3, 2 / 3])
    assert torch.allclose(merged["w"], ONE["w"] + ratio * mean, atol=1e-6, rtol=0)


def test_model_stock_two_experts_and_the_degenerate_cases():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    c = 1 / math.sqrt(2)  # two experts: t = 2c / (c + 1), the paper's formula
    merged = atmbench.merge("model_stock", ONE, _experts(ONE, a, b))
    assert torch.allclose(merged["w"], ONE["w"] + 2 * c / (c + 1) * (a + b) / 2, atol=1e-6)
    for average in ("cosine", "angle"):  # opposite task vectors: denominator 0, θ0 kept
        spec = f"model_stock:average={average}"
        assert torch.equal(atmbench.merge(spec, ONE, _experts(ONE, a, -a))["w"], ONE["w"])
    assert torch.equal(atmbench.merge("model_stock", ONE, _experts(ONE, a))["w"], ONE["w"] + a)


@pytest.mark.parametrize("average", ["cosine", "angle"])
def test_model_stock_matches_mergekit_and_fusionbench(average):
    # cosine: mergekit 0.1.5; angle: FusionBench 0.2.33 (RECIPE.md)
    assert_matches(
        golden_delta("model_stock", {"average": average}), f"model_stock_{average}", 1e-7
    )


# --- DELLA --------------------------------------------------------------------------------


def _inject(monkeypatch, uniforms: dict) -> None:
    """ctx.uniform returns the given draws (keyed ``task.parameter``) instead of its stream."""
    monkeypatch.setattr(
        TensorContext, "uniform", lambda self, i, shape: uniforms[f"{self.tasks[i]}.{self.key}"]
    )


def test_della_prunes_by_rank_rescales_elects_and_averages(monkeypatch):
    base = {"w": torch.zeros(3)}
    tau_a, tau_b = torch.tensor([0.1, -0.3, 0.2]), torch.tensor([-0.4, 0.1, 0.1])
    # density 0.5, ε 0.25: ranks 0, 1, 2 keep with p = 0.25, 0.5, 0.75.
    # a: ranks [0, 2, 1] -> p [.25, .75, .5]; u [.2, .8, .4] keeps [0.1, 0, 0.2], ×(0.6/0.3)
    # b: ranks [2, 0, 1] (the equal 0.1s ranked in index order) -> p [.75, .25, .5];
    #    u [.5, .3, .45] keeps [−0.4, 0, 0.1], ×(0.6/0.5)
    _inject(
        monkeypatch,
        {"e0.w": torch.tensor([0.2, 0.8, 0.4]), "e1.w": torch.tensor([0.5, 0.3, 0.45])},
    )
    merged = atmbench.merge(
        "della:density=0.5,epsilon=0.25,lam=1", base, _experts(base, tau_a, tau_b)
    )
    # pruned a [0.2, 0, 0.4], b [−0.48, 0, 0.12]: sum [−0.28, 0, 0.52] elects [−, +, +];
    # entry 0 keeps b alone, entry 1 has no agreeing value, entry 2 the mean of both
    assert torch.allclose(merged["w"], torch.tensor([-0.48, 0.0, 0.26]), atol=1e-7, rtol=0)


def test_della_matches_mergekit_given_its_draws(monkeypatch):
    _inject(monkeypatch, load_file(GOLDEN / "della_uniforms.safetensors"))
    assert_matches(golden_delta("della", {"density": 0.5, "epsilon": 0.2}), "della", 1e-7)


def test_della_draws_reproducibly_and_keeps_about_density():
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.zeros(64, 256)}
    experts = {"a": {"w": torch.randn(64, 256, generator=gen)}}
    one = atmbench.merge("della:density=0.3,epsilon=0.1,lam=1", base, experts, seed=3)
    again = atmbench.merge("della:density=0.3,epsilon=0.1,lam=1", base, experts, seed=3)
    other = atmbench.merge("della:density=0.3,epsilon=0.1,lam=1", base, experts, seed=4)
    assert torch.equal(one["w"], again["w"]) and not torch.equal(one["w"], other["w"])
    kept = one["w"] != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    # larger magnitudes are kept more often: p runs from 0.2 to 0.4 along each row's ranks
    magnitude = experts["a"]["w"].abs()
    assert magnitude[kept].mean() > magnitude[~kept].mean()


def test_della_refuses_an_epsilon_outside_the_density_window():
    with pytest.raises(ValueError, match=r"epsilon=0.3 is invalid for density=0.2.*< 0.2"):
        atmbench.merge("della:density=0.2,epsilon=0.3", ONE, _experts(ONE, ONE["w"]))


# --- CART ---------------------------------------------------------------------------------


def test_cart_adds_the_low_rank_centred_vectors_to_the_average():
    base = {"blocks.0.attn.w": torch.zeros(2, 2), "blocks.0.ln_1.bias": torch.zeros(2)}
    taus = [torch.diag(torch.tensor(d)) for d in ([2.0, 0.0], [0.0, 2.0], [1.0, 0.0])]
    experts = {
        f"e{i}": {"blocks.0.attn.w": tau, "blocks.0.ln_1.bias": tau.diagonal().clone()}
        for i, tau in enumerate(taus)
    }
    # mean diag(1, 2/3); centred diag(1, −2/3), diag(−1, 4/3), diag(0, −2/3); k = max(1,
    # int(0.12·2)) = 1 keeps each one's larger entry: diag(1,0) + diag(0,4/3) + diag(0,−2/3)
    merged = atmbench.merge("cart", base, experts)  # λ = 2: diag(1, 2/3) + 2·diag(1, 2/3)
    assert torch.allclose(merged["blocks.0.attn.w"], torch.diag(torch.tensor([3.0, 2.0])))
    assert torch.allclose(merged["blocks.0.ln_1.bias"], torch.tensor([1.0, 2 / 3]))  # average
    full = atmbench.merge("cart:rank=1", base, experts)  # full rank: the centred vectors cancel
    assert torch.allclose(full["blocks.0.attn.w"], torch.diag(torch.tensor([1.0, 2 / 3])))
    two = atmbench.merge("cart", base, dict(list(experts.items())[:2]))  # T = 2: c_a = −c_b
    assert torch.allclose(two["blocks.0.attn.w"], torch.eye(2), atol=1e-6)


@pytest.mark.parametrize(
    ("golden", "hparams"), [("cart", {}), ("cart_r05", {"rank": 0.5, "lam": 1.5})]
)
def test_cart_matches_the_official_code(golden, hparams):
    hparams = {"rank": 0.12, "lam": 2.0} | hparams  # the official 8-task config by default
    assert_matches(golden_delta("cart", hparams), golden, atol=5e-6)  # float32 SVD vs float64


# --- WUDI ---------------------------------------------------------------------------------

FC, PROJ, BIAS = "blocks.0.mlp.c_fc.weight", "proj", "blocks.0.mlp.c_fc.bias"


def _wudi_inputs(*rows: list[float]) -> tuple[dict, dict]:
    base = {FC: torch.zeros(1, 2), PROJ: torch.zeros(1, 2), BIAS: torch.zeros(2)}
    experts = {
        f"e{i}": {FC: torch.tensor([row]), PROJ: torch.tensor([row]), BIAS: torch.tensor(row)}
        for i, row in enumerate(rows)
    }
    return base, experts


def test_wudi_first_adam_step_and_which_tensors_it_optimises():
    base, experts = _wudi_inputs([1.0, 0.0], [1.0, 1.0])
    # A = τ1ᵀτ1/1 + τ2ᵀτ2/2 = [[1.5, .5], [.5, .5]], B = τ1A1 + τ2A2 = [2, 1]; from the
    # sum [2, 1] the gradient 2([2, 1]·A − B) = [3, 1]: Adam's first step is −lr·sign(g)
    one = atmbench.merge("wudi:steps=1", base, experts)
    assert torch.allclose(one[FC], torch.tensor([[2.0, 1.0]]) - 1e-5, atol=1e-7, rtol=0)
    assert torch.equal(one[PROJ], base[PROJ]) and torch.equal(one[BIAS], base[BIAS])  # authors
    fb = atmbench.merge("wudi:steps=1,scope=matrices", base, experts)  # FusionBench's scope
    assert torch.equal(fb[PROJ], one[FC]) and torch.equal(fb[BIAS], torch.tensor([1.0, 0.5]))


def test_wudi_blocks_scope_optimises_a_language_models_layers_not_its_embeddings_or_head():
    # text8's llama keys: the layers' projections are optimised (they move by Adam's first
    # step, -lr·sign(g)), the token embeddings and the LM head stay at θ0 (scope=blocks)
    keys = ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight", "lm_head.weight")
    base = {k: torch.zeros(1, 2) for k in keys}
    experts = {
        f"e{i}": {k: torch.tensor([row]) for k in keys}
        for i, row in enumerate([[1.0, 0.0], [1.0, 1.0]])
    }
    one = atmbench.merge("wudi:steps=1", base, experts)
    assert torch.allclose(one[keys[0]], torch.tensor([[2.0, 1.0]]) - 1e-5, atol=1e-7, rtol=0)
    assert not one[keys[1]].any() and not one[keys[2]].any()


def test_wudi_reduces_the_interference_and_keeps_orthogonal_task_vectors_summed():
    base, experts = _wudi_inputs([1.0, 0.0], [1.0, 1.0])
    taus = [e[FC] for e in experts.values()]

    def interference(m):
        return sum(((m - t) @ t.T).square().sum() / t.square().sum() for t in taus)

    merged = atmbench.merge("wudi:steps=300", base, experts)[FC]
    assert interference(merged) < interference(taus[0] + taus[1]) - 1e-3
    base, experts = _wudi_inputs([1.0, 0.0], [0.0, -2.0])  # no interference: gradient 0
    assert torch.equal(atmbench.merge("wudi", base, experts)[FC], torch.tensor([[1.0, -2.0]]))


def test_wudi_budget_is_absolute_so_large_task_vectors_stay_near_their_sum():
    # The minimiser of the example above is B A⁻¹ = [2, 1]·[[1, -1], [-1, 3]] = [1, 1], at
    # distance 1 from the start [2, 1]; Adam moves an entry ~lr = 1e-5 a step, so the
    # authors' 300 steps go 3e-3 of the way (why wudi trails TA on digits8: wudi.py).
    base, experts = _wudi_inputs([1.0, 0.0], [1.0, 1.0])
    merged = atmbench.merge("wudi", base, experts)[FC]
    assert (merged - torch.tensor([[2.0, 1.0]])).abs().max() <= 300 * 1e-5 * 1.05
    # the same problem at 1/1000 the scale: the minimiser [1e-3, 1e-3] is within reach
    small = {t: {k: v * 1e-3 for k, v in e.items()} for t, e in experts.items()}
    merged = atmbench.merge("wudi:steps=2000", base, small)[FC]
    assert torch.allclose(merged, torch.tensor([[1e-3, 1e-3]]), atol=2e-5, rtol=0)


def test_wudi_matches_fusionbench():
    got = golden_delta("wudi", {"scope": "matrices", "steps": 300})
    assert_matches(got, "wudi_matrices", atol=3e-6)  # float32 Adam vs float64


def test_wudi_blocks_scope_optimises_the_same_way_and_leaves_the_rest_at_the_base():
    got = golden_delta("wudi", {"scope": "blocks", "steps": 300})
    expected = load_file(GOLDEN / "wudi_matrices.safetensors")
    for key, value in got.items():
        if any(
            key.endswith(name)
            for name in ("in_proj_weight", "out_proj.weight", "c_fc.weight", "c_proj.weight")
        ):
            assert torch.allclose(value, expected[key], atol=3e-6, rtol=0), key
        else:
            assert not value.any(), key
