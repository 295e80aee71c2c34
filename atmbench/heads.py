"""Frozen classification heads on normalized image features, the CLIP zero-shot way."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from atmbench.suite import Batch, TaskModel


class CosineHead(nn.Module):
    """logits = scale · cos(feature, class embedding); the class embeddings never train.

    CLIP's zero-shot heads are text embeddings of class names; the offline suite uses
    class prototypes of pretrained features instead. Either way the head is built from
    the pretrained model alone and never sees fine-tuned features.

    Logits are float32 even under autocast: the scale (CLIP's is 100) is applied before
    the argmax, and bf16 logits are spaced 0.125-0.25 apart in the range that matters, so
    close top-2 classes would tie or flip. The papers evaluate in fp32; only the encoder
    runs in bf16 on GPUs.
    """

    def __init__(self, class_embeddings: Tensor, scale: float):
        super().__init__()
        weight = nn.functional.normalize(class_embeddings.float(), dim=-1)
        self.register_buffer("weight", weight)
        self.scale = float(scale)

    def forward(self, features: Tensor) -> Tensor:
        with torch.autocast(features.device.type, enabled=False):
            features = nn.functional.normalize(features.float(), dim=-1)
            return self.scale * features @ self.weight.T


class Classifier(TaskModel):
    """An image task's model: the shared encoder and a frozen head (nothing task-private)."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__(encoder)
        self.head = head.requires_grad_(False)

    def features(self, batch: Batch) -> Tensor:
        return self.backbone(batch[0])

    def logits(self, features: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        return self.head(features).float(), batch[1]


@torch.no_grad()
def class_prototypes(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Per class, the normalized mean of normalized features: a head without training."""
    features = nn.functional.normalize(features.float(), dim=-1)
    protos = torch.zeros(num_classes, features.shape[-1])
    protos.index_add_(0, labels, features)
    return nn.functional.normalize(protos, dim=-1)
