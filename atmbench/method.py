"""The merge-method contract: what a method is, what it is handed, where task vectors come from.

A method is a pure function of tensors, applied parameter by parameter (or block of rows by
block of rows) by :mod:`atmbench.streaming`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from torch import Tensor

from atmbench import kernels
from atmbench.hparams import HParam
from atmbench.seeds import derive

DATA_ACCESS = ("none", "validation", "train", "test-unlabeled")
"""What data a method or refiner touches: the fairness column of every leaderboard.

``test-unlabeled`` is test-time adaptation (AdaMerging): the inputs of the very test
split that is scored, without their labels. It ranks last (a cell that also searched on
validation reads ``test-unlabeled``): whatever else a row used, it saw the test inputs."""


class MergeInputError(ValueError):
    """The inputs of a merge are inconsistent (keys, shapes) or not finite."""


class Scratch:
    """float32 buffers reused by the blocks of one pass over the model, one per name.

    A block's temporary of a few MiB is new memory each time otherwise: the allocator hands
    it back to the kernel between blocks, and the kernel faults it in again page by page,
    which costs more than the arithmetic on it.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._buffers: dict[str, Tensor] = {}

    def empty(self, name: str, shape: Sequence[int]) -> Tensor:
        """A float32 tensor of ``shape`` in buffer ``name``, valid until the next call with
        that name (the next block)."""
        size = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < size:
            buffer = self._buffers[name] = torch.empty(size, device=self.device)
        return buffer[:size].view(tuple(shape))


