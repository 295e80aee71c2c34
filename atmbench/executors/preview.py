"""``--dry-run``: which cells will run and which experts they will train or reuse."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from atmbench import registry
from atmbench.cache import EntryCache
from atmbench.executors.base import group_key, needs_experts, schedule
from atmbench.experts import cached_expert
from atmbench.runner import Workspace
from atmbench.spec import Cell
from atmbench.store import ResultStore


@dataclass
class ExpertPlan:
    """The experts of one (suite, model, seed) group that the pending cells need."""

    suite: str
    model: str
    seed: int
    train: list[str]
    reuse: list[str]
    source: str | None = None
    """``--experts``: the missing ones are imported from it, not trained."""

    def line(self) -> str:
        train = ", ".join(self.train) or "-"
        reuse = ", ".join(self.reuse) or "-"
        verb = f"import from {self.source}" if self.source else "train"
        return (
            f"experts  {self.model}  seed={self.seed}  "
            f"{verb} {len(self.train)}: {train}  |  reuse {len(self.reuse)}: {reuse}"
        )


def expert_plans(cells: Sequence[Cell], home: Path) -> list[ExpertPlan]:
    """Per group with a pending cell that needs experts: which tasks are cached.

    A suite/model without any cached expert needs no lookup; otherwise the benchmark is
    loaded on the CPU (its backbone is cached by then) to compute the experts' cache keys.
    """
    plans: list[ExpertPlan] = []
    ws: Workspace | None = None
    root = EntryCache(Path(home) / "experts")
    seen: set[tuple[str, str, int]] = set()
    for cell in cells:
        group = group_key(cell)
        if not needs_experts(cell) or group in seen:
            continue
        seen.add(group)
        suite, model, seed = group
        source = cell.identity.get("experts")
        tasks = list(registry.get_suite(suite).tasks)
        if not root.directory({"suite": suite, "model": model}).parent.exists():
            plans.append(ExpertPlan(suite, model, seed, tasks, [], source))
            continue
        ws = ws or Workspace(Path(home), torch.device("cpu"), progress=False)
        bench = ws.benchmark(suite, model)
        cached = {t: cached_expert(home, bench, t, seed, source) for t in bench.tasks}
        plans.append(
            ExpertPlan(
                suite,
                model,
                seed,
                [t for t, hit in cached.items() if not hit],
                [t for t, hit in cached.items() if hit],
                source,
            )
        )
    return plans


def dry_run_lines(cells: Sequence[Cell], store: ResultStore, home: Path, force: bool) -> list[str]:
    """One line per cell in dispatch order (to run / done), then one per group's experts."""
    lines, pending = [], []
    for cell in schedule(cells):
        done = not force and store.done(cell.key)
        if not done:
            pending.append(cell)
        state = "done" if done else "to run"
        lines.append(f"{cell.suite}  {cell.model}  seed={cell.seed}  {cell.method:<24} {state}")
    plans = sorted(expert_plans(pending, home), key=lambda p: (p.suite, p.model, p.seed))
    return lines + [plan.line() for plan in plans]
