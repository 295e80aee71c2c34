"""EMR-Merging and TALL masks: one model per task, by hand, against FusionBench, in a run.

Goldens (``scripts/pertask_goldens.py``, RECIPE.md): ``emr`` (FusionBench's ``emr_merge``)
and ``tall_masks_l03`` / ``tall_masks_l06`` (FusionBench's ``TallMaskTaskArithmeticAlgorithm``
with θ0 = 0, where its mask is the official one), each task's θ_t − θ0 as ``<task>.<param>``.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_methods_catalogue import GOLDEN, TASKS, clip_inputs

import atmbench
from atmbench import registry
from atmbench.api import merge_checkpoints
from atmbench.runner import plan
from atmbench.spec import SpecError

ZERO = {"w": torch.zeros(5)}
EXPERTS = {
    "a": {"w": torch.tensor([1.0, -2.0, 0.0, 3.0, 1.0])},
    "b": {"w": torch.tensor([2.0, 1.0, -1.0, -1.0, 0.0])},
}


def test_emr_elects_masks_and_rescales_each_task():
    models = atmbench.merge_per_task("emr", ZERO, EXPERTS)
    # Σ = [3, −1, −1, 2, 1]: σ = [+, −, −, +, +]; τ_uni = [2, −2, −1, 3, 1] (largest agreeing)
    # M_a = [1, 1, 0, 1, 1], M_b = [1, 0, 1, 0, 0]
    # γ_a = mean|τ_a| / mean|M_a τ_uni| = (7/5) / (8/5); γ_b = (5/5) / (3/5)
    expected_a = 7 / 8 * torch.tensor([2.0, -2.0, 0.0, 3.0, 1.0])
    expected_b = 5 / 3 * torch.tensor([2.0, 0.0, -1.0, 0.0, 0.0])
    assert torch.allclose(models["a"]["w"], expected_a, atol=1e-6, rtol=0)
    assert torch.allclose(models["b"]["w"], expected_b, atol=1e-6, rtol=0)


def test_emr_zero_sum_elects_minus_and_the_rescaler_sums_per_tensor_means():
    base = {"u": torch.zeros(2), "v": torch.zeros(4)}
    experts = {
        "a": {"u": torch.tensor([1.0, 0.0]), "v": torch.tensor([4.0, 0.0, 0.0, 0.0])},
        "b": {"u": torch.tensor([-1.0, 2.0]), "v": torch.tensor([0.0, 0.0, 0.0, -4.0])},
    }
    models = atmbench.merge_per_task("emr", base, experts)
    # u: Σ = [0, 2] elects [−, +]: τ_uni = [−1, 2]; a agrees nowhere, b everywhere
    # v: Σ = [4, 0, 0, −4] elects [+, −, −, −]: τ_uni = [4, 0, 0, −4]
    # γ_a = (1/2 + 1) / (0 + 1) = 1.5 (means per tensor, summed); γ_b = (3/2 + 1) / (3/2 + 1)
    assert torch.equal(models["a"]["u"], torch.zeros(2))
    assert torch.allclose(models["a"]["v"], torch.tensor([6.0, 0.0, 0.0, 0.0]))
    assert torch.allclose(models["b"]["u"], torch.tensor([-1.0, 2.0]))
    assert torch.allclose(models["b"]["v"], torch.tensor([0.0, 0.0, 0.0, -4.0]))


def test_tall_masks_keep_where_the_task_dominates_strictly():
    models = atmbench.merge_per_task("tall_masks:lam=0.5", ZERO, EXPERTS)
    # a: |τ_a| = [1, 2, 0, 3, 1] > 0.5·|τ_b| = [1, .5, .5, .5, 0]: [no (equal), yes, no, yes, yes]
    # b: |τ_b| = [2, 1, 1, 1, 0] > 0.5·|τ_a| = [.5, 1, 0, 1.5, .5]: [yes, no (equal), yes, no, no]
    assert torch.equal(models["a"]["w"], torch.tensor([0.0, -1.0, 0.0, 2.0, 1.0]))  # m_a ⊙ Σ
    assert torch.equal(models["b"]["w"], torch.tensor([3.0, 0.0, -1.0, 0.0, 0.0]))


@pytest.mark.parametrize(
    ("golden", "spec", "atol"),
    [
        ("emr", "emr", 1e-6),
        ("tall_masks_l03", "tall_masks:lam=0.3", 0.0),  # a selection: exact
        ("tall_masks_l06", "tall_masks", 0.0),  # the default λ = 0.6
    ],
)
def test_per_task_models_match_fusionbench(golden, spec, atol):
    # experts given as the task vectors themselves over θ0 = 0: the τ_t are the golden's
    # exactly (θ_t − θ0 in float32 would move entries on the 0.01 grid off their ties)
    _, vectors = clip_inputs()
    zero = {k: torch.zeros_like(v) for k, v in vectors["t0"].items()}
    models = atmbench.merge_per_task(spec, zero, vectors)
    expected = load_file(GOLDEN / f"{golden}.safetensors")
    assert set(expected) == {f"{t}.{k}" for t in TASKS for k in zero}
    for name, value in expected.items():
        task, key = name.split(".", 1)
        assert torch.allclose(models[task][key], value, atol=atol, rtol=0), name


def test_per_task_methods_refuse_a_single_model_and_a_refiner(tmp_path):
    with pytest.raises(SpecError, match="one model per task.*merge_per_task"):
        atmbench.merge("emr", ZERO, EXPERTS)
    with pytest.raises(SpecError, match="'ta' merges into one model"):
        atmbench.merge_per_task("ta", ZERO, EXPERTS)
    with pytest.raises(SpecError, match="one model per task.*merge_per_task or 'atmbench run'"):
        merge_checkpoints("tall_masks", "base", ["a", "b"], tmp_path / "out")
    with pytest.raises(ValueError, match="no refiner can follow it: run 'emr' without '\\+lines'"):
        plan("digits8", None, ["emr+lines"], [0])


def test_per_task_storage_is_a_bit_per_entry_plus_the_rescaler():
    methods = registry.methods()
    assert methods["tall_masks"].per_task_bytes(2008) == 251
    assert methods["emr"].per_task_bytes(2008) == 255
