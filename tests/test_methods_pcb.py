"""PCB-Merging: hand-worked examples and the official implementation's outputs.

Goldens: ``tests/data/golden/pcb_r01`` and ``pcb_r03`` (``inputs_clip.safetensors`` merged by
the official ``PCB_merge``, ratio 0.1 and 0.3; ``scripts/pcb_golden.py``, RECIPE.md).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_methods_catalogue import assert_matches, golden_delta

import atmbench

ZERO = {"w": torch.zeros(5)}


def _experts(*taus: list[float]) -> dict:
    return {f"e{i}": {"w": torch.tensor(tau)} for i, tau in enumerate(taus)}


def _betas(m: list[float], products: list[float]) -> list[float]:
    """β = exp(T·m²)·tanh(τ·Σ) for T = 2."""
    return [math.exp(2 * a * a) * math.tanh(b) for a, b in zip(m, products, strict=True)]


def test_pcb_balances_within_and_across_tasks_drops_and_averages():
    tau_a, tau_b = [2.0, -1.0, 0.0, 1.0, -1.5], [1.0, 1.0, -2.0, 0.0, -1.0]
    # Σ = [3, 0, −2, 1, −2.5]. clip 0: each task's |τ| spans [0, 2], m = |τ|/2.
    beta_a = _betas(m=[1, 0.5, 0, 0.5, 0.75], products=[6, 0, 0, 1, 3.75])  # τ_a·Σ
    beta_b = _betas(m=[0.5, 0.5, 1, 0, 0.5], products=[3, 0, 4, 0, 2.5])  # τ_b·Σ
    # ratio 0.6: the floor is the int(5·0.4) = 2nd smallest (0-based) β, the top the largest:
    # a keeps entries 0 (the top: weight 1) and 4; b keeps entries 2 (weight 1) and 0.
    floor_a, top_a = beta_a[3], beta_a[0]
    floor_b, top_b = beta_b[4], beta_b[2]
    w_a4 = (beta_a[4] - floor_a) / (top_a - floor_a)
    w_b0 = (beta_b[0] - floor_b) / (top_b - floor_b)
    assert 0 < w_a4 < 1 and 0 < w_b0 < 1
    expected = torch.tensor([(2.0 + w_b0 * 1.0) / (1 + w_b0), 0.0, -2.0, 0.0, -1.5])
    merged = atmbench.merge("pcb:ratio=0.6,clip=0,lam=1", ZERO, _experts(tau_a, tau_b))
    assert torch.allclose(merged["w"], expected, atol=1e-6, rtol=0)
    scaled = atmbench.merge("pcb:ratio=0.6,clip=0", ZERO, _experts(tau_a, tau_b))
    assert torch.allclose(scaled["w"], 1.2 * expected, atol=1e-6, rtol=0)  # λ = 1.2


def test_pcb_clips_each_task_to_its_quantiles():
    # clip 0.2 of 5 entries: |τ| sorted [.5, 1, 2, 3, 4] is clamped to [sorted[1], sorted[3]]
    # = [1, 3]; ratio 1 keeps every β above the smallest, which is entry 4's
    # (m = 0, tanh(0.25), the smallest product)
    merged = atmbench.merge(
        "pcb:ratio=1,clip=0.2,lam=1", ZERO, _experts([4.0, 1.0, -2.0, 3.0, 0.5])
    )
    assert torch.allclose(merged["w"], torch.tensor([3.0, 1.0, -2.0, 3.0, 0.0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("golden", "ratio"), [("pcb_r01", 0.1), ("pcb_r03", 0.3)])
def test_pcb_matches_the_official_code(golden, ratio):
    got = golden_delta("pcb", {"ratio": ratio, "clip": 1e-4})  # PCB_merge's clip, λ = 1
    assert_matches(got, golden, atol=1e-7)