@dataclass(frozen=True)
class TensorContext:
    """Everything a per-tensor merge function may know besides the tensors themselves."""

    key: str
    tasks: tuple[str, ...]
    seed: int = 0
    state: Any = None
    """What the method's ``prepare`` returned (global view, e.g. per-task thresholds)."""
    stats: Mapping[str, Tensor] = field(default_factory=dict)
    """Data statistics for this parameter (or block of rows), stacked over tasks."""
    offset: int = 0
    """Flat index of this block's first entry in the parameter (0 for a whole tensor)."""
    scratch: Scratch = field(default_factory=Scratch)
    """Buffers for the block's temporaries, reused by the next block: the block's result may
    live there (the loop copies it at once), nothing the method keeps may."""
    out: Tensor | None = None
    """Where a rowwise loop stores this block's result: see :meth:`result`."""

    def result(self, name: str, shape: Sequence[int]) -> Tensor:
        """A float32 buffer for the block's result: the loop's own output (returned as is,
        it is not copied again: one pass less over a model's worth of memory) if there is
        one of this shape, else scratch buffer ``name``."""
        if self.out is not None and tuple(self.out.shape) == tuple(shape):
            return self.out
        return self.scratch.empty(name, shape)

    def generator(self, task_index: int = 0) -> torch.Generator:
        """A generator seeded by (seed, parameter, task): masks don't depend on order.

        For whole-tensor methods; a ``rowwise`` method draws with :meth:`uniform`, which
        does not depend on how the parameter is split into blocks.
        """
        return torch.Generator().manual_seed(self.task_seed(task_index))

    def uniform(self, task_index: int, shape: Sequence[int]) -> Tensor:
        """float32 uniforms in [0, 1) for this block's entries, from the (seed, parameter,
        task) stream.

        Entry i of the parameter always gets draw i of its stream (a counter-based
        SplitMix64, :func:`atmbench.kernels.uniform`), so the draws are the same whether
        the parameter comes whole or in blocks of any size, and they are computed in
        parallel. At 24 random bits per float32, ``uniform > p`` follows the law of
        ``torch.rand(...) > p`` exactly.
        """
        count = math.prod(shape)
        return kernels.uniform(self.task_seed(task_index), self.offset, count).view(tuple(shape))

    def task_seed(self, task_index: int) -> int:
        """The seed of task ``task_index``'s streams for this parameter."""
        task = self.tasks[task_index] if self.tasks else ""
        return derive(self.seed, self.key, task)


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
    finish: Callable[[Any, dict[str, Tensor]], None] | None = None
    """``finish(state, delta)``, after every parameter is merged, for what only the whole
    merge decides (TIES: the sign of tied entries, by a vote counted while merging). It edits
    the merged task vector ``delta`` in place; ``state`` is what ``prepare`` returned."""
    needs: tuple[str, ...] = ()
    """Data statistics the runner must compute (e.g. ``("fisher",)``)."""
    adapt: Callable[..., Any] | None = None
    """``adapt(request: atmbench.adapt.AdaptRequest, **hparams) -> AdaptResult`` for a
    method that learns from data on whole models (AdaMerging's coefficients): the runner
    calls it once per hyperparameter combination in place of ``prepare``, and the result's
    ``state`` reaches ``merge`` as ``ctx.state``."""
    description: str = ""
    rowwise: bool = False
    """True if the merge of a block of leading-dimension rows needs only those rows (their
    base, task vectors, statistics, and ``prepare``'s state): the loop then streams cache-
    sized blocks (:mod:`atmbench.streaming`). Tensors of fewer than 2 dimensions come whole."""
    stacked: bool = True
    """False if a ``rowwise`` merge takes a block's task vectors as T separate float32
    tensors (views of each task's own, possibly memory-mapped, tensor) instead of one
    stacked ``[T, ...]`` tensor: the loop then skips the stacked copy, which is most of an
    elementwise merge's memory traffic. Such a merge must take a stacked tensor too
    (iterating it gives the T tensors), as :mod:`atmbench.kernels` does."""
    per_task: Callable[..., Tensor] | None = None
    """For a method that keeps one shared merged vector plus small per-task modulators and
    so needs the task id at inference (EMR's masks and rescalers, TALL masks):
    ``per_task(shared, task_vector, index, ctx, **hparams)`` -> task ``index``'s unscaled
    task vector of this parameter, from the shared one (what ``merge`` returned) and the
    task's own τ_t (float32, whole tensors). The runner evaluates task t with
    θ0 + scale · that, picks hyperparameters per task on validation, and lets no refiner
    follow; :func:`atmbench.merge_per_task` builds the models."""
    per_task_bytes: Callable[[int], int] | None = None
    """Extra storage per task, in bytes, for ``d`` merged entries (a 1-bit mask: ⌈d/8⌉):
    stored with each cell and shown in the leaderboards' provenance."""
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
        if self.adapt is not None and self.prepare is not None:
            raise ValueError(f"method {self.name!r}: adapt replaces prepare, give one of them")
        if (self.per_task is None) != (self.per_task_bytes is None):
            raise ValueError(
                f"method {self.name!r}: per_task and per_task_bytes go together (one is unset)"
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

    def get(self, task: str, key: str) -> Tensor: ...

    def keys(self, task: str) -> Iterable[str]: ...


def same_shape(key: str, tasks: tuple[str, ...], tensors: list[Tensor]) -> list[Tensor]:
    """``tensors`` (parameter ``key`` of each task), or an error naming every task's shape."""
    shapes = {t: tuple(v.shape) for t, v in zip(tasks, tensors, strict=True)}
    if len(set(shapes.values())) > 1:
        raise MergeInputError(f"parameter {key!r} has different shapes across tasks: {shapes}")
    return tensors


def _stack(key: str, tasks: tuple[str, ...], tensors: list[Tensor]) -> Tensor:
    return torch.stack(same_shape(key, tasks, tensors))


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
        self._tensors: dict[tuple[str, str], Tensor] = {}

    def keys(self, task: str) -> Iterable[str]:
        return self._handles[task].keys()

    def stacked(self, key: str) -> Tensor:
        return _stack(key, self.tasks, [self.get(t, key) for t in self.tasks])

    def get(self, task: str, key: str) -> Tensor:
        # Views of the file's mapping, kept: a merge asks for each tensor in every pass
        # (sample, count, merge), and each get_tensor call costs ~25 µs.
        tensor = self._tensors.get((task, key))
        if tensor is None:
            tensor = self._tensors[task, key] = self._handles[task].get_tensor(key)
        return tensor


class DifferenceTaskVectors:
    """τ_t = θ_t − θ0 in float32, computed when a parameter (or a block of its rows) is
    asked for and dropped by the caller after use: memory stays near one model plus one
    tensor per task, where building every task vector up front costs T float32 models.

    ``base`` and the experts are mappings of tensors (state dicts, or checkpoint readers
    whose ``rows(key, rows)`` reads only a block of rows from disk). The base's rows are
    kept for the next task's difference (the loops ask for a parameter task by task).
    """

    unchecked = True
    """Caller-provided tensors: checked for NaN/inf during the merge."""

    def __init__(self, base: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]]):
        self.tasks = tuple(experts)
        self._base = base
        self._experts = experts
        self._last: tuple[str, Any, Tensor] | None = None

    def keys(self, task: str) -> Iterable[str]:
        return self._experts[task].keys()

    def peek(self, task: str, key: str) -> Tensor:
        """A ``meta`` tensor with the task vector's shape and dtype: nothing is computed."""
        shape = _rows_of(self._experts[task], key, None).shape
        return torch.empty(shape, device="meta")

    def rows(self, task: str, key: str, rows: Any) -> Tensor:
        """The task vector's ``rows`` (a slice of leading rows, or ``...``) of ``key``."""
        tuned = _rows_of(self._experts[task], key, rows)
        if key not in self._base:  # left to check_keys, which names the key
            return tuned
        # θ0 promoted to float32 exactly, as finetune.task_vector computes it: once per
        # block for all tasks (a float32 - bfloat16 subtraction converts on every call, at
        # twice the cost of a same-dtype one)
        base = self._base_rows(key, rows)
        return tuned.to(torch.float32, copy=True).sub_(base)

    def get(self, task: str, key: str) -> Tensor:
        return self.rows(task, key, ...)

    def stacked(self, key: str) -> Tensor:
        return _stack(key, self.tasks, [self.get(t, key) for t in self.tasks])

    def _base_rows(self, key: str, rows: Any) -> Tensor:
        if self._last is None or self._last[0] != key or self._last[1] != rows:
            self._last = None  # the previous rows are freed before the next are read
            self._last = (key, rows, _rows_of(self._base, key, rows).float())
        return self._last[2]


