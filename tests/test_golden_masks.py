"""TIES, DARE, Breadcrumbs and Consensus against the official implementations' outputs.

The fixtures and how they were made: ``tests/data/golden/RECIPE.md``. Goldens are float64
results stored as float32; we merge in float32, hence the tolerances.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from reference import consensus_mask, dare_rescale, tall_masks
from safetensors.torch import load_file

from atmbench import registry
from atmbench.method import InMemoryTaskVectors
from atmbench.streaming import merged_task_vector

GOLDEN = Path(__file__).parent / "data" / "golden"
TASKS = ("t0", "t1", "t2")


def _inputs() -> tuple[dict, dict]:
    raw = load_file(GOLDEN / "inputs.safetensors")
    base = {k.removeprefix("base."): v for k, v in raw.items() if k.startswith("base.")}
    vectors = {
        t: {k.removeprefix(f"tv.{t}."): v for k, v in raw.items() if k.startswith(f"tv.{t}.")}
        for t in TASKS
    }
    return base, vectors


def _assert_close(got: dict, golden: str, atol: float = 1e-6) -> None:
    expected = load_file(GOLDEN / f"{golden}.safetensors")
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.allclose(got[key], value, atol=atol, rtol=0), (golden, key)


@pytest.mark.parametrize(
    ("name", "hparams", "golden"),
    [
        ("ties", {"k": 0.2, "merge": "mean"}, "ties_k20_mean"),
        ("ties", {"k": 0.2, "merge": "sum"}, "ties_k20_sum"),
        ("breadcrumbs", {"keep": 0.2, "outliers": 0.1}, "breadcrumbs"),
        ("breadcrumbs", {"keep": 0.5, "outliers": 0.25}, "breadcrumbs_keep05_rm025"),
        ("consensus_ta", {"mask_lam": 0.5, "agree": 2}, "consensus_ta"),
    ],
)
def test_matches_the_official_output(name, hparams, golden):
    base, vectors = _inputs()
    method = registry.methods()[name]
    got = merged_task_vector(method, base, InMemoryTaskVectors(vectors), hparams)
    _assert_close(got, golden)


def test_ties_keeps_n_plus_one_entries_over_the_whole_model():
    # 60 entries per task, k = 0.2: int(12) -> the official kthvalue(48) with >= keeps 13.
    base, vectors = _inputs()
    ties = registry.methods()["ties"]
    state = ties.prepare(InMemoryTaskVectors(vectors), seed=0, k=0.2)
    for i, task in enumerate(TASKS):
        kept = sum(int((v.abs() >= state.thresholds[i]).sum()) for v in vectors[task].values())
        assert kept == 13


def test_consensus_task_masks_match_the_official_masks():
    base, vectors = _inputs()
    masks = load_file(GOLDEN / "consensus_ta_masks.safetensors")
    for key in base:
        stacked = torch.stack([vectors[t][key] for t in TASKS])
        task_masks = tall_masks(stacked, stacked.sum(0), 0.5)
        for i, task in enumerate(TASKS):
            assert torch.equal(task_masks[i], masks[f"{task}.{key}"].bool()), (task, key)
        assert torch.equal(consensus_mask(task_masks, 2), masks[f"consensus.{key}"].bool())


def test_dare_math_with_the_official_masks_injected():
    # The golden masks come from FusionBench's RNG stream; our sampling is tested separately.
    base, vectors = _inputs()
    masks = load_file(GOLDEN / "dare_ta_p05_masks.safetensors")
    got = {}
    for key in base:
        stacked = torch.stack([vectors[t][key] for t in TASKS])
        keep = torch.stack([masks[f"{t}.{key}"].bool() for t in TASKS])
        got[key] = dare_rescale(stacked, keep, 0.5).sum(0)
    _assert_close(got, "dare_ta_p05")
