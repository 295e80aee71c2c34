"""DOGE's math on hand-worked tensors, its registration, and the atmbench conformance kit."""

from __future__ import annotations

import pytest
import torch
from atmbench_doge import doge, prepare

import atmbench
from atmbench.method import InMemoryTaskVectors
from atmbench.testing import check_method

# Two tasks, one 1x2 weight: τ_1 = [1, 0], τ_2 = [0, 2]; with c = 0.5, λ = (0.5, 0.25).
TAU = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]])
COEFFS = torch.tensor([0.5, 0.25])


def test_task_coefficients_are_c_over_the_norm_and_zero_for_zero_vectors():
    tau = torch.stack([torch.tensor([[3.0, 4.0]]), torch.zeros(1, 2), torch.tensor([[0.0, 2.0]])])
    assert torch.allclose(doge.task_coefficients(tau, 0.5), torch.tensor([0.1, 0.0, 0.25]))


def test_loss_and_gradient_by_hand():
    # S = Σ λ_i τ_i = [0.5, 0.5], Σ λ = 0.75. At δ = 0:
    # e_1 = <[1,0], [1,0] - S> = 0.5 ; e_2 = <[0,2], [0,2] - S> = 3 ; L = 0.25 + 9.
    zero = torch.zeros(1, 2)
    assert torch.allclose(doge.residuals(TAU, COEFFS, zero), torch.tensor([[0.5], [3.0]]))
    assert doge.loss(TAU, COEFFS, zero).item() == pytest.approx(9.25)
    # ∂L/∂δ = -2 Σλ Σ_j e_j τ_j = -1.5 (0.5 [1,0] + 3 [0,2]) = [-0.75, -9]
    assert torch.allclose(doge.gradient(TAU, COEFFS, zero), torch.tensor([[-0.75, -9.0]]))


def test_gradient_matches_autograd():
    gen = torch.Generator().manual_seed(0)
    tau = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64)
    coeffs = doge.task_coefficients(tau, 0.07)
    delta = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    doge.loss(tau, coeffs, delta).backward()
    assert torch.allclose(doge.gradient(tau, coeffs, delta.detach()), delta.grad)


def test_first_adam_step_moves_every_entry_by_lr_against_the_gradient():
    basis = doge.shared_subspace(TAU, 6)
    assert basis.shape == (1, 0)  # rank 1 < 2 tasks: no shared subspace, no projection
    delta = doge.optimise_delta(TAU, COEFFS, basis, steps=1, lr=1e-3)
    assert torch.allclose(delta, torch.tensor([[1e-3, 1e-3]]))


def test_shared_subspace_is_the_direction_both_tasks_use():
    # rank 6, 2 tasks: each contributes its top 3 left singular vectors; e1 is in both
    # stacks, so it is the top direction of the stack, and ⌊6/6⌋ = 1 direction is kept.
    eye = torch.eye(6)
    tau_1 = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0, 0.0]))
    tau_2 = torch.diag(torch.tensor([3.0, 0.0, 0.0, 2.0, 1.0, 0.0]))
    basis = doge.shared_subspace(torch.stack([tau_1, tau_2]), 6)
    assert basis.shape == (6, 1)
    assert torch.allclose(basis @ basis.T, torch.outer(eye[0], eye[0]), atol=1e-6)
    grad = torch.ones(6, 2)
    assert torch.allclose(doge.project_out(grad, basis)[0], torch.zeros(2), atol=1e-6)
    assert torch.allclose(doge.project_out(grad, basis)[1:], torch.ones(5, 2))


def test_optimise_delta_is_adam_on_the_projected_gradient():
    gen = torch.Generator().manual_seed(1)
    tau = 0.1 * torch.randn(3, 12, 8, generator=gen, dtype=torch.float64)
    coeffs = doge.task_coefficients(tau, 0.07)
    basis = doge.shared_subspace(tau, 4)
    assert basis.shape == (12, 2)
    delta = torch.zeros(12, 8, dtype=torch.float64, requires_grad=True)
    adam = torch.optim.Adam([delta], lr=1e-3)
    for _ in range(25):
        adam.zero_grad()
        doge.loss(tau, coeffs, delta).backward()
        delta.grad -= basis @ (basis.T @ delta.grad)
        adam.step()
    ours = doge.optimise_delta(tau, coeffs, basis, steps=25, lr=1e-3)
    assert torch.allclose(ours, delta.detach(), atol=1e-12)
    assert doge.loss(tau, coeffs, ours) < doge.loss(tau, coeffs, torch.zeros_like(ours))


def test_merge_layer_sums_the_masked_scaled_vectors():
    delta = torch.tensor([[0.5, 0.5]])
    masks = torch.tensor([[[True, False]], [[True, True]]])
    # 0.5 ([1,0]+δ)⊙[1,0] + 0.25 ([0,2]+δ) = [0.75, 0] + [0.125, 0.625]
    merged = doge.merge_layer(TAU, COEFFS, delta, masks)
    assert torch.allclose(merged, torch.tensor([[0.875, 0.625]]))


# A 2x2 weight and a bias. τ_a(w) has magnitudes 1, 2, 2, 4 and norm 5; τ_b(w) norm 5.
BASE = {"w": torch.zeros(2, 2), "b": torch.zeros(1)}
VECTORS = {
    "a": {"w": torch.tensor([[1.0, 2.0], [2.0, 4.0]]), "b": torch.tensor([10.0])},
    "b": {"w": torch.tensor([[0.0, 0.0], [3.0, 4.0]]), "b": torch.tensor([1.5])},
}


def test_topk_threshold_counts_two_d_entries_only():
    # k = 0.25 over the 4 weight entries: n = 1, keep |τ| >= the 3rd smallest (2 for task a).
    # Counting the bias too would give the 4th smallest of 5 (4) instead.
    thresholds = prepare(InMemoryTaskVectors(VECTORS), seed=0, k=0.25)
    assert thresholds.tolist() == [2.0, 3.0]
    assert prepare(InMemoryTaskVectors({}), seed=0, k=0.25) is None


def test_registered_through_the_entry_point():
    source = atmbench.registry.registered_methods()["doge"].source
    assert (source.package, source.plugin) == ("atmbench-doge", "doge")
    assert atmbench.methods()["doge"].data == "none"


def test_merge_end_to_end_by_hand():
    experts = {t: {k: BASE[k] + v for k, v in s.items()} for t, s in VECTORS.items()}
    merged = atmbench.merge("doge:lam=1,k=0.25,steps=0", BASE, experts)
    # λ = 1/5 for both. Masks: a keeps |τ| >= 2 -> [[0,1],[1,1]]; b keeps >= 3 -> [[0,0],[1,1]].
    # 0.2 [[0,2],[2,4]] + 0.2 [[0,0],[3,4]] = [[0, 0.4], [1.0, 1.6]]; the bias is the mean.
    assert torch.allclose(merged["w"], torch.tensor([[0.0, 0.4], [1.0, 1.6]]))
    assert torch.allclose(merged["b"], torch.tensor([5.75]))


def test_conformance_kit():
    outcome = check_method("doge", hparams={"steps": 5})
    assert outcome.pop("rowwise") == "skipped: the method does not declare rowwise=True"
    assert set(outcome.values()) == {"passed"}
