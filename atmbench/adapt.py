"""What a method that learns from data on whole models (``MergeMethod.adapt``) is handed.

Most data-using methods need only per-parameter statistics of each expert (Fisher, Gram
matrices: :mod:`atmbench.statistics`). Test-time adaptation needs more: AdaMerging runs the
merged model itself, with its coefficients as the only trainable parameters, on the test
split's inputs. ``adapt`` gets the loaded benchmark and the task vectors, and returns the
state that ``merge`` then reads parameter by parameter (``ctx.state``).

Test inputs come through :func:`unlabeled_test_batches` only: batches whose labels (every
tensor that is not an input: see :func:`without_labels`) have been replaced by ``IGNORE``,
so a method cannot read them by accident.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from atmbench.finetune import TrainStats
from atmbench.method import TaskVectors
from atmbench.seeds import derive
from atmbench.suite import IGNORE, Batch, Benchmark


@dataclass(frozen=True)
class AdaptRequest:
    """What ``adapt`` gets, once per cell and hyperparameter combination."""

    benchmark: Benchmark
    base: Mapping[str, Tensor]
    """θ0, the pretrained shared parameters (on the CPU)."""
    vectors: TaskVectors
    """The experts' task vectors, floating-point parameters only."""
    seed: int
    progress: bool = False
    private: Mapping[str, Mapping[str, Tensor]] = field(default_factory=dict)
    """task -> the expert's task-private parameters (empty for suites without any)."""


@dataclass
class AdaptResult:
    state: Any
    """What ``merge`` reads as ``ctx.state``."""
    stats: TrainStats = field(default_factory=TrainStats)
    """Compute spent (forward and backward passes), counted in the row's compute column."""


def without_labels(batch: Batch, inputs: Sequence[int] | None = None) -> Batch:
    """The batch with every tensor but its ``inputs`` (positions) replaced by ``IGNORE``
    everywhere; by default all but the last (the datasets' convention: an item is
    ``(inputs..., labels)``). A language model's items carry the answer in more than one
    tensor, so their datasets say which hold none (``inputs``, e.g.
    :data:`atmbench.generative.INPUTS`)."""
    keep = range(len(batch) - 1) if inputs is None else inputs
    return [t if i in keep else torch.full_like(t, IGNORE) for i, t in enumerate(batch)]


def unlabeled_test_batches(
    bench: Benchmark, task: str, seed: int, batch_size: int
) -> Iterator[Batch]:
    """Endless shuffled batches of ``task``'s test inputs, labels blanked, on the device.

    As FusionBench's infinite loader: each pass over the split is a fresh permutation (from
    a generator seeded by (seed, task)), cut into batches of ``batch_size`` whose last may
    be short.
    """
    dataset = bench.dataset(task, "test")
    if len(dataset) == 0:
        raise ValueError(f"task {task!r} of suite {bench.suite!r} has no test inputs to adapt on")
    inputs = getattr(dataset, "inputs", None)
    collate = getattr(dataset, "collate", None) or torch.utils.data.default_collate
    generator = torch.Generator().manual_seed(derive(seed, "test-time adaptation", task))
    while True:
        order = torch.randperm(len(dataset), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            batch = collate([dataset[i] for i in order[start : start + batch_size]])
            yield [t.to(bench.device) for t in without_labels(list(batch), inputs)]
