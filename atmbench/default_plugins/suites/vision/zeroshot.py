"""Zero-shot heads: class-name prompts through CLIP's text tower, the task_vectors way.

Per class: embed every template's prompt, normalize each embedding, average, normalize
again. Logits are ``logit_scale.exp()`` x cosine(image feature, class embedding), which is
what :class:`atmbench.heads.CosineHead` computes. Built once per (model, task) from the
pretrained text tower, cached, and never trained.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from atmbench.cache import EntryCache, load_entry
from atmbench.default_plugins.suites.vision.templates import TEMPLATES
from atmbench.heads import CosineHead


@torch.no_grad()
def class_embeddings(
    encode_text: Callable[[Tensor], Tensor],
    tokenize: Callable[[list[str]], Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    device: torch.device,
    batch_size: int = 512,
) -> Tensor:
    """(classes, dim): per class, the normalized mean of normalized prompt embeddings.

    Prompts go through the text tower in batches across classes (SUN397 x 2 templates is
    794 prompts): one call per class would spend most of its time on call overhead.
    """
    prompts = [t.format(name) for name in classnames for t in templates]
    chunks = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenize(prompts[start : start + batch_size]).to(device)
        chunks.append(nn.functional.normalize(encode_text(tokens).float(), dim=-1).cpu())
    per_prompt = torch.cat(chunks).view(len(classnames), len(templates), -1)
    return nn.functional.normalize(per_prompt.mean(1), dim=-1)


def head_key(model: str, task: str, classnames: Sequence[str], activation: str) -> dict:
    """Cache key: the backbone, the activation it ran with and the exact prompts.

    The activation is part of it because open_clip may build the same ``NAME:TAG`` with
    GELU or QuickGELU (see :func:`~atmbench.default_plugins.suites.vision.backbone.quick_gelu`):
    heads built under the wrong one must not be reused.
    """
    return {
        "suite": "vision-heads",
        "model": model,
        "activation": activation,
        "task": task,
        "classnames": list(classnames),
        "templates": list(TEMPLATES[task]),
    }


def cached_head(home: Path, key: dict, build: Callable[[], tuple[Tensor, float]]) -> CosineHead:
    """The head for ``key`` (:func:`head_key`) from ``$ATMBENCH_HOME/heads``, built if absent."""

    def compute():
        weight, scale = build()
        return {"weight": weight, "scale": torch.tensor(scale)}, {}

    cache = EntryCache(Path(home) / "heads")
    directory, _, _ = cache.get_or_create(key, compute)
    tensors = load_entry(directory)
    return CosineHead(tensors["weight"], float(tensors["scale"]))
