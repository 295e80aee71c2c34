"""Plan a grid of cells and execute them: experts from the cache, merge, refine, evaluate.

Each cell is independent given the expert cache, so executors
(:mod:`atmbench.executors`, which import this module and never the other way round) can
hand cells to other processes; results go to the :class:`~atmbench.store.ResultStore` one
cell at a time.
"""

from __future__ import annotations

import dataclasses
import os
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Any

import torch
from torch import Tensor

from atmbench import hparams as hp
from atmbench import registry, statistics
from atmbench.adapt import AdaptRequest
from atmbench.cache import key_hash, load_entry
from atmbench.evaluate import task_scores
from atmbench.experts import Experts, ensure_expert, ensure_experts
from atmbench.finetune import TrainStats
from atmbench.method import DATA_ACCESS, FloatingOnly, MergeMethod, combine
from atmbench.mtl import ensure_mtl, private_of
from atmbench.provenance import device_name, git_commit, peak_memory_mb, versions
from atmbench.refiner import TRACE, Refiner, RefineRequest, RefineResult
from atmbench.spec import REFERENCES, Cell, MethodSpec, describe, describe_refiner, parse_spec
from atmbench.store import CellRecord
from atmbench.streaming import merged_task_vector, merged_with_state, task_vector
from atmbench.suite import Benchmark

Private = Mapping[str, Mapping[str, Tensor]]
"""task -> its private parameters; a task missing starts from its initial ones."""


def plan(
    suite: str,
    model: str | None,
    specs: Sequence[str],
    seeds: Sequence[int],
    experts: str | None = None,
) -> list[Cell]:
    """The grid: reference cells then method cells, per seed. Validates every name first.

    ``experts`` names published experts to import instead of fine-tuning; it becomes part
    of the identity of every cell that uses experts.
    """
    suite_obj = registry.get_suite(suite)
    model = suite_obj.check_model(model or suite_obj.models[0])
    methods, refiners = registry.methods(), registry.refiners()
    parsed = [parse_spec(s, methods, refiners) for s in specs if s not in REFERENCES]
    for spec in parsed:
        if spec.method and spec.refiners and methods[spec.method.name].per_task:
            raise ValueError(
                f"method {spec.method.name!r} keeps one model per task (it needs the task id), "
                f"so no refiner can follow it: run {spec.method.name!r} without "
                f"'+{spec.refiners[0].name}'"
            )
    cells = []
    for seed in seeds:
        base = {"suite_version": suite_obj.version}
        imported = dict(base, experts=experts) if experts else base
        cells += [
            Cell(suite, model, r, seed, imported if r == "experts" else base) for r in REFERENCES
        ]
        for spec in parsed:
            uses_experts = spec.method is not None
            identity = dict(
                imported if uses_experts else base, **_spec_identity(spec, methods, refiners)
            )
            cells.append(Cell(suite, model, spec, seed, identity))
    return list({c.key: c for c in cells}.values())


def _spec_identity(spec: MethodSpec, methods, refiners) -> dict[str, Any]:
    identity: dict[str, Any] = {}
    if spec.method:
        method = methods[spec.method.name]
        identity["merge"] = {
            "name": method.name,
            "version": method.version,
            "hparams": describe(method.all_hparams(), spec.method.fixed),
        }
    identity["refiners"] = [
        {
            "name": part.name,
            "version": refiners[part.name].version,
            "hparams": describe_refiner(refiners[part.name].hparams, part.fixed),
        }
        for part in spec.refiners
    ]
    return identity


