"""The suite contract: what a task suite plugin hands the runner.

A :class:`Suite` is the registered, cheap description; ``Suite.load`` builds a
:class:`Benchmark` for one model (pretrained backbone, frozen heads, datasets,
fine-tuning recipe), which is what the runner, the fine-tuner and ATM work with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from atmbench.finetune import Recipe

SPLITS = ("train", "val", "test")


class SuiteDataError(RuntimeError):
    """A suite's data or weights are missing; the message says how to get them."""


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
        """θ0: the pretrained image encoder's state dict, on the CPU."""

    def encoder(self, state: dict[str, Tensor] | None = None) -> nn.Module:
        """A fresh image encoder on ``device`` holding ``state`` (θ0 when ``None``)."""

    def head(self, task: str) -> nn.Module:
        """The task's frozen classification head on ``device``."""

    def dataset(self, task: str, split: str) -> Dataset:
        """(image, label) pairs of one split: ``train``, ``val`` or ``test``."""

    def recipe(self, task: str) -> Recipe:
        """How an expert for ``task`` is fine-tuned."""

    # Optional: ``import_experts(source) -> {task: fine-tuned encoder state dict}`` for
    # suites whose published experts can replace fine-tuning (``--experts SOURCE``).


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

    def check_model(self, model: str) -> str:
        if model in self.models or self.any_model:
            return model
        raise ValueError(
            f"unknown model {model!r} for suite {self.name!r} (valid: {', '.join(self.models)})"
        )
