"""``digits8``: the offline suite, eight tasks from scikit-learn's bundled handwritten digits.

Why it looks like this: it must run anywhere in a couple of minutes yet show what the
field studies on CLIP — a pretrained backbone that is mediocre on every task with
zero-shot heads, experts that are good on their own task, and a merging gap between.

* Data: the 1,797 real 8x8 scans, upsampled to 16x16. A fixed split (seed 0, never the
  cell seed) keeps 40% of the images for pretraining only; the other 60% are the task
  images: 30% of them test, and of the rest 10% validation (the task_vectors protocol)
  and 90% train. Each task applies its own fixed transform and/or relabeling to them.
* Backbone: a tiny open_clip ``VisionTransformer`` pretrained in-process on plain digit
  identity over the pretraining images (fixed random class embeddings as head), cached
  under ATMBENCH_HOME.
* Heads: per task and class, the normalized mean pretrained feature of ``SHOTS`` train
  examples, logits = ``LOGIT_SCALE`` x cosine: the analogue of CLIP's class-name text
  embeddings, built from the pretrained model alone and frozen thereafter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from atmbench.default_plugins.suites.embedded import EmbeddedBenchmark
from atmbench.finetune import Recipe
from atmbench.heads import Classifier, CosineHead, class_prototypes
from atmbench.hookspecs import hookimpl
from atmbench.metrics import ACCURACY, Metric
from atmbench.suite import Suite, blocks_of

if TYPE_CHECKING:
    from open_clip.transformer import VisionTransformer

SUITE = "digits8"
VERSION = "1"
"""Bump when data, transforms, backbone recipe or heads change: it invalidates caches."""
SHOTS = 5
LOGIT_SCALE = 20.0
SPLIT_SEED = 0


@dataclass(frozen=True)
class ModelConfig:
    """A tiny ViT and its recipes. ``vit-micro`` exists for tests: seconds, not minutes."""

    width: int
    layers: int
    heads: int
    pretrain: Recipe
    expert: Recipe
    image_size: int = 16
    patch_size: int = 4
    mlp_ratio: float = 4.0


MODELS = {
    "vit-tiny": ModelConfig(
        width=64,
        layers=4,
        heads=4,
        pretrain=Recipe(epochs=40, lr=2e-3, batch_size=128, warmup_steps=20),
        expert=Recipe(epochs=10, lr=5e-4, batch_size=64, warmup_steps=10),
    ),
    "vit-micro": ModelConfig(
        width=32,
        layers=2,
        heads=2,
        pretrain=Recipe(epochs=10, lr=3e-3, batch_size=128, warmup_steps=5),
        expert=Recipe(epochs=2, lr=1e-3, batch_size=64, warmup_steps=2),
    ),
}


def _patch_shuffle(x: Tensor) -> Tensor:
    """A fixed permutation of the sixteen 4x4 patches."""
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    patches = x.unfold(2, 4, 4).unfold(3, 4, 4).reshape(len(x), 1, 16, 4, 4)[:, :, perm]
    return patches.reshape(len(x), 1, 4, 4, 4, 4).permute(0, 1, 2, 4, 3, 5).reshape(x.shape)


def _noise(x: Tensor) -> Tensor:
    return x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))


Transform = Callable[[Tensor], Tensor]
TASKS: dict[str, tuple[Transform, Callable[[Tensor], Tensor], int]] = {
    # name: (image transform, label map, number of classes)
    "rotate90": (lambda x: torch.rot90(x, 1, (2, 3)), lambda y: y, 10),
    "mirror": (lambda x: torch.flip(x, (3,)), lambda y: y, 10),
    "invert": (lambda x: 1.0 - x, lambda y: y, 10),
    "patch_shuffle": (_patch_shuffle, lambda y: y, 10),
    "parity": (lambda x: x, lambda y: y % 2, 2),
    "mod3": (lambda x: x, lambda y: y % 3, 3),
    "noise": (_noise, lambda y: y, 10),
    "shift": (lambda x: torch.roll(x, (2, 3), (2, 3)), lambda y: y, 10),
}


def _digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    images = nn.functional.interpolate(images, size=16, mode="bilinear", align_corners=False)
    return images, torch.tensor(digits.target, dtype=torch.long)


def _splits(n: int) -> dict[str, Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_pre = int(0.4 * n)
    pretrain, pool = perm[:n_pre], perm[n_pre:]
    n_test = int(0.3 * len(pool))
    test, rest = pool[:n_test], pool[n_test:]
    n_val = int(0.1 * len(rest))
    return {"pretrain": pretrain, "test": test, "val": rest[:n_val], "train": rest[n_val:]}


def _to_input(x: Tensor) -> Tensor:
    """[0, 1]-ish grey images to the 3-channel, centred input a CLIP ViT expects."""
    return (x * 2.0 - 1.0).expand(-1, 3, -1, -1).contiguous()


def _build_encoder(config: ModelConfig) -> VisionTransformer:
    # Imported here: open_clip (and torchvision) take seconds to import, and loading the
    # plugins (every merge, `atmbench list`) must not pay for a backbone it does not build.
    from open_clip.transformer import VisionTransformer

    return VisionTransformer(
        image_size=config.image_size,
        patch_size=config.patch_size,
        width=config.width,
        layers=config.layers,
        heads=config.heads,
        mlp_ratio=config.mlp_ratio,
        output_dim=config.width,
    )


class DigitsBenchmark(EmbeddedBenchmark):
    """digits8 loaded for one tiny model; all data lives in memory."""

    SUITE, VERSION = SUITE, VERSION

    def __init__(self, model: str, home: Path, device: torch.device):
        super().__init__(model, MODELS[model], home, device)
        self.tasks = tuple(TASKS)
        images, labels = _digits()
        index = _splits(len(images))
        for task, (transform, relabel, _) in TASKS.items():
            x, y = _to_input(transform(images)), relabel(labels)
            for split in ("train", "val", "test"):
                self._data[task, split] = TensorDataset(x[index[split]], y[index[split]])
        pre = index["pretrain"]
        self._pretrain_data = TensorDataset(_to_input(images[pre]), labels[pre])
        self._load_base()
        self._heads = {task: self._make_head(task) for task in self.tasks}

    def build(self) -> VisionTransformer:
        return _build_encoder(self.config)

    def pretraining_model(self, backbone: nn.Module) -> Classifier:
        """Plain digit identity against fixed random class embeddings."""
        targets = torch.randn(10, self.config.width, generator=torch.Generator().manual_seed(3))
        return Classifier(backbone, CosineHead(targets, LOGIT_SCALE).to(self.device))

    @torch.no_grad()
    def _make_head(self, task: str) -> CosineHead:
        images, labels = self._data[task, "train"].tensors
        num_classes = TASKS[task][2]
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(4))
        picked = torch.cat([order[labels[order] == c][:SHOTS] for c in range(num_classes)])
        encoder = self.backbone().eval()
        features = encoder(images[picked].to(self.device)).cpu()
        protos = class_prototypes(features, labels[picked], num_classes)
        return CosineHead(protos, LOGIT_SCALE).to(self.device)

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


@hookimpl
def register_suites(register):
    register(
        Suite(
            name=SUITE,
            tasks=tuple(TASKS),
            models=tuple(MODELS),
            load=DigitsBenchmark,
            version=VERSION,
            description="8 tasks from scikit-learn's bundled digits; tiny open_clip ViT; CPU",
        )
    )
