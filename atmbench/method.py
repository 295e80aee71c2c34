"""The merge-method contract and the streaming loop that applies a method tensor by tensor.

A method is a pure function of tensors. For each parameter the loop hands it the base
tensor and the stacked task vectors of that parameter only, so peak memory stays near one
model plus one parameter per task (the mergekit way), whether the task vectors live in
memory or in memory-mapped safetensors files. The method returns the *unscaled* merged
task vector; the final coefficient (λ of TA/TIES, α of TSV/Iso) is applied afterwards, so a
validation sweep over it costs one merge, not one per value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from torch import Tensor

from atmbench.hparams import HParam
from atmbench.seeds import derive

DATA_ACCESS = ("none", "validation", "train")
"""What data a method or refiner touches: the fairness column of every leaderboard."""


class MergeInputError(ValueError):
    """The inputs of a merge are inconsistent (keys, shapes) or not finite."""


@dataclass(frozen=True)
class TensorContext:
    """Everything a per-tensor merge function may know besides the tensors themselves."""

    key: str
    tasks: tuple[str, ...]
    seed: int = 0
    state: Any = None
    """What the method's ``prepare`` returned (global view, e.g. per-task thresholds)."""
    stats: Mapping[str, Tensor] = field(default_factory=dict)
    """Data statistics for this parameter, stacked over tasks (e.g. ``"fisher"``)."""

    def generator(self, task_index: int = 0) -> torch.Generator:
        """A generator seeded by (seed, parameter, task): masks don't depend on order."""
        task = self.tasks[task_index] if self.tasks else ""
        return torch.Generator().manual_seed(derive(self.seed, self.key, task))


MergeFn = Callable[..., Tensor]
"""``fn(base, task_vectors, ctx, **hparams) -> unscaled merged task vector``.

``base`` is the float32 base tensor, ``task_vectors`` the float32 task vectors stacked on a
new leading dimension of size T >= 1.
"""


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method. ``data`` is required: every row says what data it used."""

    name: str
    merge: MergeFn
    data: str
    hparams: tuple[HParam, ...] = ()
    scale: HParam | None = None
    """The final coefficient: θ = θ0 + scale · merge(...). ``None`` means 1."""
    prepare: Callable[..., Any] | None = None
    """``prepare(task_vectors: TaskVectors, seed, **hparams)`` for methods needing a global view."""
    needs: tuple[str, ...] = ()
    """Data statistics the runner must compute (e.g. ``("fisher",)``)."""
    description: str = ""
    aliases: tuple[str, ...] = ()
    """Other names a spec may use (``consensus`` for ``consensus_ta``); rows use ``name``."""
    version: str = "1"
    """Bump when the math changes: it is part of a cell's cache key."""

    def __post_init__(self) -> None:
        if self.data not in DATA_ACCESS:
            raise ValueError(
                f"method {self.name!r}: data={self.data!r} is invalid, expected one of "
                + ", ".join(DATA_ACCESS)
            )
        names = [h.name for h in self.all_hparams()]
        if len(names) != len(set(names)):
            raise ValueError(f"method {self.name!r} declares a hyperparameter twice: {names}")

    def all_hparams(self) -> tuple[HParam, ...]:
        return self.hparams + ((self.scale,) if self.scale else ())


class TaskVectors(Protocol):
    """Task vectors of T tasks over the same parameter names, read one parameter at a time."""

    tasks: tuple[str, ...]
    unchecked: bool
    """True if the merge must check the values for NaN/inf itself."""

    def stacked(self, key: str) -> Tensor: ...

    def keys(self, task: str) -> Iterable[str]: ...


def _stack(key: str, tasks: tuple[str, ...], tensors: list[Tensor]) -> Tensor:
    shapes = {t: tuple(v.shape) for t, v in zip(tasks, tensors, strict=True)}
    if len(set(shapes.values())) > 1:
        raise MergeInputError(f"parameter {key!r} has different shapes across tasks: {shapes}")
    return torch.stack(tensors)


