"""The vision tasks: where each dataset lives on the Hugging Face hub and how it is tuned.

Dataset ids, configs and splits are those FusionBench loads (its
``config/dataset/image_classification`` files); epochs are the task_vectors / TALL-masks
fine-tuning epochs per dataset (about 2,000 steps at batch 128 for the first eight).
``expert`` is the task's suffix in FusionBench's published experts
(``tanganke/clip-vit-base-patch32_<expert>``).

Known differences from the papers, kept on purpose because these are the hub copies (all
listed in docs/fidelity.md): Food-101 has no test split on the hub (its ``validation``
split is the test set, as in FusionBench); EMNIST is the hub's ``tanganke/emnist_mnist``
(EMNIST's 10-digit "mnist" subset, 60,000 train / 10,000 test) while TALL masks uses
torchvision's EMNIST "digits" split (240,000 / 40,000), and FusionBench's 20-task set uses
EMNIST letters instead, so no published expert matches it (``expert`` is None).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    """One task's data source and fine-tuning length."""

    name: str
    path: str
    """Hugging Face dataset id."""
    epochs: int
    expert: str | None
    """Suffix of FusionBench's published expert; None when none was trained on this data."""
    config: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    image_column: str = "image"
    label_column: str = "label"


_SPECS = (
    TaskSpec("sun397", "tanganke/sun397", 14, "sun397"),
    TaskSpec("cars", "tanganke/stanford_cars", 35, "stanford-cars"),
    TaskSpec("resisc45", "tanganke/resisc45", 15, "resisc45"),
    TaskSpec("eurosat", "tanganke/eurosat", 12, "eurosat"),
    TaskSpec("svhn", "ufldl-stanford/svhn", 4, "svhn", config="cropped_digits"),
    TaskSpec("gtsrb", "tanganke/gtsrb", 11, "gtsrb"),
    TaskSpec("mnist", "ylecun/mnist", 5, "mnist"),
    TaskSpec("dtd", "tanganke/dtd", 76, "dtd"),
    TaskSpec("flowers102", "dpdl-benchmark/oxford_flowers102", 147, "oxford_flowers102"),
    TaskSpec("pcam", "1aurent/PatchCamelyon", 1, "pcam"),
    TaskSpec(
        "fer2013",
        "clip-benchmark/wds_fer2013",
        10,
        "fer2013",
        image_column="jpg",
        label_column="cls",
    ),
    TaskSpec("pets", "timm/oxford-iiit-pet", 82, "oxford-iiit-pet"),
    TaskSpec("stl10", "tanganke/stl10", 60, "stl10"),
    TaskSpec("cifar100", "tanganke/cifar100", 6, "cifar100"),
    TaskSpec("cifar10", "tanganke/cifar10", 6, "cifar10"),
    TaskSpec("food101", "ethz/food101", 4, "food101", test_split="validation"),
    TaskSpec("fashion_mnist", "zalando-datasets/fashion_mnist", 5, "fashion_mnist"),
    TaskSpec("emnist", "tanganke/emnist_mnist", 2, None),
    TaskSpec("kmnist", "tanganke/kmnist", 5, "kmnist"),
    TaskSpec("rendered_sst2", "nateraw/rendered-sst2", 39, "rendered-sst2"),
)

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in _SPECS}

SUITES: dict[str, tuple[str, ...]] = {
    "vision8": tuple(TASKS)[:8],
    "vision14": tuple(TASKS)[:14],
    "vision20": tuple(TASKS)[:20],
    "vision14_tall": tuple(TASKS)[:14],
    "vision20_tall": tuple(TASKS)[:20],
}
NAMING: dict[str, str] = {s: "tall" if s.endswith("_tall") else "fusionbench" for s in SUITES}
"""Which class names the suite's zero-shot heads use (see ``classnames.classnames``): the
``_tall`` suites prompt the 14/20-task extras as TALL masks and TSV do, for comparing with
their tables; the others as FusionBench does. The data are the same."""
