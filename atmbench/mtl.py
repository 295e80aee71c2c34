"""Multi-task learning: the strongest data-using reference row.

The backbone is fine-tuned on all tasks' train splits at once — shuffled mixed batches,
each example scored by its own task's frozen head — for as many optimizer steps as the
individual experts take together, so "merge T experts" and "train one model on T tasks"
spend the same compute. Cached like an expert, as a task vector.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, Dataset

from atmbench.cache import DATA, EntryCache
from atmbench.experts import expert_key
from atmbench.finetune import TrainStats, state_on_cpu, task_vector, train
from atmbench.seeds import derive
from atmbench.suite import Benchmark


class Tagged(Dataset):
    """A task's dataset whose items carry the task's index: (image, label, task)."""

    def __init__(self, dataset: Dataset, index: int):
        self.dataset, self.index = dataset, index

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, label = self.dataset[i]
        return image, label, self.index


def routed_loss(heads: list[nn.Module]):
    """Mean cross-entropy over a mixed batch, each example under its own task's head."""

    def loss_fn(encoder: nn.Module, batch: list[Tensor]) -> Tensor:
        images, labels, tasks = batch
        features = encoder(images)
        total = features.new_zeros((), dtype=torch.float32)
        for index in tasks.unique().tolist():
            rows = tasks == index
            logits = heads[index](features[rows]).float()
            total = total + nn.functional.cross_entropy(logits, labels[rows], reduction="sum")
        return total / len(labels)

    return loss_fn


def budget(bench: Benchmark) -> int:
    """The experts' total optimizer steps: the multi-task model gets exactly as many."""
    return sum(bench.recipe(t).steps(len(bench.dataset(t, "train"))) for t in bench.tasks)


def mtl_key(bench: Benchmark, seed: int) -> dict:
    return {**expert_key(bench, "+".join(bench.tasks), seed), "kind": "mtl"}


def ensure_mtl(home: Path, bench: Benchmark, seed: int, progress: bool = True):
    """(task-vector file, train stats) of the multi-task model, trained once per key."""

    def compute():
        encoder = bench.encoder()
        data = ConcatDataset(
            [Tagged(bench.dataset(t, "train"), i) for i, t in enumerate(bench.tasks)]
        )
        heads = [bench.head(t) for t in bench.tasks]
        spent = train(
            encoder,
            routed_loss(heads),
            data,
            bench.recipe(bench.tasks[0]),
            seed=derive(seed, "mtl"),
            steps=budget(bench),
            desc="multi-task",
            progress=progress,
        )
        meta = {"steps": spent.steps, "examples": spent.examples}
        return task_vector(state_on_cpu(encoder), bench.base_state()), meta

    directory, meta, _ = EntryCache(Path(home) / "mtl").get_or_create(mtl_key(bench, seed), compute)
    return directory / DATA, TrainStats(meta["steps"], meta["examples"])
