"""Task datasets on disk: fetched once from the Hugging Face hub, read offline afterwards.

Layout: ``$ATMBENCH_HOME/datasets/<task>/`` is a ``datasets.DatasetDict`` written with
``save_to_disk`` holding ``train`` and ``test`` with exactly two columns, ``image``
(``Image``) and ``label`` (``ClassLabel`` whose names are the suite's class names), plus
``source.json`` (where it came from). Normalising columns at fetch time keeps the run-time
reader one small function, and ``load_from_disk`` needs no network or hub cache.

``datasets`` is imported inside the functions: ``atmbench run`` on digits8 never loads it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from atmbench.default_plugins.suites.vision.classnames import CLASSNAMES
from atmbench.default_plugins.suites.vision.tasks import TaskSpec
from atmbench.suite import SuiteDataError

SOURCE = "source.json"
VAL_FRACTION, MAX_VAL, VAL_SEED = 0.1, 5000, 0
"""task_vectors' validation protocol: 10% of train, at most 5,000 examples, seed 0."""


def task_dir(home: Path, task: str) -> Path:
    return Path(home) / "datasets" / task


def is_fetched(home: Path, task: str) -> bool:
    return (task_dir(home, task) / SOURCE).exists()


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def validation_split(n: int) -> tuple[Tensor, Tensor]:
    """(train indices, validation indices) exactly as ``torch.utils.data.random_split``.

    task_vectors splits ``[n - v, v]`` with ``Generator().manual_seed(0)``, v = min(⌊0.1 n⌋,
    5000): the first n - v entries of one seeded permutation train, the rest validate.
    """
    val = min(int(n * VAL_FRACTION), MAX_VAL)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(VAL_SEED))
    return perm[: n - val], perm[n - val :]


def normalise(dataset: Any, spec: TaskSpec) -> Any:
    """Keep the image and label columns as ``image`` / ``ClassLabel`` ``label``.

    Boolean labels (PatchCamelyon) become 0/1; a label outside the class names fails here,
    at fetch time, rather than as a wrong accuracy later.
    """
    from datasets import ClassLabel, Image

    names = list(CLASSNAMES[spec.name])
    missing = [c for c in (spec.image_column, spec.label_column) if c not in dataset.column_names]
    if missing:
        raise SuiteDataError(
            f"{spec.path}: columns {missing} not found (columns: {', '.join(dataset.column_names)})"
        )
    dataset = dataset.select_columns([spec.image_column, spec.label_column])
    dataset = dataset.rename_columns({spec.image_column: "image", spec.label_column: "label"})
    label = dataset.features["label"]
    if isinstance(label, ClassLabel):
        if label.num_classes != len(names):
            raise SuiteDataError(
                f"{spec.path}: {label.num_classes} classes on the hub, {len(names)} class names"
            )
        dataset = dataset.cast_column("label", ClassLabel(names=names))
    else:
        dataset = dataset.map(lambda b: {"label": [int(x) for x in b["label"]]}, batched=True)
        dataset = dataset.cast_column("label", ClassLabel(names=names))
    if not isinstance(dataset.features["image"], Image):
        raise SuiteDataError(f"{spec.path}: column {spec.image_column!r} holds no images")
    return dataset


def fetch(spec: TaskSpec, home: Path) -> Path:
    """Download ``spec``'s train and test splits and write the normalised copy atomically."""
    from datasets import load_dataset

    def build(cache_dir: Path) -> tuple[dict, dict]:
        splits = {}
        for ours, theirs in (("train", spec.train_split), ("test", spec.test_split)):
            raw = load_dataset(spec.path, spec.config, split=theirs, cache_dir=str(cache_dir))
            splits[ours] = normalise(raw, spec)
        source = {
            "path": spec.path,
            "config": spec.config,
            "splits": {"train": spec.train_split, "test": spec.test_split},
        }
        return splits, source

    return save_splits(task_dir(home, spec.name), build)


def save_splits(final: Path, build: Callable[[Path], tuple[dict, dict]]) -> Path:
    """Write ``build(cache_dir)``'s splits and ``source.json`` to ``final`` atomically.

    The hub's own cache goes to a temporary folder beside ``final`` and is removed after,
    so the data is stored once; a failed fetch leaves nothing behind.
    """
    from datasets import DatasetDict

    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        splits, source = build(scratch / "hub-cache")
        DatasetDict(splits).save_to_disk(str(scratch / "data"))
        source["rows"] = {k: len(v) for k, v in splits.items()}
        (scratch / "data" / SOURCE).write_text(json.dumps(source, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(scratch / "data", final)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final


def fetch_missing(
    tasks: Sequence[str],
    fetch_one: Callable[[str], object],
    origin: Callable[[str], str],
    offline: bool | None = None,
) -> list[str]:
    """Fetch each task unless offline (default: HF_HUB_OFFLINE); the ones that failed.

    Each failure names the task, where it comes from and why. A :class:`SuiteDataError`
    (data that arrived in the wrong shape) is raised as it is.
    """
    failures = []
    for task in tasks:
        if hub_offline() if offline is None else offline:
            failures.append(f"{task} ({origin(task)})")
            continue
        try:
            fetch_one(task)
        except SuiteDataError:
            raise
        except Exception as exc:  # noqa: BLE001 - network, auth, hub errors: all say "fetch it"
            failures.append(f"{task} ({origin(task)}: {type(exc).__name__}: {exc})")
    return failures


def read_source(home: Path, task: str) -> dict:
    return json.loads((task_dir(home, task) / SOURCE).read_text())


def load(home: Path, task: str) -> Any:
    """The task's ``DatasetDict`` (train, test) from disk, memory-mapped."""
    from datasets import load_from_disk

    return load_from_disk(str(task_dir(home, task)))


class ImageDataset(Dataset):
    """(preprocessed image, label) pairs over rows ``indices`` of a hub dataset."""

    def __init__(self, rows: Any, indices: Tensor | None, transform: Callable):
        self.rows, self.transform = rows, transform
        self.indices = torch.arange(len(rows)) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        row = self.rows[int(self.indices[i])]
        return self.transform(row["image"].convert("RGB")), int(row["label"])


def labels(rows: Any) -> Tensor:
    """The ``label`` column as an int64 tensor, read from Arrow without decoding any image."""
    column = rows.with_format("numpy", columns=["label"])["label"]
    return torch.as_tensor(np.asarray(column), dtype=torch.int64)