@dataclass
class Workspace:
    """Benchmarks and experts loaded once per process and shared by its cells."""

    home: Path
    device: torch.device
    progress: bool = True
    trace: tuple[str, ...] = TRACE
    """Splits refiners trace per iteration (``--trace``)."""
    _benchmarks: dict = field(default_factory=dict)
    _experts: dict = field(default_factory=dict)
    _statistics: dict = field(default_factory=dict)

    def benchmark(self, suite: str, model: str) -> Benchmark:
        if (suite, model) not in self._benchmarks:
            loader = registry.get_suite(suite).load
            self._benchmarks[suite, model] = loader(model, self.home, self.device)
        return self._benchmarks[suite, model]

    def experts(self, bench: Benchmark, seed: int, source: str | None = None) -> Experts:
        key = (bench.suite, bench.model, seed, source)
        if key not in self._experts:
            self._experts[key] = ensure_experts(self.home, bench, seed, self.progress, source)
        return self._experts[key]

    def statistics(
        self, bench: Benchmark, seed: int, names: Sequence[str], source: str | None = None
    ) -> dict[str, dict[str, Tensor]]:
        """name -> parameter -> statistic stacked over tasks, each from the task's expert."""
        experts, base = self.experts(bench, seed, source), bench.base_state()
        for name in names:
            key = (bench.suite, bench.model, seed, source, name)
            if key in self._statistics:
                continue
            per_task = []
            private = experts.private()
            for task in bench.tasks:
                backbone = bench.backbone(experts.state(task, base))
                model = bench.task_model(task, backbone, private[task] or None)
                per_task.append(statistics.compute(name, bench, model, task, seed))
            self._statistics[key] = {k: torch.stack([s[k] for s in per_task]) for k in per_task[0]}
        return {
            name: self._statistics[bench.suite, bench.model, seed, source, name] for name in names
        }


@dataclass
class TaskStates:
    """One model per task (a per-task method: EMR, TALL masks): task -> its state dict,
    built when the task is evaluated, so one model is in memory at a time."""

    build: Callable[[str], dict[str, Tensor]]

    def __call__(self, task: str) -> dict[str, Tensor]:
        return self.build(task)


State = Mapping[str, Tensor] | TaskStates
"""A merged model, or one per task."""


Scores = dict[tuple[str, str], dict[str, float]]
"""(task, split) -> metric -> score in percent, in the order the task declares its metrics."""


def _scores(
    bench: Benchmark,
    state: State,
    splits: Iterable[str],
    tasks: Iterable[str],
    private: Private | None = None,
    every: bool = False,
) -> Scores:
    """(task, split) -> the task's first metric (``every``: all its metrics, from the same
    predictions), with one backbone built for all tasks (one per task for :class:`TaskStates`)."""
    shared = None if isinstance(state, TaskStates) else bench.backbone(dict(state))
    private = private or {}
    out = {}
    for t in tasks:
        backbone = shared if shared is not None else bench.backbone(state(t))
        model = bench.task_model(t, backbone, dict(private[t]) if private.get(t) else None)
        for s in splits:
            out[t, s] = task_scores(bench, model, t, s, every)
    return {(t, s): out[t, s] for s in splits for t in tasks}


def first(scores: Scores) -> dict[tuple[str, str], float]:
    """(task, split) -> the first metric's score: the one stored as accuracy and ranked."""
    return {key: next(iter(values.values())) for key, values in scores.items()}


def evaluate_state(
    bench: Benchmark,
    state: State,
    split: str,
    tasks: Iterable[str] | None = None,
    private: Private | None = None,
) -> dict[str, float]:
    """task -> first-metric score of ``state`` on one split (what selection compares)."""
    scores = first(_scores(bench, state, (split,), tuple(tasks or bench.tasks), private))
    return {t: a for (t, _), a in scores.items()}


def evaluate_splits(
    bench: Benchmark,
    state: State,
    tasks: Iterable[str] | None = None,
    private: Private | None = None,
) -> Scores:
    """(task, split) -> every metric on validation and test, with one backbone built."""
    return _scores(bench, state, ("val", "test"), tuple(tasks or bench.tasks), private, True)


@dataclass
class Outcome:
    """What executing a cell produced, before it becomes a stored record."""

    scores: Scores
    hparams: dict[str, Any]
    data_access: str
    stats: TrainStats
    trace: list | None = None
    merge_time_s: float | None = None
    task_storage_bytes: int | None = None
    """Extra storage per task of a per-task method's modulators (None: one model)."""


