"""The expert cache: each task's expert is fine-tuned once per key and stored as a task vector.

Key: (suite, model, suite fingerprint, task, seed, fine-tune recipe). Every cell of a grid
that needs the same experts reads the same files, memory-mapped.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from atmbench.cache import DATA, EntryCache, load_entry
from atmbench.finetune import TrainStats, finetune, state_on_cpu, task_vector
from atmbench.method import FileTaskVectors, MergeInputError, combine
from atmbench.seeds import derive
from atmbench.suite import Benchmark


@dataclass
class Experts:
    files: dict[str, Path]
    """task -> safetensors file of its task vector."""
    stats: dict[str, TrainStats]
    trained: list[str]
    """Tasks fine-tuned by this call (the rest came from the cache)."""

    def vectors(self) -> FileTaskVectors:
        return FileTaskVectors(self.files)

    def state(self, task: str, base: dict[str, Tensor]) -> dict[str, Tensor]:
        """The expert's full weights θ_t = θ0 + τ_t."""
        return combine(base, load_entry(self.files[task].parent))

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


def cached_expert(home: Path, bench: Benchmark, task: str, seed: int) -> bool:
    return EntryCache(Path(home) / "experts").lookup(expert_key(bench, task, seed)) is not None


def ensure_experts(
    home: Path, bench: Benchmark, seed: int, progress: bool = True, source: str | None = None
) -> Experts:
    """Load every task's expert from the cache, fine-tuning (or importing) the missing ones.

    ``source`` (``hub:ORG/PREFIX`` or a folder) imports published experts instead of
    fine-tuning; their training compute is unknown to us and recorded as 0 steps.
    """
    cache = EntryCache(Path(home) / "experts")
    base = bench.base_state()
    files, stats, trained = {}, {}, []
    published = _imported(bench, source) if source else None
    for task in bench.tasks:

        def compute(task=task):
            if published is not None:
                imported = task_vector(published()[task], base)
                return finite(imported, task), {"steps": 0, "examples": 0}
            encoder = bench.encoder()
            spent = finetune(
                encoder,
                bench.head(task),
                bench.dataset(task, "train"),
                bench.recipe(task),
                seed=derive(seed, "expert", task),
                desc=f"expert {task}",
                progress=progress,
            )
            trained.append(task)
            meta = {"steps": spent.steps, "examples": spent.examples}
            return finite(task_vector(state_on_cpu(encoder), base), task), meta

        key = expert_key(bench, task, seed, source)
        directory, meta, _ = cache.get_or_create(key, compute)
        files[task] = directory / DATA
        stats[task] = TrainStats(meta["steps"], meta["examples"])
    return Experts(files, stats, trained)
