"""``vision8``, ``vision14``, ``vision20``: the standard CLIP merging benchmarks.

open_clip backbones (ViT-B-32 / ViT-B-16 / ViT-L-14 with OpenAI weights by default, any
``NAME:TAG`` accepted), datasets from the Hugging Face hub, zero-shot heads from class
names and the task_vectors templates, the task_vectors fine-tuning recipe. Only the image
tower is fine-tuned and merged. ``datasets``, ``transformers`` and ``huggingface_hub``
(the ``vision`` extra) are imported only when a vision suite is used.
"""

from __future__ import annotations

import functools

from atmbench.hookspecs import hookimpl
from atmbench.suite import Suite

from .backbone import DEFAULT_TAGS
from .benchmark import VERSION, VisionBenchmark
from .download import download
from .tasks import SUITES

DESCRIPTIONS = {
    "vision8": "SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST, DTD; open_clip; HF hub",
    "vision14": "vision8 + Flowers102, PCAM, FER2013, Pets, STL10, CIFAR-100 (TALL masks)",
    "vision20": "vision14 + CIFAR-10, Food-101, Fashion-MNIST, EMNIST, KMNIST, Rendered SST-2",
    "vision14_tall": "vision14 with TALL masks / TSV class names (compare with their tables)",
    "vision20_tall": "vision20 with TALL masks / TSV class names (compare with their tables)",
}


def suite(name: str) -> Suite:
    return Suite(
        name=name,
        tasks=SUITES[name],
        models=tuple(DEFAULT_TAGS),
        load=functools.partial(VisionBenchmark, suite=name),
        description=DESCRIPTIONS[name],
        version=VERSION,
        any_model=True,
        download=functools.partial(download, name),
    )


@hookimpl
def register_suites(register):
    for name in SUITES:
        register(suite(name))