def _max_access(*levels: str | None) -> str:
    return max((lv for lv in levels if lv), key=DATA_ACCESS.index, default="none")


def _references(cell: Cell, bench: Benchmark, ws: Workspace) -> Outcome:
    base = bench.base_state()
    if cell.spec == "pretrained":
        return Outcome(evaluate_splits(bench, base), {}, "none", TrainStats())
    if cell.spec == "mtl":
        path, spent = ensure_mtl(ws.home, bench, cell.seed, ws.progress)
        stored = load_entry(path.parent)
        private = private_of(stored, bench.tasks)
        return Outcome(
            evaluate_splits(bench, combine(base, stored), private=private), {}, "train", spent
        )
    experts = ws.experts(bench, cell.seed, cell.identity.get("experts"))
    private = experts.private()
    accs = {}
    for task in bench.tasks:
        accs.update(evaluate_splits(bench, experts.state(task, base), [task], private))
    return Outcome(accs, {}, "train", experts.total())


def select_on_validation(
    bench: Benchmark,
    method: MergeMethod,
    fixed: Mapping[str, Any],
    base: Mapping[str, Tensor],
    vectors,
    seed: int,
    stats: Mapping[str, Mapping[str, Tensor]] | None = None,
    private: Private | None = None,
    progress: bool = False,
    spent: TrainStats | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any], bool, float]:
    """Merge with every candidate of the search space; keep the best mean validation score.

    The scale coefficient is swept on one merged task vector per other-hyperparameter
    combination. A method that learns from data (``adapt``) learns once per combination,
    counting its compute into ``spent`` and its time as merging time. Returns (state,
    chosen hyperparameters, whether anything was searched, seconds spent merging).
    """
    scale = method.scale
    if scale is None:
        scales = [1.0]
    elif scale.name in fixed:
        scales = [fixed[scale.name]]
    else:
        scales = list(scale.search or (scale.default,))
    combos = hp.grid(method.hparams, fixed)
    searched = len(combos) * len(scales) > 1
    if method.per_task:
        return _select_per_task(bench, method, combos, scales, base, vectors, seed, stats, private)
    best: tuple[float, dict, dict] | None = None
    merge_time = 0.0
    for combo in combos:
        started = time.perf_counter()
        learned = None
        if method.adapt is not None:
            request = AdaptRequest(bench, base, FloatingOnly(vectors, base), seed, progress)
            result = method.adapt(dataclasses.replace(request, private=private or {}), **combo)
            learned = result.state
            if spent is not None:
                spent += result.stats
        delta = merged_task_vector(method, base, vectors, combo, seed, stats, learned)
        merge_time += time.perf_counter() - started
        for value in scales:
            state = combine(base, delta, value, consume=not searched)
            chosen = dict(combo, **({scale.name: value} if scale else {}))
            if not searched:
                return state, chosen, False, merge_time
            mean = fmean(evaluate_state(bench, state, "val", private=private).values())
            if best is None or mean > best[0]:
                best = (mean, state, chosen)
    assert best is not None
    return best[1], best[2], True, merge_time


