"""Scores of a task model on a dataset under the task's metrics."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from atmbench.finetune import loader_workers
from atmbench.metrics import Metric
from atmbench.suite import Benchmark, TaskModel


def _joined(parts: list) -> Sequence:
    if parts and isinstance(parts[0], Tensor):
        return torch.cat([p.reshape(-1).cpu() for p in parts])
    return [x for part in parts for x in part]


def device_batches(
    dataset: Dataset, batch_size: int, device: torch.device, num_workers: int = 0
) -> Iterator[list[Tensor]]:
    """One in-order pass over ``dataset`` as batches on ``device``.

    A dataset with its own ``device_batches`` (the vision suites' cached images) gathers,
    copies and preprocesses whole batches itself; any other goes through a ``DataLoader``
    whose batches are copied without blocking from pinned memory on CUDA.
    """
    own = getattr(dataset, "device_batches", None)
    if own is not None:
        yield from own(batch_size, device)
        return
    pin = device.type == "cuda"
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=loader_workers(num_workers),
        pin_memory=pin,
        collate_fn=getattr(dataset, "collate", None),
    )
    for batch in loader:
        yield [t.to(device, non_blocking=pin) for t in batch]


@torch.no_grad()
def evaluate(
    model: TaskModel,
    dataset: Dataset,
    metrics: Sequence[Metric],
    batch_size: int = 512,
    num_workers: int = 0,
) -> dict[str, float]:
    """metric name -> score in percent, in eval mode, in the dataset's own order.

    Predictions stay on the device until the end (no per-batch synchronisation); on CUDA
    the model runs under bf16 autocast. ``num_workers`` > 0 loads a plain dataset's items
    in loader processes.
    """
    device = next(model.parameters()).device
    model.eval()
    amp = device.type == "cuda"
    predictions, references = [], []
    for batch in device_batches(dataset, batch_size, device, num_workers):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            predicted, reference = model.predict(batch)
        predictions.append(predicted)
        references.append(reference)
    if not predictions:
        raise ValueError("cannot compute a score on an empty dataset")
    predicted, reference = _joined(predictions), _joined(references)
    return {metric.name: metric(predicted, reference) for metric in metrics}


def score(model: TaskModel, dataset: Dataset, metrics: Sequence[Metric], **kwargs) -> float:
    """The first metric's score: the one the runner stores and the leaderboards rank."""
    return evaluate(model, dataset, metrics[:1], **kwargs)[metrics[0].name]


def task_scores(
    bench: Benchmark, model: TaskModel, task: str, split: str, every: bool = True
) -> dict[str, float]:
    """metric -> score of ``model`` on the task's split, every metric the task declares in
    its order (the first is the one stored as accuracy and ranked; with ``every`` false it
    alone is computed). A suite with its own ``score`` (the LLM suites run
    lm-evaluation-harness on the model) gives the scores instead: a mapping, or one number,
    stored as ``score``."""
    own = getattr(bench, "score", None)
    if own is not None:
        value = own(task, split, model)
        return dict(value) if isinstance(value, Mapping) else {"score": value}
    metrics = bench.metrics(task) if every else bench.metrics(task)[:1]
    workers = getattr(bench, "num_workers", 0)
    return evaluate(model, bench.dataset(task, split), metrics, num_workers=workers)


def task_score(bench: Benchmark, model: TaskModel, task: str, split: str) -> float:
    """The score stored for ``task`` on ``split`` and ranked: the first of :func:`task_scores`."""
    return next(iter(task_scores(bench, model, task, split, every=False).values()))
