"""GLUE on disk: fetched once from the hub (or a local copy), read offline afterwards.

Layout: ``$ATMBENCH_HOME/datasets/glue/<task>/`` is a ``datasets.DatasetDict`` written
with ``save_to_disk`` holding ``train`` and ``test`` (GLUE's validation split) with the
task's text columns and ``label``, plus ``source.json``. Validation is carved from train
with a fixed seed (:func:`validation_split`, the task_vectors protocol the vision suites
use). Items are tokenized when read and padded per batch (:class:`PadCollate`): results
equal FusionBench's padding to 512 tokens, since padding is masked.

``ATMBENCH_GLUE_SOURCE`` may name a local folder in the hub's parquet layout
(``<task>/<split>-*.parquet``, as ``nyu-mll/glue`` stores it) to fetch from instead of
the hub: a mirror for machines without a network, and what the tests build.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from atmbench.default_plugins.suites.glue.tasks import HUB_PATH, TASKS, GlueTask
from atmbench.default_plugins.suites.vision.data import fetch_missing, hub_offline, save_splits
from atmbench.suite import SuiteDataError

SOURCE = "source.json"
SOURCE_ENV = "ATMBENCH_GLUE_SOURCE"


def task_dir(home: Path, task: str) -> Path:
    return Path(home) / "datasets" / "glue" / task


def is_fetched(home: Path, task: str) -> bool:
    return (task_dir(home, task) / SOURCE).exists()


def source() -> str:
    """Where data is fetched from: ``ATMBENCH_GLUE_SOURCE`` or the hub's ``nyu-mll/glue``."""
    return os.environ.get(SOURCE_ENV) or HUB_PATH


def _load_split(origin: str, task: str, split: str, cache_dir: Path) -> Any:
    from datasets import load_dataset

    folder = Path(origin)
    if origin != HUB_PATH and folder.is_dir():
        files = sorted(str(f) for f in (folder / task).glob(f"{split}-*.parquet"))
        if not files:
            raise SuiteDataError(f"{SOURCE_ENV}={origin}: no {task}/{split}-*.parquet files")
        return load_dataset(
            "parquet", data_files={split: files}, split=split, cache_dir=str(cache_dir)
        )
    return load_dataset(origin, task, split=split, cache_dir=str(cache_dir))


def normalise(dataset: Any, spec: GlueTask) -> Any:
    """Keep the task's text columns and ``label``; fail at fetch time on a wrong layout."""
    wanted = [*spec.columns, "label"]
    missing = [c for c in wanted if c not in dataset.column_names]
    if missing:
        raise SuiteDataError(
            f"glue/{spec.name}: columns {missing} not found "
            f"(columns: {', '.join(dataset.column_names)})"
        )
    return dataset.select_columns(wanted)


def fetch(task: str, home: Path) -> Path:
    """Download ``task``'s train and test splits and write the normalised copy atomically."""
    spec, origin = TASKS[task], source()

    def build(cache_dir: Path) -> tuple[dict, dict]:
        pairs = (("train", "train"), ("test", spec.test_split))
        splits = {
            ours: normalise(_load_split(origin, task, theirs, cache_dir), spec)
            for ours, theirs in pairs
        }
        record = {
            "path": origin if origin == HUB_PATH else "local",
            "config": task,
            "splits": {"train": "train", "test": spec.test_split},
        }
        return splits, record

    return save_splits(task_dir(home, task), build)


def read_source(home: Path, task: str) -> dict:
    return json.loads((task_dir(home, task) / SOURCE).read_text())


def load(home: Path, task: str) -> Any:
    from datasets import load_from_disk

    return load_from_disk(str(task_dir(home, task)))


class PadCollate:
    """Stacks items of 1-D token tensors, right-padding each position with its own value.

    ``pads[i]`` pads the i-th tensor of an item (token ids: the pad token, attention
    masks: 0, label tokens: ``IGNORE``); scalars and trailing extras (the task index
    ``mtl`` appends) are stacked as they are.
    """

    def __init__(self, pads: Sequence[int]):
        self.pads = tuple(pads)

    def __call__(self, items: list[tuple]) -> list[Tensor]:
        out = []
        for i, column in enumerate(zip(*items, strict=True)):
            first = column[0]
            if isinstance(first, Tensor) and first.dim() == 1:
                pad = self.pads[i] if i < len(self.pads) else 0
                out.append(
                    torch.nn.utils.rnn.pad_sequence(
                        list(column), batch_first=True, padding_value=pad
                    )
                )
            else:
                out.append(
                    torch.as_tensor(column)
                    if not isinstance(first, Tensor)
                    else torch.stack(column)
                )
        return out


class GlueItems(Dataset):
    """Rows ``indices`` of a split, each encoded by ``encode(row)`` when read."""

    def __init__(
        self,
        rows: Any,
        indices: Tensor | None,
        encode: Callable[[dict], tuple],
        collate: PadCollate,
    ):
        self.rows, self.encode, self.collate = rows, encode, collate
        self.indices = torch.arange(len(rows)) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple:
        return self.encode(self.rows[int(self.indices[i])])


def ensure(suite: str, home: Path, tasks: Sequence[str], command: str) -> None:
    """Fetch missing task data unless offline; otherwise name what is missing and how to get it."""
    missing = [t for t in tasks if not is_fetched(home, t)]
    origin = source()
    offline = hub_offline() and origin == HUB_PATH  # a local mirror needs no network
    failures = fetch_missing(missing, lambda t: fetch(t, home), lambda t: f"{origin}/{t}", offline)
    if failures:
        raise SuiteDataError(
            f"suite {suite}: GLUE data missing from {Path(home) / 'datasets' / 'glue'}: "
            f"{'; '.join(failures)}; fetch it with: {command}"
        )
