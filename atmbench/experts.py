"""The expert cache: each task's expert is fine-tuned once per key and stored as a task vector.

Key: (suite, model, suite fingerprint, task, seed, fine-tune recipe). Every cell of a grid
that needs the same experts reads the same files, memory-mapped.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from torch import Tensor

from atmbench.cache import DATA, EntryCache, load_entry
from atmbench.finetune import TrainStats, finetune, state_on_cpu, task_vector
from atmbench.method import FileTaskVectors, MergeInputError, combine
from atmbench.seeds import derive
from atmbench.suite import PRIVATE, Benchmark, model_for


class SharedTaskVectors(FileTaskVectors):
    """The task vectors of the shared parameters: private ones are stored alongside, unmerged."""

    def keys(self, task: str) -> Iterable[str]:
        return [k for k in super().keys(task) if not k.startswith(PRIVATE)]


@dataclass
class Experts:
    files: dict[str, Path]
    """task -> safetensors file of its task vector."""
    stats: dict[str, TrainStats]
    trained: list[str]
    """Tasks fine-tuned by this call (the rest came from the cache)."""

    def vectors(self) -> FileTaskVectors:
        return SharedTaskVectors(self.files)

    def state(self, task: str, base: dict[str, Tensor]) -> dict[str, Tensor]:
        """The expert's shared weights θ_t = θ0 + τ_t."""
        return combine(base, load_entry(self.files[task].parent))

    def private(self) -> dict[str, dict[str, Tensor]]:
        """task -> the expert's private parameters (empty when the suite has none).

        Reads only those tensors: the shared ones may be a model's worth per task.
        """
        found = {}
        for task, path in self.files.items():
            with safe_open(str(path), framework="pt") as f:
                keys = [k for k in f.keys() if k.startswith(PRIVATE)]
                found[task] = {k[len(PRIVATE) :]: f.get_tensor(k) for k in keys}
        return found

    def total(self) -> TrainStats:
        total = TrainStats()
        for stats in self.stats.values():
            total += stats
        return total


def finite(vector: dict[str, Tensor], task: str) -> dict[str, Tensor]:
    """Refuse to cache an expert with NaN/inf weights (a diverged run, a broken checkpoint)."""
    bad = [k for k, v in vector.items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise MergeInputError(f"expert for task {task!r} has NaN or inf weights in {bad[:3]}")
    return vector


def split_private(tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(shared, private) parts of a stored or imported expert; private keys lose ``PRIVATE``."""
    shared = {k: v for k, v in tensors.items() if not k.startswith(PRIVATE)}
    private = {k[len(PRIVATE) :]: v for k, v in tensors.items() if k.startswith(PRIVATE)}
    return shared, private


def with_private(vector: dict[str, Tensor], private: dict[str, Tensor]) -> dict[str, Tensor]:
    return {**vector, **{PRIVATE + k: v for k, v in private.items()}}


def expert_key(bench: Benchmark, task: str, seed: int, source: str | None = None) -> dict:
    """Imported experts are keyed by their source instead of our fine-tuning recipe."""
    return {
        "suite": bench.suite,
        "model": bench.model,
        "fingerprint": bench.fingerprint,
        "task": task,
        "seed": seed,
        "recipe": {"imported": source} if source else bench.recipe(task).as_dict(),
    }


def _imported(bench: Benchmark, source: str) -> Callable[[], dict[str, dict[str, Tensor]]]:
    """Load the published experts once, on first need, for every task at a time."""
    if not hasattr(bench, "import_experts"):
        raise ValueError(
            f"suite {bench.suite!r} cannot import experts from {source!r} "
            "(it fine-tunes its own; drop --experts)"
        )
    return functools.cache(lambda: bench.import_experts(source))


def cached_expert(
    home: Path, bench: Benchmark, task: str, seed: int, source: str | None = None
) -> bool:
    """Whether the task's expert (fine-tuned, or imported from ``source``) is cached."""
    key = expert_key(bench, task, seed, source)
    return EntryCache(Path(home) / "experts").lookup(key) is not None


def ensure_expert(
    home: Path, bench: Benchmark, task: str, seed: int, progress: bool = True
) -> tuple[Path, dict, bool]:
    """(entry directory, meta, whether this call fine-tuned it) of one task's expert.

    The unit a parallel executor hands out as a job: each task's expert is keyed, locked
    and seeded on its own, so experts trained apart equal experts trained in one loop.
    """

    def compute():
        model = model_for(bench, task)
        spent = finetune(
            model,
            bench.dataset(task, "train"),
            bench.recipe(task),
            seed=derive(seed, "expert", task),
            desc=f"expert {task}",
            progress=progress,
        )
        meta = {"steps": spent.steps, "examples": spent.examples}
        vector = task_vector(state_on_cpu(model.backbone), bench.base_state())
        return finite(with_private(vector, model.private_state()), task), meta

    return EntryCache(Path(home) / "experts").get_or_create(expert_key(bench, task, seed), compute)


def ensure_experts(
    home: Path, bench: Benchmark, seed: int, progress: bool = True, source: str | None = None
) -> Experts:
    """Load every task's expert from the cache, fine-tuning (or importing) the missing ones.

    ``source`` (``hub:ORG/PREFIX`` or a folder) imports published experts instead of
    fine-tuning; their training compute is unknown to us and recorded as 0 steps.
    """
    cache = EntryCache(Path(home) / "experts")
    files, stats, trained = {}, {}, []
    published = _imported(bench, source) if source else None
    base = functools.cache(bench.base_state)
    for task in bench.tasks:
        if published is None:
            directory, meta, created = ensure_expert(home, bench, task, seed, progress)
            if created:
                trained.append(task)
        else:

            def compute(task=task):
                shared, private = split_private(published()[task])
                imported = with_private(task_vector(shared, base()), private)
                return finite(imported, task), {"steps": 0, "examples": 0}

            key = expert_key(bench, task, seed, source)
            directory, meta, _ = cache.get_or_create(key, compute)
        files[task] = directory / DATA
        stats[task] = TrainStats(meta["steps"], meta["examples"])
    return Experts(files, stats, trained)