class InMemoryTaskVectors:
    unchecked = True
    """Caller-provided tensors: checked for NaN/inf during the merge."""

    def __init__(self, vectors: Mapping[str, Mapping[str, Tensor]]):
        self.tasks = tuple(vectors)
        self._vectors = vectors

    def keys(self, task: str) -> Iterable[str]:
        return self._vectors[task].keys()

    def stacked(self, key: str) -> Tensor:
        return _stack(key, self.tasks, [self._vectors[t][key] for t in self.tasks])

    def get(self, task: str, key: str) -> Tensor:
        return self._vectors[task][key]


class FileTaskVectors:
    """Task vectors in safetensors files, memory-mapped: only the asked-for tensor is read."""

    unchecked = False
    """Expert-cache files are checked for NaN/inf when written and checksummed since."""

    def __init__(self, files: Mapping[str, Path]):
        self.tasks = tuple(files)
        self._handles = {t: safe_open(str(p), framework="pt") for t, p in files.items()}

    def keys(self, task: str) -> Iterable[str]:
        return self._handles[task].keys()

    def stacked(self, key: str) -> Tensor:
        return _stack(key, self.tasks, [self._handles[t].get_tensor(key) for t in self.tasks])

    def get(self, task: str, key: str) -> Tensor:
        return self._handles[task].get_tensor(key)


def check_keys(base: Mapping[str, Tensor], vectors: TaskVectors) -> None:
    """Every task must cover exactly the base's parameters: say which ones differ."""
    expected = set(base)
    for task in vectors.tasks:
        keys = set(vectors.keys(task))
        if keys != expected:
            missing = sorted(expected - keys)[:3]
            extra = sorted(keys - expected)[:3]
            raise MergeInputError(
                f"task {task!r} does not match the base model's parameters "
                f"(missing {missing}, unexpected {extra})"
            )


def merged_task_vector(
    method: MergeMethod,
    base: Mapping[str, Tensor],
    vectors: TaskVectors,
    hparams: Mapping[str, Any],
    seed: int = 0,
    stats: Mapping[str, Any] | None = None,
) -> dict[str, Tensor]:
    """Stream ``method`` over every parameter; return the unscaled merged task vector (fp32)."""
    check_keys(base, vectors)
    state = method.prepare(vectors, seed=seed, **hparams) if method.prepare else None
    out: dict[str, Tensor] = {}
    for key, b in base.items():
        if not vectors.tasks or not b.is_floating_point():
            out[key] = torch.zeros_like(b, dtype=torch.float32)
            continue
        stacked = vectors.stacked(key).float()
        if stacked.shape[1:] != b.shape:
            raise MergeInputError(
                f"parameter {key!r}: task vectors have shape {tuple(stacked.shape[1:])}, "
                f"the base has {tuple(b.shape)}"
            )
        # One reduction (NaN and inf propagate into the sum) instead of a boolean copy of the
        # whole stack; only a non-finite sum pays for finding the culprit tasks.
        if vectors.unchecked and not torch.isfinite(stacked.sum()):
            bad = [t for t, v in zip(vectors.tasks, stacked, strict=True) if not v.isfinite().all()]
            raise MergeInputError(f"parameter {key!r} of task(s) {bad} holds NaN or inf values")
        key_stats = {name: s[key] for name, s in (stats or {}).items() if key in s}
        ctx = TensorContext(key, tuple(vectors.tasks), seed, state, key_stats)
        delta = method.merge(b.float(), stacked, ctx, **hparams)
        if delta.shape != b.shape:
            raise MergeInputError(
                f"method {method.name!r} returned shape {tuple(delta.shape)} for {key!r}, "
                f"expected {tuple(b.shape)}"
            )
        out[key] = delta.float()
    return out


def combine(
    base: Mapping[str, Tensor], delta: Mapping[str, Tensor], scale: float = 1.0
) -> dict[str, Tensor]:
    """θ = θ0 + scale · Δ in float32, cast back to each base tensor's dtype."""
    return {
        k: (b.float() + scale * delta[k]).to(b.dtype) if b.is_floating_point() else b.clone()
        for k, b in base.items()
    }
