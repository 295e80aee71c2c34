"""The multi-task reference: routing to each task's head, frozen heads, the experts' budget."""

from __future__ import annotations

import torch
from torch import nn

from atmbench.config import pick_device
from atmbench.default_plugins.suites.digits8 import DigitsBenchmark
from atmbench.experts import ensure_experts
from atmbench.heads import Classifier
from atmbench.mtl import MultiTask, budget, ensure_mtl, routed_loss


def test_each_example_is_scored_by_its_own_head():
    torch.manual_seed(0)
    heads = [nn.Linear(4, 3), nn.Linear(4, 2)]
    encoder = nn.Identity()
    images = torch.randn(5, 4)
    labels = torch.tensor([2, 1, 0, 1, 0])
    tasks = torch.tensor([0, 1, 0, 1, 1])
    module = MultiTask([Classifier(encoder, h) for h in heads])
    loss = routed_loss(module, [images, labels, tasks])
    by_hand = (
        sum(
            nn.functional.cross_entropy(heads[t](images[i : i + 1]), labels[i : i + 1])
            for i, t in enumerate(tasks.tolist())
        )
        / 5
    )
    assert torch.allclose(loss, by_hand)


def test_mtl_spends_the_experts_steps_and_leaves_heads_frozen(use_shared_home):
    bench = DigitsBenchmark("vit-micro", use_shared_home, pick_device("cpu"))
    heads_before = [bench.head(t).weight.clone() for t in bench.tasks]
    path, spent = ensure_mtl(use_shared_home, bench, seed=0, progress=False)
    experts = ensure_experts(use_shared_home, bench, seed=0, progress=False)
    assert spent.steps == budget(bench) == experts.total().steps
    assert spent.examples == spent.steps * bench.recipe(bench.tasks[0]).batch_size
    assert all(
        torch.equal(bench.head(t).weight, w) for t, w in zip(bench.tasks, heads_before, strict=True)
    )
    again, _ = ensure_mtl(use_shared_home, bench, seed=0, progress=False)
    assert again == path
