"""Scores of a task model on a dataset under the task's metrics."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from atmbench.metrics import Metric
from atmbench.suite import TaskModel


def _joined(parts: list) -> Sequence:
    if parts and isinstance(parts[0], Tensor):
        return torch.cat([p.reshape(-1).cpu() for p in parts])
    return [x for part in parts for x in part]


@torch.no_grad()
def evaluate(
    model: TaskModel,
    dataset: Dataset,
    metrics: Sequence[Metric],
    batch_size: int = 512,
    num_workers: int = 0,
) -> dict[str, float]:
    """metric name -> score in percent, in eval mode, in the dataset's own order.

    ``num_workers`` > 0 decodes images in loader processes: on a GPU, decoding, not the
    model, is what limits evaluation of the vision suites.
    """
    device = next(model.parameters()).device
    model.eval()
    amp = device.type == "cuda"
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=amp,
        collate_fn=getattr(dataset, "collate", None),
    )
    predictions, references = [], []
    for batch in loader:
        batch = [t.to(device) for t in batch]
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
