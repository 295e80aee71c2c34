"""What the embedded suites (digits8, text8) share: a tiny backbone pretrained in-process
and cached, and every split held in memory.

The pretrained backbone is each suite's θ0, so how it is made and found again must be the
same for both: built under the global seed 0, trained once per (suite, model, version,
model config) with :func:`~atmbench.finetune.finetune` on the suite's pretraining data,
stored under ``home/backbones`` and read back by every later run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from atmbench.cache import EntryCache, load_entry
from atmbench.config import show_progress
from atmbench.finetune import Recipe, finetune, state_on_cpu
from atmbench.suite import TaskModel


class EmbeddedBenchmark:
    """The Benchmark parts digits8 and text8 share.

    A subclass's ``__init__`` fills ``_data`` ((task, split) -> dataset) and
    ``_pretrain_data``, then calls :meth:`_load_base`; it implements ``build`` (a fresh,
    untrained backbone), ``pretraining_model`` (the backbone under the pretraining head or
    task), ``task_model`` and ``metrics``. ``config`` has ``pretrain`` and ``expert``
    recipes.
    """

    SUITE: str
    VERSION: str

    def __init__(self, model: str, config: Any, home: Path, device: torch.device):
        self.suite, self.model, self.device, self._home = self.SUITE, model, device, Path(home)
        self.config = config
        self.num_workers = 0  # in-memory tensors: worker processes would only add overhead
        self.fingerprint = f"{self.SUITE}-v{self.VERSION}-{model}"
        self._data: dict[tuple[str, str], TensorDataset] = {}
        self._pretrain_data: Dataset | None = None

    def build(self) -> nn.Module:
        raise NotImplementedError

    def pretraining_model(self, backbone: nn.Module) -> TaskModel:
        raise NotImplementedError

    def _load_base(self) -> None:
        """θ0 from the backbone cache, pretrained first if this key has none yet."""
        key = {
            "suite": self.SUITE,
            "model": self.model,
            "version": self.VERSION,
            "config": dataclasses.asdict(self.config),
        }
        directory, _, _ = EntryCache(self._home / "backbones").get_or_create(key, self._pretrain)
        self._base = load_entry(directory)

    def _pretrain(self) -> tuple[dict[str, Tensor], dict]:
        torch.manual_seed(0)
        backbone = self.build().to(self.device)
        stats = finetune(
            self.pretraining_model(backbone),
            self._pretrain_data,
            self.config.pretrain,
            seed=0,
            desc=f"pretrain {self.SUITE}/{self.model}",
            progress=show_progress(),
        )
        return state_on_cpu(backbone), {"pretrain_steps": stats.steps}

    def base_state(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self._base.items()}

    def backbone(self, state: dict[str, Tensor] | None = None) -> nn.Module:
        module = self.build()
        module.load_state_dict(self._base if state is None else state)
        return module.to(self.device)

    def dataset(self, task: str, split: str) -> TensorDataset:
        return self._data[task, split]

    def recipe(self, task: str) -> Recipe:
        return self.config.expert
