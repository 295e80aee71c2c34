"""The streaming loop: a merge method applied parameter by parameter, block by block.

For each parameter the loop hands the method the base tensor and the stacked task vectors
of that parameter only, so peak memory stays near one model plus one parameter per task
(the mergekit way), whether the task vectors live in memory or in memory-mapped safetensors
files. The method returns the *unscaled* merged task vector; the final coefficient (λ of
TA/TIES, α of TSV/Iso) is applied afterwards, so a validation sweep over it costs one merge,
not one per value.

Methods that declare ``rowwise`` get a parameter in blocks of rows instead, stacked into one
reused buffer of about :data:`BLOCK` entries per task. Two costs vanish that way, and they
were most of an elementwise merge's time on a CPU: every fresh stack of a large parameter
is new memory the kernel must fault in page by page, and every intermediate of a stack
larger than the cache goes out to RAM and back. Blocks of 1 MiB per task stay in the L3
cache and reuse the same pages, as do the blocks' temporaries (``ctx.scratch``); the
methods' tensor code does not change. Methods that also declare ``stacked=False`` skip the
stack: they get each task's rows as views of its own (memory-mapped) tensor, which their
kernels read directly, and they may write the block's result straight into the merged
tensor (``ctx.out``), so an elementwise merge moves each byte about once.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from atmbench.method import (
    FloatingOnly,
    MergeInputError,
    MergeMethod,
    Scratch,
    TaskVectors,
    TensorContext,
    check_keys,
    peek,
    same_shape,
    task_rows,
)

BLOCK = 1 << 18
"""Entries per task in one block (1 MiB of float32): T of them fit a CPU's L3 cache, where
kernels walk them chunk by chunk, and each pass over the model costs ~350 blocks of Python
overhead for a ViT-B-32. Smaller blocks measured slower (overhead), larger ones too (cache)."""


Rows = slice | type(Ellipsis)
"""A block's index into a parameter: a slice of leading rows, or ``...`` for all of it."""


