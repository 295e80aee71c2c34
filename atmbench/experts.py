"""The expert cache: each task's expert is fine-tuned once per key and stored as a task vector.

Key: (suite, model, suite fingerprint, task, seed, fine-tune recipe). Every cell of a grid
that needs the same experts reads the same files, memory-mapped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from atmbench.cache import DATA, EntryCache
from atmbench.finetune import TrainStats, finetune, state_on_cpu, task_vector
from atmbench.method import FileTaskVectors
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

    def total(self) -> TrainStats:
        total = TrainStats()
        for stats in self.stats.values():
            total += stats
        return total


def expert_key(bench: Benchmark, task: str, seed: int) -> dict:
    return {
        "suite": bench.suite,
        "model": bench.model,
        "fingerprint": bench.fingerprint,
        "task": task,
        "seed": seed,
        "recipe": bench.recipe(task).as_dict(),
    }


def cached_expert(home: Path, bench: Benchmark, task: str, seed: int) -> bool:
    return EntryCache(Path(home) / "experts").lookup(expert_key(bench, task, seed)) is not None


def ensure_experts(home: Path, bench: Benchmark, seed: int, progress: bool = True) -> Experts:
    """Load every task's expert from the cache, fine-tuning the missing ones."""
    cache = EntryCache(Path(home) / "experts")
    base = bench.base_state()
    files, stats, trained = {}, {}, []
    for task in bench.tasks:

        def compute(task=task):
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
            return task_vector(state_on_cpu(encoder), base), meta

        directory, meta, _ = cache.get_or_create(expert_key(bench, task, seed), compute)
        files[task] = directory / DATA
        stats[task] = TrainStats(meta["steps"], meta["examples"])
    return Experts(files, stats, trained)
