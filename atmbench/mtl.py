"""Multi-task learning: the strongest data-using reference row.

The backbone is fine-tuned on all tasks' train splits at once — shuffled mixed batches,
each example scored by its own task's part of the model — for as many optimizer steps as the
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
from atmbench.suite import IGNORE, PRIVATE, Benchmark, TaskModel


class Tagged(Dataset):
    """A task's dataset whose items carry the task's index last: (*item, task)."""

    def __init__(self, dataset: Dataset, index: int):
        self.dataset, self.index = dataset, index

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return (*self.dataset[i], self.index)


class MultiTask(nn.Module):
    """Every task's model around one shared backbone: what the multi-task run trains.

    Its parameters are the backbone's once, then each task's private ones.
    """

    def __init__(self, models: list[TaskModel]):
        super().__init__()
        self.models = nn.ModuleList(models)


def routed_loss(module: MultiTask, batch: list[Tensor]) -> Tensor:
    """Mean loss over a mixed batch: the backbone runs once, each task scores its own rows.

    Sums each task's per-position losses and divides by the batch's scored positions, so a
    mixed batch weighs every position alike, as one task's batch does.
    """
    *items, tasks = batch
    models = module.models
    features = models[0].features(items)
    total = features.new_zeros((), dtype=torch.float32)
    positions = 0
    for index in tasks.unique().tolist():
        rows = tasks == index
        model, part = models[index], [t[rows] for t in items]
        logits, labels = model.logits(features[rows], part)
        scored = int((labels != IGNORE).sum())
        if type(model).loss is not TaskModel.loss:  # a task's own loss (STS-B's regression)
            total = total + model.loss(part, features[rows]) * scored
        else:
            total = total + nn.functional.cross_entropy(
                logits.float().flatten(0, -2),
                labels.flatten(),
                ignore_index=IGNORE,
                reduction="sum",
            )
        positions += scored
    return total / max(1, positions)


def budget(bench: Benchmark) -> int:
    """The experts' total optimizer steps: the multi-task model gets exactly as many."""
    return sum(bench.recipe(t).steps(len(bench.dataset(t, "train"))) for t in bench.tasks)


def mtl_key(bench: Benchmark, seed: int) -> dict:
    return {**expert_key(bench, "+".join(bench.tasks), seed), "kind": "mtl"}


def ensure_mtl(home: Path, bench: Benchmark, seed: int, progress: bool = True):
    """(task-vector file, train stats) of the multi-task model, trained once per key."""

    def compute():
        backbone = bench.backbone()
        parts = [bench.dataset(t, "train") for t in bench.tasks]
        data = ConcatDataset([Tagged(d, i) for i, d in enumerate(parts)])
        data.collate = getattr(parts[0], "collate", None)  # e.g. padding token sequences
        module = MultiTask([bench.task_model(t, backbone) for t in bench.tasks])
        spent = train(
            module,
            routed_loss,
            data,
            bench.recipe(bench.tasks[0]),
            seed=derive(seed, "mtl"),
            steps=budget(bench),
            desc="multi-task",
            progress=progress,
        )
        meta = {"steps": spent.steps, "examples": spent.examples}
        vector = task_vector(state_on_cpu(backbone), bench.base_state())
        for task, model in zip(bench.tasks, module.models, strict=True):
            vector.update({f"{PRIVATE}{task}/{k}": v for k, v in model.private_state().items()})
        return vector, meta

    directory, meta, _ = EntryCache(Path(home) / "mtl").get_or_create(mtl_key(bench, seed), compute)
    return directory / DATA, TrainStats(meta["steps"], meta["examples"])


def private_of(tensors: dict[str, Tensor], tasks: tuple[str, ...]) -> dict[str, dict[str, Tensor]]:
    """task -> its private parameters, from a stored multi-task entry."""
    found: dict[str, dict[str, Tensor]] = {t: {} for t in tasks}
    for key, value in tensors.items():
        if key.startswith(PRIVATE):
            task, name = key[len(PRIVATE) :].split("/", 1)
            found[task][name] = value
    return found
