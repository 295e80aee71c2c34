"""The suite contract: what a task suite plugin hands the runner, for every modality.

A :class:`Suite` is the registered, cheap description; ``Suite.load`` builds a
:class:`Benchmark` for one model. Per task, a benchmark says

* how to build the model from a state dict: ``backbone(state)`` holds the **shared**
  parameters — the ones task vectors are taken over and merged, ``base_state()`` is θ0 —
  and ``task_model(task, backbone, private)`` puts the task's own parts around it;
* which parameters are **task-private**: ``TaskModel.private``, trained with the task's
  expert and kept per task, never merged (RoBERTa/GPT-2 classification heads). Frozen
  heads (CLIP zero-shot, digits8 prototypes) are neither: they are buffers of the task
  model that never change;
* the **training loss** (``TaskModel.loss``) that fine-tuning, ``mtl``, ATM and the
  Fisher/RegMean statistics use;
* the task's **metrics** (``metrics(task)``; all are stored, the first is ranked).

The runner, fine-tuning, ATM, ``mtl``, the statistics and the leaderboards see suites
through this contract only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from atmbench.metrics import Metric

SPLITS = ("train", "val", "test")
IGNORE = -100
"""Label of a position that is not scored (prompt tokens, padding), as in ``transformers``."""

Batch = list[Tensor]
"""A collated batch: the tensors of a task's dataset items, batch dimension first."""


class SuiteDataError(RuntimeError):
    """A suite's data or weights are missing; the message says how to get them."""


