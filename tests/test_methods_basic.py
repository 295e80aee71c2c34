"""Weight averaging and Task Arithmetic on hand-worked 3x3 tensors, through the public API."""

from __future__ import annotations

import pytest
import torch

import atmbench
from atmbench.method import MergeInputError

BASE = {"w": torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0], [3.0, 0.0, 1.0]]), "b": torch.zeros(3)}
TAU_A = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 3.0], [0.0, 0.0, 1.0]])
TAU_B = torch.tensor([[-1.0, 2.0, 2.0], [1.0, 1.0, -1.0], [0.0, 4.0, -1.0]])


def _experts():
    return {
        "a": {"w": BASE["w"] + TAU_A, "b": torch.tensor([1.0, 0.0, 0.0])},
        "b": {"w": BASE["w"] + TAU_B, "b": torch.tensor([0.0, 2.0, 0.0])},
    }


def test_average_is_the_mean_of_the_experts():
    merged = atmbench.merge("average", BASE, _experts())
    # θ0 + (τ_a + τ_b)/2: sum of τ = [[0,4,2],[1,0,2],[0,4,0]]
    expected = torch.tensor([[1.0, 2.0, 3.0], [0.5, 1.0, 1.0], [3.0, 2.0, 1.0]])
    assert torch.equal(merged["w"], expected)
    assert torch.equal(merged["b"], torch.tensor([0.5, 1.0, 0.0]))


def test_task_arithmetic_scales_the_sum():
    merged = atmbench.merge("ta:lam=0.5", BASE, _experts())
    expected = torch.tensor([[1.0, 2.0, 3.0], [0.5, 1.0, 1.0], [3.0, 2.0, 1.0]])
    assert torch.equal(merged["w"], expected)  # λ = 1/2 with T = 2 is the average
    merged = atmbench.merge("ta", BASE, _experts(), lam=1.0)
    assert torch.equal(
        merged["w"], torch.tensor([[1.0, 4.0, 4.0], [1.0, 1.0, 2.0], [3.0, 4.0, 1.0]])
    )


def test_default_lambda_is_used_when_none_given():
    merged = atmbench.merge("ta", BASE, _experts())
    assert torch.allclose(merged["w"], BASE["w"] + 0.3 * (TAU_A + TAU_B))


@pytest.mark.parametrize("spec", ["average", "ta"])
def test_no_experts_gives_the_base_and_inputs_are_not_mutated(spec):
    assert all(torch.equal(v, BASE[k]) for k, v in atmbench.merge(spec, BASE, {}).items())
    experts = _experts()
    before = {t: {k: v.clone() for k, v in s.items()} for t, s in experts.items()}
    atmbench.merge(spec, BASE, experts)
    assert all(torch.equal(experts[t][k], before[t][k]) for t in before for k in before[t])


def test_dtype_is_preserved():
    base = {k: v.to(torch.bfloat16) for k, v in BASE.items()}
    experts = {t: {k: v.to(torch.bfloat16) for k, v in s.items()} for t, s in _experts().items()}
    merged = atmbench.merge("ta:lam=0.5", base, experts)
    assert merged["w"].dtype == torch.bfloat16


def test_mismatched_keys_and_nan_are_clear_errors():
    experts = _experts()
    del experts["b"]["b"]
    with pytest.raises(MergeInputError, match=r"task 'b' does not match .*missing \['b'\]"):
        atmbench.merge("ta", BASE, experts)
    experts = _experts()
    experts["a"]["w"][0, 0] = float("nan")
    with pytest.raises(MergeInputError, match=r"'w' of task\(s\) \['a'\] holds NaN"):
        atmbench.merge("ta", BASE, experts)


def test_refiner_specs_are_refused_by_the_data_free_api():
    with pytest.raises(ValueError, match="unknown"):
        atmbench.merge("nope", BASE, _experts())
