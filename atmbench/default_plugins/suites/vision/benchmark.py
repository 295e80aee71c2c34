"""A vision suite loaded for one open_clip model: θ0, zero-shot heads, datasets, recipes."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from atmbench.cache import key_hash
from atmbench.default_plugins.suites.vision import backbone as bb
from atmbench.default_plugins.suites.vision import batches, data, imagecache
from atmbench.default_plugins.suites.vision.classnames import classnames
from atmbench.default_plugins.suites.vision.tasks import NAMING, SUITES, TASKS
from atmbench.default_plugins.suites.vision.templates import TEMPLATES
from atmbench.default_plugins.suites.vision.zeroshot import (
    cached_head,
    class_embeddings,
    head_key,
)
from atmbench.finetune import Recipe, state_on_cpu
from atmbench.heads import Classifier, CosineHead
from atmbench.metrics import ACCURACY, Metric
from atmbench.suite import SuiteDataError, blocks_of

VERSION = "3"
"""Bump when data handling, heads or recipes change: it invalidates caches.

2: OpenAI weights run with QuickGELU (open_clip >= 2.29 built them with GELU), fp32 logits.
3: images from the decoded-image cache; training crops drawn on the device (``batches``)."""
NUM_WORKERS = 8
"""Threads decoding images into the image cache (loader processes on the per-image fallback)."""
GRAD_CHECKPOINTING_ENV = "ATMBENCH_GRAD_CHECKPOINTING"


def task_vectors_recipe(epochs: float) -> Recipe:
    """task_vectors' fine-tuning: AdamW lr 1e-5, wd 0.1, cosine, 500 warm-up, batch 128, clip 1."""
    return Recipe(
        epochs=epochs,
        lr=1e-5,
        batch_size=128,
        weight_decay=0.1,
        warmup_steps=500,
        schedule="cosine",
        grad_clip=1.0,
        num_workers=NUM_WORKERS,
    )


def _grad_checkpointing(name: str) -> bool:
    """On for ViT-L-14 (fits batch 128 on one GPU); ``ATMBENCH_GRAD_CHECKPOINTING=0/1`` decides."""
    flag = os.environ.get(GRAD_CHECKPOINTING_ENV)
    if flag is None:
        return name in bb.GRAD_CHECKPOINTING
    if flag not in ("0", "1"):
        raise ValueError(f"{GRAD_CHECKPOINTING_ENV}={flag!r} (valid: 0, 1)")
    return flag == "1"


def _resident_budget(device: torch.device) -> int:
    """Bytes of evaluation images kept on ``device`` (none on the CPU)."""
    if device.type != "cuda":
        return 0
    return int(batches.RESIDENT_FRACTION * torch.cuda.get_device_properties(device).total_memory)


def ensure_data(suite: str, model: str, home: Path, tasks: Sequence[str]) -> None:
    """Fetch missing task data unless offline; otherwise say what is missing and how to get it."""
    missing = [t for t in tasks if not data.is_fetched(home, t)]
    failures = data.fetch_missing(
        missing, lambda t: data.fetch(TASKS[t], home), lambda t: TASKS[t].path
    )
    if failures:
        raise SuiteDataError(
            f"suite {suite}: datasets missing from {Path(home) / 'datasets'}: "
            f"{'; '.join(failures)}; fetch them with: {bb.fetch_command(suite, model)}"
        )