def row_blocks(shape: torch.Size) -> list[Rows]:
    """Blocks of whole leading-dimension rows, about :data:`BLOCK` entries each.

    A tensor of fewer than two dimensions is one block: rowwise methods may treat a 1-D
    tensor as a single row (Breadcrumbs does), and such tensors are small anyway.
    """
    if len(shape) < 2 or shape[0] == 0:
        return [...]
    step = max(1, BLOCK // max(1, math.prod(shape[1:])))
    return [slice(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]


def _stack(scratch: Scratch, tensors: list[Tensor]) -> Tensor:
    """T tensors (any float dtype) as one float32 ``[T, ...]`` in ``scratch``'s buffer."""
    stacked = scratch.empty("stacked", (len(tensors), *tensors[0].shape))
    if all(t.dtype == torch.float32 for t in tensors):
        return torch.stack(tensors, out=stacked)  # one call instead of T
    for row, tensor in zip(stacked, tensors, strict=True):
        row.copy_(tensor)
    return stacked


def _shape(vectors: TaskVectors, key: str) -> torch.Size:
    """The shape of parameter ``key``'s task vectors, the same for every task."""
    tasks = tuple(vectors.tasks)
    return same_shape(key, tasks, [peek(vectors, t, key) for t in tasks])[0].shape


def _as_float32(scratch: Scratch, tensors: list[Tensor]) -> list[Tensor]:
    """T tensors as float32: as they are, or converted into ``scratch`` buffers."""
    return [
        t if t.dtype == torch.float32 else scratch.empty(f"task{i}", t.shape).copy_(t)
        for i, t in enumerate(tensors)
    ]


def _check_finite(vectors: TaskVectors, key: str, block: Sequence[Tensor]) -> None:
    # One reduction per task (NaN and inf propagate into the sum) instead of a boolean copy;
    # only a non-finite sum pays for finding the culprit tasks.
    if vectors.unchecked and not all(bool(torch.isfinite(v.sum())) for v in block):
        bad = [t for t, v in zip(vectors.tasks, block, strict=True) if not v.isfinite().all()]
        raise MergeInputError(f"parameter {key!r} of task(s) {bad} holds NaN or inf values")


def blocks(
    vectors: TaskVectors,
    key: str,
    seed: int = 0,
    state: Any = None,
    stats: Mapping[str, Tensor] | None = None,
    scratch: Scratch | None = None,
    stacked: bool = True,
) -> Iterator[tuple[Rows, TensorContext, Tensor | list[Tensor]]]:
    """Yield ``(rows, ctx, task_vectors)`` for the row blocks of parameter ``key``.

    ``task_vectors`` is float32 ``[T, rows, ...]`` in a buffer of ``scratch`` (pass one per
    pass over the model; it is also the blocks' ``ctx.scratch``), which the next block
    overwrites: use it, or copy what must outlive the block. With ``stacked=False`` it is
    instead T float32 tensors ``[rows, ...]``: views of the tasks' own tensors (or, for
    other dtypes, converted copies in ``scratch``), never to be written.
    Each block's ``ctx.offset`` places it in the parameter, so its random draws
    (:meth:`TensorContext.uniform`) are the same however the parameter is split. ``stats``
    are the parameter's statistics stacked over tasks ``[T, ...]``; each block sees its rows.
    """
    shape = _shape(vectors, key)
    scratch = scratch or Scratch()
    row_size = math.prod(shape[1:])
    for rows in row_blocks(shape):
        views = [task_rows(vectors, t, key, rows) for t in vectors.tasks]
        block = _stack(scratch, views) if stacked else _as_float32(scratch, views)
        _check_finite(vectors, key, block)
        block_stats = {n: s[:, rows] for n, s in (stats or {}).items()}
        offset = rows.start * row_size if isinstance(rows, slice) else 0
        ctx = TensorContext(key, tuple(vectors.tasks), seed, state, block_stats, offset, scratch)
        yield rows, ctx, block


def block_order(
    method: MergeMethod, base: Mapping[str, Tensor], vectors: TaskVectors
) -> Iterator[tuple[str, Rows]]:
    """The ``(key, rows)`` blocks :func:`merged_parameters` asks ``vectors`` for, in order:
    row blocks of each floating-point parameter for rowwise methods, whole ones otherwise.
    Needs only shapes and dtypes (``base`` may be a reader's ``meta`` view)."""
    if not vectors.tasks:
        return
    for key, b in base.items():
        if b.is_floating_point():
            yield from ((key, rows) for rows in (row_blocks(b.shape) if method.rowwise else [...]))


class ReadAhead:
    """``vectors`` with the task vectors of the next blocks computed in a background thread.

    Why: reading a block from disk and converting it to float32 task vectors costs about as
    much as merging it, and each is one core's serial work; in a thread (file reads and
    torch operations release the GIL) the two overlap. ``order`` is the sequence of
    ``(key, rows)`` the consumer will ask for (:func:`block_order`); up to ``depth`` blocks
    wait in memory. A request out of that order is computed on the spot (correct, just not
    ahead). Use as a context manager, so that the thread stops when the merge does.
    """

    def __init__(
        self, vectors: TaskVectors, order: Iterable[tuple[str, Rows]], depth: int = 2
    ) -> None:
        self.tasks = vectors.tasks
        self.unchecked = vectors.unchecked
        self._vectors = vectors
        self._lock = threading.Lock()  # the wrapped vectors cache their base rows
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._head: tuple[str, Rows, list[Tensor]] | None = None
        self._done = False
        self._thread = threading.Thread(target=self._work, args=(iter(order),), daemon=True)
        self._thread.start()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _compute(self, key: str, rows: Rows) -> list[Tensor]:
        with self._lock:
            return [task_rows(self._vectors, t, key, rows) for t in self.tasks]

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self, order: Iterator[tuple[str, Rows]]) -> None:
        try:
            for key, rows in order:
                if not self._put((key, rows, self._compute(key, rows))):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(exc)
            return
        self._put(None)

    def _ahead(self, key: str, rows: Rows) -> list[Tensor] | None:
        """The block ``(key, rows)`` if it is the next one computed ahead."""
        if self._head is None and not self._done:
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._done = True
                raise item
            self._done = item is None
            self._head = item
        if self._head is not None and self._head[0] == key and self._head[1] == rows:
            return self._head[2]
        return None

    def rows(self, task: str, key: str, rows: Rows) -> Tensor:
        block = self._ahead(key, rows)
        if block is None:
            with self._lock:
                return task_rows(self._vectors, task, key, rows)
        index = self.tasks.index(task)
        tensor = block[index]
        if index == len(self.tasks) - 1:
            self._head = None  # every task has its rows: the next block comes
        return tensor

    def get(self, task: str, key: str) -> Tensor:
        return self.rows(task, key, ...)

    def stacked(self, key: str) -> Tensor:
        return torch.stack(same_shape(key, self.tasks, [self.get(t, key) for t in self.tasks]))

    def keys(self, task: str) -> Iterable[str]:
        return self._vectors.keys(task)

    def peek(self, task: str, key: str) -> Tensor:
        return peek(self._vectors, task, key)


def floating_keys(vectors: TaskVectors) -> list[str]:
    """The parameters that are merged: floating-point task vectors (a merge's vectors hold
    no integer buffer, :class:`atmbench.method.FloatingOnly`; this also skips those of
    vectors handed to a ``prepare`` directly, if they kept their integer dtype)."""
    if not vectors.tasks:
        return []
    first = vectors.tasks[0]
    return [k for k in vectors.keys(first) if peek(vectors, first, k).is_floating_point()]


def _merge_whole(
    method: MergeMethod,
    base: Tensor,
    vectors: TaskVectors,
    key: str,
    hparams: Mapping[str, Any],
    ctx: TensorContext,
) -> Tensor:
    stacked = vectors.stacked(key).float()
    _check_finite(vectors, key, stacked)
    delta = method.merge(base.float(), stacked, ctx, **hparams)
    # The caller owns the result (combine may write θ into it): never an input's memory.
    shared = delta.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    return delta.clone() if shared else delta


def _merge_rowwise(
    method: MergeMethod,
    base: Tensor,
    vectors: TaskVectors,
    key: str,
    hparams: Mapping[str, Any],
    seed: int,
    state: Any,
    stats: Mapping[str, Tensor],
    scratch: Scratch,
) -> Tensor:
    out = torch.empty(base.shape, device=base.device)
    for rows, ctx, task_vectors in blocks(
        vectors, key, seed, state, stats, scratch, method.stacked
    ):
        target = out[rows]
        ctx = replace(ctx, out=target)
        delta = method.merge(base[rows].float(), task_vectors, ctx, **hparams)
        if delta.shape != target.shape:
            raise MergeInputError(
                f"method {method.name!r} returned shape {tuple(delta.shape)} for rows of "
                f"{key!r}, expected {tuple(target.shape)}"
            )
        if delta.data_ptr() != target.data_ptr():
            target.copy_(delta)
    return out


def prepare(
    method: MergeMethod,
    base: Mapping[str, Tensor],
    vectors: TaskVectors,
    hparams: Mapping[str, Any],
    seed: int = 0,
) -> Any:
    """Check the inputs' keys and run the method's global pre-pass (its state, or None).

    Only floating-point parameters are merged: the pre-pass never sees the others (integer
    buffers: :class:`atmbench.method.FloatingOnly`), and :func:`merged_parameters` gives them
    a zero merged task vector, so that θ keeps the base's values."""
    check_keys(base, vectors)
    floating = FloatingOnly(vectors, base)  # integer buffers: neither merged nor counted
    return method.prepare(floating, seed=seed, **hparams) if method.prepare else None


def merged_task_vector(
    method: MergeMethod,
    base: Mapping[str, Tensor],
    vectors: TaskVectors,
    hparams: Mapping[str, Any],
    seed: int = 0,
    stats: Mapping[str, Any] | None = None,
    learned: Any = None,
) -> dict[str, Tensor]:
    """Stream ``method`` over every parameter; return the unscaled merged task vector (fp32),
    in tensors of its own (no input's memory). ``learned``: the state an ``adapt`` method
    learned (``AdaptResult.state``), which such a method needs in place of ``prepare``'s."""
    return merged_with_state(method, base, vectors, hparams, seed, stats, learned)[0]


def merged_with_state(
    method: MergeMethod,
    base: Mapping[str, Tensor],
    vectors: TaskVectors,
    hparams: Mapping[str, Any],
    seed: int = 0,
    stats: Mapping[str, Any] | None = None,
    learned: Any = None,
) -> tuple[dict[str, Tensor], Any]:
    """:func:`merged_task_vector` and the method's state (``prepare``'s, or ``learned``):
    what a per-task method's :func:`task_vector` needs."""
    if method.adapt is not None and learned is None:
        raise ValueError(
            f"method {method.name!r} learns its state from a benchmark's data (adapt): "
            "run it with 'atmbench run'"
        )
    state = prepare(method, base, vectors, hparams, seed)
    state = learned if method.adapt is not None else state
    out = dict(merged_parameters(method, base, vectors, hparams, state, seed, stats))
    if method.finish:
        method.finish(state, out)
    return out, state


def task_vector(
    method: MergeMethod,
    base: Mapping[str, Tensor],
    vectors: TaskVectors,
    shared: Mapping[str, Tensor],
    hparams: Mapping[str, Any],
    state: Any,
    task: str,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Task ``task``'s unscaled task vector under a per-task method (``method.per_task``),
    parameter by parameter from the shared merged vector ``shared`` and τ_task; integer
    buffers get zeros (θ keeps the base's values)."""
    if method.per_task is None:
        raise ValueError(f"method {method.name!r} merges into one model: it has no per-task one")
    index = vectors.tasks.index(task)
    tasks = tuple(vectors.tasks)
    out = {}
    for key, b in base.items():
        if not b.is_floating_point():
            out[key] = torch.zeros_like(b, dtype=torch.float32)
            continue
        ctx = TensorContext(key, tasks, seed, state)
        own = vectors.get(task, key).float()
        out[key] = method.per_task(shared[key], own, index, ctx, **hparams)
    return out


def merged_parameters(
    method: MergeMethod,
    base: Mapping[str, Tensor],
    vectors: TaskVectors,
    hparams: Mapping[str, Any],
    state: Any,
    seed: int = 0,
    stats: Mapping[str, Any] | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(key, unscaled merged task vector)`` (fp32, on the base tensor's device) one
    parameter at a time, given :func:`prepare`'s ``state``: a caller that writes each one
    out holds a single parameter. ``method.finish`` is the caller's to run afterwards."""
    scratch = None  # one set of block buffers for the whole pass, on the parameters' device
    for key, b in base.items():
        if not vectors.tasks or not b.is_floating_point():
            yield key, torch.zeros_like(b, dtype=torch.float32)
            continue
        if scratch is None or scratch.device != b.device:
            scratch = Scratch(b.device)
        shape = tuple(_shape(vectors, key))
        if shape != tuple(b.shape):
            raise MergeInputError(
                f"parameter {key!r}: task vectors have shape {shape}, the base has {tuple(b.shape)}"
            )
        key_stats = {name: s[key] for name, s in (stats or {}).items() if key in s}
        if method.rowwise:
            delta = _merge_rowwise(
                method, b, vectors, key, hparams, seed, state, key_stats, scratch
            )
        else:
            ctx = TensorContext(key, tuple(vectors.tasks), seed, state, key_stats)
            delta = _merge_whole(method, b, vectors, key, hparams, ctx)
        if delta.shape != b.shape:
            raise MergeInputError(
                f"method {method.name!r} returned shape {tuple(delta.shape)} for {key!r}, "
                f"expected {tuple(b.shape)}"
            )
        yield key, delta.float()
