"""LiNeS: the depth rule by hand, the official code's outputs, and ``METHOD+lines`` in a run.

Goldens: ``tests/data/golden/lines_sum_b05`` (Task Arithmetic's sum, β 0.5) and
``lines_ties_b12`` (TIES k 20 disjoint mean, β 1.2), made by the official ``LiNeS_scaling``
on ``inputs_clip.safetensors`` (``scripts/lines_golden.py``, RECIPE.md). Each holds the
scaled task vector θ − θ0.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_methods_catalogue import GOLDEN, clip_inputs

from atmbench import registry
from atmbench.default_plugins.refiners.lines import block_count, depth_scales
from atmbench.method import InMemoryTaskVectors, combine
from atmbench.refiner import RefineRequest
from atmbench.streaming import merged_task_vector


def test_depth_scales_follow_the_official_first_match_rule():
    keys = [
        "conv1.weight",
        "transformer.resblocks.0.attn.in_proj_weight",
        "transformer.resblocks.1.mlp.c_fc.weight",
        "transformer.resblocks.10.ln_1.bias",
        "ln_post.weight",
    ]
    assert block_count(keys) == 11
    scales = depth_scales(keys, alpha=0.25, beta=0.5)
    assert scales["conv1.weight"] == scales["ln_post.weight"] == 0.25  # outside: α
    assert scales["transformer.resblocks.0.attn.in_proj_weight"] == 0.25  # first block: α
    assert scales["transformer.resblocks.1.mlp.c_fc.weight"] == pytest.approx(0.25 + 0.5 / 10)
    assert scales["transformer.resblocks.10.ln_1.bias"] == 0.75  # last block: α + β
    assert depth_scales(["a.0.w", "b"], 0.5, 1.0) == {"a.0.w": 1.5, "b": 0.5}  # one block


def _request(method: str, hparams: dict, beta: float) -> tuple[RefineRequest, dict]:
    base, vectors = clip_inputs()
    chosen = registry.methods()[method]
    lam = hparams.get(chosen.scale.name, 1.0) if chosen.scale else 1.0
    merge_hparams = {h.name: hparams[h.name] for h in chosen.hparams}
    merged = merged_task_vector(chosen, base, InMemoryTaskVectors(vectors), merge_hparams)
    request = RefineRequest(
        benchmark=None,
        base=base,
        start=combine(base, merged, lam),
        method=chosen,
        method_hparams=hparams,
        hparams={"beta": beta},
        seed=0,
        vectors=InMemoryTaskVectors(vectors),
    )
    return request, base


@pytest.mark.parametrize(
    ("golden", "method", "hparams", "beta"),
    [
        ("lines_sum_b05", "ta", {"lam": 0.3}, 0.5),  # λ is undone: LiNeS replaces it
        ("lines_ties_b12", "ties", {"k": 0.2, "merge": "mean", "lam": 1.0}, 1.2),
    ],
)
def test_lines_matches_the_official_code(golden, method, hparams, beta):
    request, base = _request(method, hparams, beta)
    state = registry.refiners()["lines"].refine(request).state
    expected = load_file(GOLDEN / f"{golden}.safetensors")
    for key, value in expected.items():
        assert torch.allclose(state[key] - base[key], value, atol=2e-6, rtol=0), key


def test_lines_after_ta_scales_the_sum_from_one_over_t_to_one_over_t_plus_beta():
    request, base = _request("ta", {"lam": 0.7}, 0.6)
    state = registry.refiners()["lines"].refine(request).state
    _, vectors = clip_inputs()
    total = {k: sum(v[k] for v in vectors.values()) for k in base}
    # α = ‖Σ τ‖₁ / ‖Σ τ‖₁ / T = 1/4; block 2 of 3 gets 1/4 + 0.6
    for key, scale in (("proj", 0.25), ("transformer.resblocks.2.mlp.c_fc.weight", 0.85)):
        assert torch.allclose(state[key], base[key] + scale * total[key], atol=1e-6), key
    mid = "transformer.resblocks.1.attn.in_proj_weight"
    assert torch.allclose(state[mid], base[mid] + 0.55 * total[mid], atol=1e-6)