def _select_per_task(
    bench: Benchmark,
    method: MergeMethod,
    combos: list[dict[str, Any]],
    scales: list[float],
    base: Mapping[str, Tensor],
    vectors,
    seed: int,
    stats: Mapping[str, Mapping[str, Tensor]] | None,
    private: Private | None,
) -> tuple[TaskStates, dict[str, Any], bool, float]:
    """:func:`select_on_validation` for a per-task method: task t's model depends on t's
    hyperparameters only, so each task keeps the candidate best on *its own* validation
    split (TALL masks' protocol; the first of equals). A hyperparameter chosen differently
    across tasks is stored per task, as ``NAME.TASK``."""
    scale = method.scale
    candidates = []  # (hyperparameters, task -> state builder)
    merge_time = 0.0
    for combo in combos:
        started = time.perf_counter()
        shared, state = merged_with_state(method, base, vectors, combo, seed, stats)
        merge_time += time.perf_counter() - started
        for value in scales:

            def build(task, combo=combo, shared=shared, state=state, value=value):
                own = task_vector(method, base, vectors, shared, combo, state, task, seed)
                return combine(base, own, value, consume=True)

            candidates.append((dict(combo, **({scale.name: value} if scale else {})), build))
    if len(candidates) == 1:
        chosen, build = candidates[0]
        return TaskStates(build), chosen, False, merge_time
    best: dict[str, tuple[float, int]] = {}
    for index, (_, build) in enumerate(candidates):
        scores = evaluate_state(bench, TaskStates(build), "val", private=private)
        for task, accuracy in scores.items():
            if task not in best or accuracy > best[task][0]:
                best[task] = (accuracy, index)
    pick = {task: best[task][1] for task in bench.tasks}
    chosen = {}
    for name in candidates[0][0]:
        values = {task: candidates[i][0][name] for task, i in pick.items()}
        if len(set(values.values())) == 1:
            chosen[name] = next(iter(values.values()))
        else:
            chosen.update({f"{name}.{task}": v for task, v in values.items()})
    return TaskStates(lambda task: candidates[pick[task]][1](task)), chosen, True, merge_time


def refine_on_validation(
    bench: Benchmark, refiner: Refiner, fixed: Mapping[str, Any], request: RefineRequest
) -> tuple[RefineResult, dict[str, Any], TrainStats]:
    """Refine with every candidate of the refiner's search grid; keep the best mean
    validation score (the first of equals), as :func:`select_on_validation` does for a
    method's hyperparameters. ``request.hparams`` is replaced by each candidate.

    Returns (the best result, the values of the searched hyperparameters as stored with the
    cell: ``{"REFINER.NAME": value}``, empty when nothing was searched, and the compute of
    every candidate: a search's cost is part of the row's).
    """
    combos = hp.grid(refiner.hparams, fixed)
    spent = TrainStats()
    best: tuple[float, RefineResult, dict[str, Any]] | None = None
    for combo in combos:
        result = refiner.refine(dataclasses.replace(request, hparams=combo))
        for task_stats in result.stats.values():
            spent += task_stats
        if len(combos) == 1:
            return result, {}, spent
        private = result.private if result.private is not None else request.private
        mean = fmean(evaluate_state(bench, result.state, "val", private=private).values())
        if best is None or mean > best[0]:
            best = (mean, result, combo)
    assert best is not None
    searched = [h.name for h in refiner.hparams if h.name not in fixed and len(h.search) > 1]
    return best[1], {f"{refiner.name}.{k}": best[2][k] for k in searched}, spent


def _method_cell(cell: Cell, bench: Benchmark, ws: Workspace) -> Outcome:
    spec = cell.spec
    assert isinstance(spec, MethodSpec)
    methods, refiners = registry.methods(), registry.refiners()
    base = bench.base_state()
    stats, chosen, access, trace, merge_time = TrainStats(), {}, "none", None, None
    method = None
    state = base
    private: Private = {}
    vectors = None
    if spec.method:
        method = methods[spec.method.name]
        source = cell.identity.get("experts")
        experts = ws.experts(bench, cell.seed, source)
        stats += experts.total()
        private = experts.private()
        vectors = experts.vectors()
        data_stats = ws.statistics(bench, cell.seed, method.needs, source) if method.needs else None
        state, chosen, searched, merge_time = select_on_validation(
            bench,
            method,
            spec.method.fixed,
            base,
            vectors,
            cell.seed,
            data_stats,
            private,
            ws.progress,
            stats,
        )
        access = _max_access(method.data, "validation" if searched else None)
    method_chosen = dict(chosen)
    for index, part in enumerate(spec.refiners):
        refiner = refiners[part.name]
        from_base = method is None and index == 0
        request = RefineRequest(
            benchmark=bench,
            base=base,
            start=state,
            method=method,
            method_hparams=dict(method_chosen),
            hparams=hp.defaults(refiner.hparams, part.fixed),
            seed=cell.seed,
            progress=ws.progress,
            from_base=from_base,
            private=private,
            vectors=vectors,
            trace=ws.trace,
        )
        result, refined, spent = refine_on_validation(bench, refiner, part.fixed, request)
        state, trace = result.state, result.trace
        stats += spent
        chosen.update(refined)
        private = result.private if result.private is not None else private
        chosen.update({f"{refiner.name}.{k}": v for k, v in result.resolved.items()})
        access = _max_access(
            access,
            refiner.data_from_base if from_base else refiner.data,
            "validation" if refined else None,
        )
    scores = evaluate_splits(bench, state, private=private)
    storage = None
    if method is not None and method.per_task_bytes is not None:
        entries = sum(b.numel() for b in base.values() if b.is_floating_point())
        storage = method.per_task_bytes(entries)
    return Outcome(scores, chosen, access, stats, trace, merge_time, storage)