def _rows_of(source: Mapping[str, Tensor], key: str, rows: Any) -> Tensor:
    """``source[key][rows]``, read from disk block by block where the source can
    (``rows=None``: a tensor with just the shape, ``meta`` if the source can say)."""
    reader = getattr(source, "rows", None)
    if reader is not None:
        return reader(key, rows)
    tensor = source[key]
    return tensor if rows is None else tensor[rows]


def task_rows(vectors: TaskVectors, task: str, key: str, rows: Any) -> Tensor:
    """Task ``task``'s vector of parameter ``key`` at ``rows``: computed for those rows only
    where the task vectors are computed lazily (:class:`DifferenceTaskVectors`), else a
    view of the whole tensor."""
    reader = getattr(vectors, "rows", None)
    return reader(task, key, rows) if reader is not None else vectors.get(task, key)[rows]


def peek(vectors: TaskVectors, task: str, key: str) -> Tensor:
    """A tensor with the shape and dtype of ``task``'s vector of ``key``, computing nothing
    where the task vectors are lazy."""
    probe = getattr(vectors, "peek", None)
    return probe(task, key) if probe is not None else vectors.get(task, key)


class FloatingOnly:
    """``vectors`` without the parameters whose base tensor is not floating point.

    Integer and bool buffers (position ids, BatchNorm's ``num_batches_tracked``) are state,
    not weights: the merge keeps the base's value for them (:func:`combine`), and they must
    not count in a method's global view either (TIES' and DOGE's model-wide thresholds),
    even where a task vector holds them as floats (``θ_t − θ0`` of an integer buffer).
    :func:`atmbench.streaming.merged_task_vector` hands every method its vectors this way.
    """

    def __init__(self, vectors: TaskVectors, base: Mapping[str, Tensor]):
        self.tasks = vectors.tasks
        self.unchecked = vectors.unchecked
        self._vectors = vectors
        self._floating = {k for k, b in base.items() if b.is_floating_point()}

    def keys(self, task: str) -> Iterable[str]:
        return [k for k in self._vectors.keys(task) if k in self._floating]

    def stacked(self, key: str) -> Tensor:
        return self._vectors.stacked(key)

    def get(self, task: str, key: str) -> Tensor:
        return self._vectors.get(task, key)

    def rows(self, task: str, key: str, rows: Any) -> Tensor:
        return task_rows(self._vectors, task, key, rows)

    def peek(self, task: str, key: str) -> Tensor:
        return peek(self._vectors, task, key)


def sum_tasks(task_vectors: Tensor | Sequence[Tensor], out: Tensor) -> Tensor:
    """Σ_t τ_t into ``out``, in task order: the same float32 sums whether a block comes
    stacked or as T tensors (``torch.sum`` over a stacked dimension may pair the terms
    differently, depending on the shape)."""
    out.copy_(task_vectors[0])
    for task_vector in task_vectors[1:]:
        out += task_vector
    return out


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


def combine(
    base: Mapping[str, Tensor],
    delta: Mapping[str, Tensor],
    scale: float = 1.0,
    *,
    consume: bool = False,
) -> dict[str, Tensor]:
    """θ = θ0 + scale · Δ in float32, cast back to each base tensor's dtype.

    ``consume=True`` writes θ into Δ's float32 tensors, for callers done with Δ (one merge,
    one scale): a model-sized tensor is new memory that the kernel must fault in page by
    page, which costs about as much as reading all the task vectors once.
    """
    return {k: _combined(b, delta[k], scale, consume) for k, b in base.items()}


def _combined(base: Tensor, delta: Tensor, scale: float, consume: bool) -> Tensor:
    if not base.is_floating_point():  # an integer buffer: the base's value, never merged
        return base.clone()
    # scale · Δ, then θ0 added in place: never a second model-sized temporary.
    if scale == 1.0 and consume and delta.dtype == torch.float32:
        out = delta  # · 1 is exact: skip a pass over the tensor
    else:
        out = delta.mul_(scale) if consume and delta.dtype == torch.float32 else delta * scale
    out += base
    return out.to(base.dtype)