class VisionBenchmark:
    """One vision suite for one open_clip model on one device.

    ``tasks`` and ``recipes`` exist for tests and smaller studies: a subset of the suite's
    tasks, and recipes replacing the task_vectors one per task.
    """

    def __init__(
        self,
        model: str,
        home: Path,
        device: torch.device,
        *,
        suite: str,
        tasks: Sequence[str] | None = None,
        recipes: Mapping[str, Recipe] | None = None,
    ):
        self.suite, self.model, self.device, self.home = suite, model, device, Path(home)
        self.naming = NAMING[suite]
        self.num_workers = NUM_WORKERS
        self.model_id = bb.parse_model(model)
        self.tasks = tuple(tasks or SUITES[suite])
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown vision tasks {unknown} (valid: {', '.join(TASKS)})")
        self._recipes = {t: task_vectors_recipe(TASKS[t].epochs) for t in self.tasks}
        self._recipes.update(recipes or {})
        ensure_data(suite, model, self.home, self.tasks)
        backbone = bb.create(self.model_id, self.home, suite)
        self._preprocess = {"train": backbone.preprocess_train, "eval": backbone.preprocess_eval}
        self._plan = batches.plan(backbone.preprocess_eval, backbone.preprocess_train)
        self.resident = batches.Resident(_resident_budget(device))
        self._cached: dict[tuple[str, str], tuple[imagecache.Entry, Tensor]] = {}
        self._datasets: dict[tuple[str, str], Dataset] = {}
        self._visual = backbone.visual()
        self._checkpointing = _grad_checkpointing(self.model_id.name)
        self._base = state_on_cpu(self._visual)
        self.activation = backbone.activation
        self._heads = {t: self._head(backbone, t) for t in self.tasks}
        del backbone  # the text tower is only needed for the heads
        self._rows = {t: data.load(self.home, t) for t in self.tasks}
        self._split = {t: data.validation_split(len(self._rows[t]["train"])) for t in self.tasks}
        sources = {t: data.read_source(self.home, t) for t in self.tasks}
        identity = {"sources": sources, "activation": self.activation, "naming": self.naming}
        self.fingerprint = f"{suite}-v{VERSION}-{self.model_id}-{key_hash(identity)}"

    def _head(self, backbone: bb.Backbone, task: str) -> CosineHead:
        names = classnames(task, self.naming)

        def build() -> tuple[Tensor, float]:
            clip = backbone.model.to(self.device)
            weight = class_embeddings(
                clip.encode_text, backbone.tokenizer, names, TEMPLATES[task], self.device
            )
            clip.cpu()
            return weight, float(clip.logit_scale.detach().exp())

        key = head_key(str(self.model_id), task, names, backbone.activation)
        return cached_head(self.home, key, build).to(self.device)

    def import_experts(self, source: str) -> dict[str, dict[str, Tensor]]:
        """Published fine-tuned image towers (``hub:ORG/PREFIX`` or a folder) per task."""
        from atmbench.default_plugins.suites.vision.experts import load_experts

        return load_experts(
            source, self.tasks, self._base, cache_dir=self.home / "hub", activation=self.activation
        )

    def base_state(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self._base.items()}

    def backbone(self, state: dict[str, Tensor] | None = None) -> nn.Module:
        encoder = copy.deepcopy(self._visual)
        encoder.load_state_dict(self._base if state is None else state)
        if self._checkpointing:
            encoder.set_grad_checkpointing(True)
        return encoder.to(self.device)

    def head(self, task: str) -> nn.Module:
        return self._heads[task]

    def residual_blocks(self, backbone: nn.Module) -> list[str]:
        return blocks_of(backbone, "transformer.resblocks")

    def task_model(
        self, task: str, backbone: nn.Module, private: dict[str, Tensor] | None = None
    ) -> Classifier:
        """The shared image encoder under the task's frozen head; nothing is private."""
        return Classifier(backbone, self._heads[task])

    def metrics(self, task: str) -> tuple[Metric, ...]:
        return (ACCURACY,)

    def _images(self, task: str, source: str) -> tuple[imagecache.Entry, Tensor]:
        """The task's cached ``source`` split (built on first use) and its labels."""
        if (task, source) not in self._cached:
            rows = self._rows[task][source]
            resize = self._plan[0]
            root = self.home / "image-cache"
            entry = imagecache.ensure(root, task, source, rows, resize, self.num_workers)
            self._cached[task, source] = entry, data.labels(rows)
        return self._cached[task, source]

    def dataset(self, task: str, split: str) -> Dataset:
        if split not in ("train", "val", "test"):
            raise ValueError(f"unknown split {split!r} (valid: train, val, test)")
        if (task, split) not in self._datasets:
            self._datasets[task, split] = self._dataset(task, split)
        return self._datasets[task, split]

    def _dataset(self, task: str, split: str) -> Dataset:
        train_idx, val_idx = self._split[task]
        if self._plan is not None:
            _, evaluation, training = self._plan
            entry, labels = self._images(task, "test" if split == "test" else "train")
            if split == "train":
                return batches.CachedImages(entry.array, labels, train_idx, training)
            indices = val_idx if split == "val" else None
            return batches.CachedImages(
                entry.array, labels, indices, evaluation, self.resident, (task, split)
            )
        rows = self._rows[task]
        if split == "train":
            return data.ImageDataset(rows["train"], train_idx, self._preprocess["train"])
        if split == "val":
            return data.ImageDataset(rows["train"], val_idx, self._preprocess["eval"])
        return data.ImageDataset(rows["test"], None, self._preprocess["eval"])

    def recipe(self, task: str) -> Recipe:
        return self._recipes[task]