@dataclass(frozen=True)
class ExpertJob:
    """Fine-tune one task's expert of one (suite, model, seed) into the expert cache.

    Parallel executors run a seed's experts as jobs of their own ahead of the cells, so
    that they train on several devices at once instead of one after another inside the
    first cell that needs them. Its record says whether it trained; it is not stored.
    """

    suite: str
    model: str
    seed: int
    task: str

    @property
    def method(self) -> str:
        return f"expert:{self.task}"

    def config(self) -> dict[str, Any]:
        return {"suite": self.suite, "model": self.model, "method": self.method, "seed": self.seed}

    @property
    def key(self) -> str:
        return key_hash(self.config())


def _expert_job(job: ExpertJob, ws: Workspace, record: CellRecord) -> None:
    bench = ws.benchmark(job.suite, job.model)
    _, meta, created = ensure_expert(ws.home, bench, job.task, job.seed, ws.progress)
    record.steps, record.examples = meta["steps"], meta["examples"]
    record.trace = [{"task": job.task, "trained": created, "pid": os.getpid()}]


def execute(cell: Cell | ExpertJob, ws: Workspace) -> CellRecord:
    """Run one cell (or expert job); an exception becomes a failed record, not a lost grid."""
    started = time.perf_counter()
    record = CellRecord(cell.key, cell.suite, cell.model, cell.method, cell.seed, cell.config())
    outcome = None
    try:
        if isinstance(cell, ExpertJob):
            _expert_job(cell, ws, record)
        else:
            bench = ws.benchmark(cell.suite, cell.model)
            if isinstance(cell.spec, str):
                outcome = _references(cell, bench, ws)
            else:
                outcome = _method_cell(cell, bench, ws)
    except Exception as exc:  # noqa: BLE001 - a failing cell must not lose the rest of the grid
        record.status = "failed"
        record.error = f"{type(exc).__name__}: {exc}"
        record.trace = [{"traceback": traceback.format_exc()}]
    if outcome is not None:
        record.accuracies = first(outcome.scores)
        record.scores = outcome.scores
        record.hparams = outcome.hparams
        record.data_access = outcome.data_access
        record.steps, record.examples = outcome.stats.steps, outcome.stats.examples
        record.merge_time_s = outcome.merge_time_s
        record.task_storage_bytes = outcome.task_storage_bytes
        record.trace = outcome.trace
    record.wall_time_s = time.perf_counter() - started
    record.peak_mem_mb = peak_memory_mb(ws.device)
    record.device = device_name(ws.device)
    record.versions = {**versions(), **_plugin_versions(cell)}
    record.git_commit = git_commit()
    return record


def _plugin_versions(cell: Cell | ExpertJob) -> dict[str, str]:
    """The packages that provided the cell's method and refiners: a third party's too."""
    if isinstance(cell, ExpertJob) or isinstance(cell.spec, str):
        return {}
    parts = [("method", cell.spec.method)] if cell.spec.method else []
    parts += [("refiner", part) for part in cell.spec.refiners]
    found = {}
    for kind, part in parts:
        registered = (
            registry.registered_methods() if kind == "method" else registry.registered_refiners()
        ).get(part.name)
        if registered is not None:
            found[f"{kind}:{part.name}"] = (
                f"{registered.source.package} {registered.source.version}"
            )
    return found
