"""Accuracy of an encoder under a task's frozen head."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


@torch.no_grad()
def accuracy(
    encoder: nn.Module,
    head: nn.Module,
    dataset: Dataset,
    batch_size: int = 512,
    num_workers: int = 0,
) -> float:
    """Top-1 accuracy in percent, in eval mode, in the dataset's own order.

    ``num_workers`` > 0 decodes images in loader processes: on a GPU, decoding, not the
    model, is what limits evaluation of the vision suites.
    """
    device = next(encoder.parameters()).device
    encoder.eval()
    correct = total = 0
    amp = device.type == "cuda"
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=amp,
    )
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            logits = head(encoder(images))
        correct += (logits.argmax(-1) == labels).sum().item()
        total += len(labels)
    if total == 0:
        raise ValueError("cannot compute accuracy on an empty dataset")
    return 100.0 * correct / total