class TaskModel(nn.Module):
    """One task's model: the shared ``backbone`` and the task's ``private`` modules.

    A forward pass is split in two so that a multi-task batch runs the backbone once:
    ``features(batch)`` depends on the backbone and the inputs only (the same for every
    task), ``logits(features, batch)`` is the task's part. Subclasses implement both and
    ``predict``; ``loss`` is cross-entropy on the logits unless a task says otherwise.
    """

    def __init__(self, backbone: nn.Module, private: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.private = private if private is not None else nn.ModuleDict()

    def features(self, batch: Batch) -> Any:
        """The backbone's output on the batch's inputs, batch dimension first."""
        raise NotImplementedError

    def logits(self, features: Any, batch: Batch) -> tuple[Tensor, Tensor]:
        """(logits [..., classes], labels [...]) of the scored positions; ``IGNORE`` skips one.

        One position per example for classification, one per answer token for language
        models: the loss, the Fisher statistic's sampled labels and the classification
        predictions all read these.
        """
        raise NotImplementedError

    def forward(self, batch: Batch) -> tuple[Tensor, Tensor]:
        return self.logits(self.features(batch), batch)

    def unlabeled_features(self, batch: Batch) -> Any:
        """What ``prediction_logits`` reads, computed from the batch's inputs alone (its
        labels may be blanked): ``features``, unless those feed the answers in (teacher
        forcing). The same for every task, like ``features``."""
        return self.features(batch)

    def prediction_logits(self, features: Any, batch: Batch) -> Tensor:
        """Logits [examples, classes] of the distribution each example's prediction is drawn
        from, without labels: what test-time adaptation (AdaMerging's entropy) reads.

        By default the ``logits`` of a task that scores one position per example; a task
        that scores several (a language model's answer tokens) defines its own.
        """
        logits, _ = self.logits(features, batch)
        if logits.dim() != 2:
            raise ValueError(
                f"{type(self).__name__} scores logits of shape {tuple(logits.shape)}, not one "
                "prediction per example, and defines no prediction_logits"
            )
        return logits

    def loss(self, batch: Batch, features: Any = None) -> Tensor:
        """Mean training loss over the batch's scored positions (``features`` if computed)."""
        logits, labels = self.logits(self.features(batch) if features is None else features, batch)
        return nn.functional.cross_entropy(
            logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE
        )

    @torch.no_grad()
    def predict(self, batch: Batch) -> tuple[Sequence, Sequence]:
        """(predictions, references) of the batch, for the task's metrics: argmax classes."""
        logits, labels = self(batch)
        return logits.argmax(-1), labels

    def private_state(self) -> dict[str, Tensor]:
        """The task-private parameters' values, on the CPU."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.private.state_dict().items()}


@dataclass(frozen=True)
class Recipe:
    """Fine-tuning hyperparameters; its fields are part of an expert's cache key."""

    epochs: float
    lr: float
    batch_size: int
    weight_decay: float = 0.1
    warmup_steps: int = 0
    schedule: str = "cosine"
    """``cosine`` or ``linear`` decay to 0 (after the linear warm-up), or ``constant``."""
    grad_clip: float | None = 1.0
    num_workers: int = 0

    def as_dict(self) -> dict:
        return asdict(self)

    def steps(self, num_examples: int, epochs: float | None = None) -> int:
        per_epoch = math.ceil(num_examples / self.batch_size)
        return max(1, round((self.epochs if epochs is None else epochs) * per_epoch))


class Benchmark(Protocol):
    """One suite loaded for one model on one device."""

    suite: str
    model: str
    tasks: tuple[str, ...]
    fingerprint: str
    """Identity of backbone, data and heads: part of every expert's cache key."""
    num_workers: int
    """Data-loader processes for evaluation (0: in the main process)."""
    device: torch.device

    def base_state(self) -> dict[str, Tensor]:
        """θ0: the pretrained shared parameters (what is merged), on the CPU."""

    def backbone(self, state: dict[str, Tensor] | None = None) -> nn.Module:
        """A fresh shared module on ``device`` holding ``state`` (θ0 when ``None``)."""

    def task_model(
        self, task: str, backbone: nn.Module, private: dict[str, Tensor] | None = None
    ) -> TaskModel:
        """The task's model around ``backbone``; ``private``: its private state (None: initial)."""

    def dataset(self, task: str, split: str) -> Dataset:
        """Items of one split (``train``, ``val`` or ``test``) as tuples of tensors.

        A dataset may carry a ``collate`` attribute (a ``DataLoader`` ``collate_fn``), or a
        ``device_batches(batch_size, device, generator=None, drop_last=False)`` method
        yielding whole batches already on ``device`` (in order, or shuffled and augmented
        from ``generator``): evaluation and training then use it instead of a ``DataLoader``.
        It may carry ``inputs``, the positions in an item of the tensors that hold no part of
        the label (default: all but the last), which are all a method that must not see the
        labels is handed (:func:`atmbench.adapt.unlabeled_test_batches`).
        """

    def recipe(self, task: str) -> Recipe:
        """How an expert for ``task`` is fine-tuned."""

    def metrics(self, task: str) -> tuple[Metric, ...]:
        """The task's metrics; all are stored, the first is the score tables rank."""

    # Optional: ``score(task, split, model) -> float``, the score stored for ``task`` on
    # ``split`` (percent, higher is better), for suites that score with their own tool
    # (lm-evaluation-harness) instead of ``metrics`` on ``dataset``; or a mapping
    # metric -> score, all stored, the first ranked: see :func:`atmbench.evaluate.task_scores`.
    # Optional: ``import_experts(source) -> {task: fine-tuned state dict}`` for suites whose
    # published experts can replace fine-tuning (``--experts SOURCE``); private parameters
    # ride along under ``PRIVATE``-prefixed keys.
    # Optional: ``residual_blocks(backbone) -> Sequence[str]``, the names of ``backbone``'s
    # residual blocks (transformer layers) in the order its forward runs them, for methods
    # that merge block by block (``regmean_pp``): see :func:`residual_blocks`.


PRIVATE = "private:"
"""Prefix of a task's private parameters stored with its task vector."""


def model_for(
    bench: Benchmark,
    task: str,
    state: dict[str, Tensor] | None = None,
    private: dict[str, Tensor] | None = None,
) -> TaskModel:
    """``task_model(task, backbone(state), private)``: the one-liner most callers need."""
    return bench.task_model(task, bench.backbone(state), private)


def residual_blocks(bench: Benchmark, backbone: nn.Module) -> list[str]:
    """The names of ``backbone``'s residual blocks in forward order, as ``bench`` names them.

    A suite only names its blocks; it need not say how to run one. A method that feeds block
    i what the merged model feeds it captures the block's whole call (hidden states and
    whatever else the model passes: position embeddings, attention or causal masks, a
    relative position bias, an encoder's output) with a forward pre-hook on the merged model.
    """
    if not hasattr(bench, "residual_blocks"):
        raise ValueError(
            f"suite {bench.suite!r} does not name its model's residual blocks "
            "(Benchmark.residual_blocks), which block-by-block merging needs"
        )
    names = list(bench.residual_blocks(backbone))
    modules = dict(backbone.named_modules())
    unknown = [n for n in names if n not in modules]
    if not names or unknown:
        raise ValueError(
            f"suite {bench.suite!r} names residual blocks {unknown or names} that its "
            f"{type(backbone).__name__} does not have"
        )
    return names


def blocks_of(backbone: nn.Module, *lists: str) -> list[str]:
    """``PATH.i`` for each module ``i`` of the ``nn.ModuleList`` at each path, in order."""
    modules = dict(backbone.named_modules())
    return [f"{path}.{i}" for path in lists for i in range(len(modules[path]))]


@dataclass(frozen=True)
class Suite:
    """A registered task suite."""

    name: str
    tasks: tuple[str, ...]
    models: tuple[str, ...]
    """Known model names; the first is the default."""
    load: Callable[[str, Path, torch.device], Benchmark]
    """``load(model, home, device)``; ``home`` is where it may cache weights and data."""
    description: str = ""
    version: str = "1"
    """Bump when data, backbone or heads change: part of every cell's identity."""
    any_model: bool = False
    """Accept model names outside ``models`` (e.g. any open_clip ``NAME:TAG``)."""
    download: Callable[[str, Path], list[str]] | None = None
    """``download(model, home)`` fetches weights and data ahead of a run (None: embedded)."""
    metric: str = "accuracy"
    """Name of the score its tasks store and rank (their first metric): leaderboard headings."""

    def check_model(self, model: str) -> str:
        if model in self.models or self.any_model:
            return model
        raise ValueError(
            f"unknown model {model!r} for suite {self.name!r} (valid: {', '.join(self.models)})"
        )
