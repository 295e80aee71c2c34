"""Localize-and-Stitch: the initial patch and stitch by hand, the official code as a golden."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.func import functional_call
from torch.utils.data import TensorDataset

from atmbench import registry
from atmbench.adapt import AdaptRequest
from atmbench.default_plugins.methods import localize_stitch as ls
from atmbench.method import FloatingOnly, InMemoryTaskVectors
from atmbench.streaming import merged_task_vector
from atmbench.testing.refiners import ToyBenchmark

GOLDEN = Path(__file__).parent / "data" / "golden"
TASKS = ("t0", "t1", "t2")


def test_initial_patch_is_strictly_above_the_kth_magnitude():
    # 10 entries, sparsity 0.3: k = 3, the 3rd largest |τ| is 0.7; strictly greater: 0.9, 0.8
    tau = {
        "a": torch.tensor([0.1, -0.9, 0.7]),
        "b": torch.tensor([0.8, 0.0, -0.2, 0.3, 0.05, 0.4, 0.7]),
    }
    logits = ls.initial_logits(tau, 0.3)
    assert logits["a"].tolist() == [-5.0, 5.0, -5.0]
    assert logits["b"].tolist() == [5.0, -5.0, -5.0, -5.0, -5.0, -5.0, -5.0]
    assert all((v == -5.0).all() for v in ls.initial_logits(tau, 0.05).values())  # k = 0


def test_one_epoch_moves_the_logits_by_the_summed_gradient_and_the_l1_term():
    # τ = (2, -1, 0.5), θ0 = 0, sparsity 2/3: k = 2, the 2nd largest |τ| is 1, so S starts
    # (5, -5, -5). loss = -Σ θ (gradient -1 everywhere), one epoch of two batches:
    # g = lr · Σ_batches(-1 ⊙ τ) = -2 lr τ; with d = σ'(±5) and lr = 6/d, g·d = -12 τ, and
    # S ← S - g d + l1 sign(S) d = (5 + 24 + d, -5 - 12 - d, -5 + 6 - d): on, off, on.
    base, tau = {"w": torch.zeros(3)}, {"w": torch.tensor([2.0, -1.0, 0.5])}
    d = (torch.sigmoid(torch.tensor(5.0)) * torch.sigmoid(torch.tensor(-5.0))).item()
    loss = lambda p, b: -p["w"].sum()  # noqa: E731
    masks = ls.localize(loss, base, tau, [[0, 1]], 2 / 3, 6 / d, 1.0)
    assert masks["w"].tolist() == [True, False, True]
    # half the step leaves entry 2 at -5 + 3 - d < 0; no epoch keeps the initial patch
    assert ls.localize(loss, base, tau, [[0, 1]], 2 / 3, 3 / d, 1.0)["w"].tolist() == [
        True,
        False,
        False,
    ]
    assert ls.localize(loss, base, tau, [], 2 / 3, 6 / d, 1.0)["w"].tolist() == [True, False, False]
    # the l1 term alone (lr 0) pushes positive logits up and negative ones down: nothing flips
    assert ls.localize(loss, base, tau, [[0]] * 50, 2 / 3, 0.0, 100.0)["w"].tolist() == [
        True,
        False,
        False,
    ]


def test_stitch_averages_overlaps():
    masks = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    weights = ls.stitch_weights(masks)
    third = pytest.approx(1 / 3)
    assert weights.tolist() == [
        [third, 1.0, 0.0, 0.0],
        [third, 0.0, 1.0, 0.0],
        [third, 0.0, 0.0, 0.0],
    ]


def _golden_setup():
    raw = load_file(GOLDEN / "localize_stitch_inputs.safetensors")
    encoder = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))
    base = {k: raw[f"base.{k}"] for k in encoder.state_dict()}
    vectors = {t: {k: raw[f"tv.{t}.{k}"] for k in base} for t in TASKS}
    return raw, encoder, base, vectors


@pytest.mark.parametrize(
    ("name", "config"), [("ls_s01", (0.1, 1e3, 1.0, 5)), ("ls_s03_dataless", (0.3, 1e3, 1.0, 0))]
)
def test_masks_and_stitch_match_the_official_code(name, config):
    """The official Localizer.train_graft and Stitcher on a tiny MLP (RECIPE.md)."""
    sparsity, lr, l1, epochs = config
    raw, encoder, base, vectors = _golden_setup()
    golden = load_file(GOLDEN / "localize_stitch.safetensors")
    state = {}
    for t in TASKS:
        head = raw[f"head.{t}"]

        def loss(params, batch, head=head):
            x, y = batch
            return nn.functional.cross_entropy(functional_call(encoder, params, (x,)) @ head.T, y)

        batches = [(raw[f"x.{t}.{b}"], raw[f"y.{t}.{b}"]) for b in range(3)]
        mask = ls.localize(loss, base, vectors[t], [batches] * epochs, sparsity, lr, l1)
        for k, m in mask.items():
            assert torch.equal(m.float(), golden[f"{name}.mask.{t}.{k}"]), (t, k)
            state.setdefault(k, []).append(m)
    state = {k: torch.stack(v) for k, v in state.items()}
    method = registry.methods()["localize_stitch"]
    hparams = {"sparsity": sparsity, "lr": lr, "l1": l1, "epochs": epochs}
    delta = merged_task_vector(method, base, InMemoryTaskVectors(vectors), hparams, 0, None, state)
    for k, v in delta.items():
        assert (v - golden[f"{name}.delta.{k}"]).abs().max() < 1e-6
    kept = torch.cat([golden[f"{name}.mask.{t}.{k}"].flatten() for t in TASKS for k in base])
    assert 0.05 < kept.mean() < 0.95  # masks neither empty nor full
    if epochs:  # training changed the initial patch
        initial = ls.initial_logits(vectors["t0"], sparsity)
        assert any(not torch.equal(state[k][0], initial[k] > 0) for k in base)


def test_adapt_reads_only_a_few_training_shots_and_counts_its_compute():
    class Recording(ToyBenchmark):
        read: set = set()

        def dataset(self, task, split):
            self.read.add(split)
            return super().dataset(task, split)

    bench = Recording()
    base = bench.base_state()
    gen = torch.Generator().manual_seed(5)
    vectors = {
        t: {k: 0.5 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        for t in bench.tasks
    }
    request = AdaptRequest(bench, base, FloatingOnly(InMemoryTaskVectors(vectors), base), seed=0)
    method = registry.methods()["localize_stitch"]
    result = method.adapt(request, sparsity=0.2, lr=100.0, l1=1.0, epochs=3)
    assert bench.read == {"train"}
    assert (result.stats.steps, result.stats.examples) == (2 * 3, 2 * 3 * 12)  # 12 shots each
    assert set(result.state) == set(base) and result.state["0.weight"].shape == (2, 6, 4)
    again = method.adapt(request, sparsity=0.2, lr=100.0, l1=1.0, epochs=3)
    assert all(torch.equal(result.state[k], again.state[k]) for k in base)


def test_shots_take_the_first_of_each_class_shuffled_and_capped(monkeypatch):
    labels = torch.tensor([0, 1, 0, 0, 1, 2, 0])
    dataset = TensorDataset(torch.zeros(7, 1), labels)
    monkeypatch.setattr(ls, "SHOTS", 2)
    picked = ls.shots(dataset, 0, "t")
    assert sorted(picked) == [0, 1, 2, 4, 5]
    assert ls.shots(dataset, 0, "t") == picked
    monkeypatch.setattr(ls, "CAP", 3)
    assert ls.shots(dataset, 0, "t") == picked[:3]


def test_shots_of_a_task_without_classes_are_its_first_examples(monkeypatch):
    # a language model's label is its answer's tokens, no class: the task is one class
    answers = torch.arange(7 * 3).reshape(7, 3)
    dataset = TensorDataset(torch.zeros(7, 1), answers)
    monkeypatch.setattr(ls, "SHOTS", 4)
    picked = ls.shots(dataset, 0, "t")
    assert sorted(picked) == [0, 1, 2, 3] and picked != [0, 1, 2, 3]  # shuffled
