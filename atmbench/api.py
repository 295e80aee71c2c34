"""``atmbench.merge`` (state dicts in memory) and ``merge_checkpoints`` (model folders or hub
ids on disk, the ``atmbench merge`` command): data-free merges on the runner's code path."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from atmbench import checkpoints, registry
from atmbench import hparams as hp
from atmbench.method import DifferenceTaskVectors, MergeMethod, combine
from atmbench.spec import SpecError, parse_spec
from atmbench.streaming import (
    ReadAhead,
    block_order,
    merged_parameters,
    merged_task_vector,
    merged_with_state,
    prepare,
    task_vector,
)

DEFAULT_SHARD = "2GB"
"""Output shard size of ``merge_checkpoints`` (tensor bytes per file)."""


def _resolve(
    spec: str, hparams: Mapping[str, Any], per_task: bool = False
) -> tuple[MergeMethod, dict[str, Any], float]:
    """The data-free method of ``spec``, its hyperparameters (keyword wins over the spec,
    defaults fill the rest) without the final scale, and that scale. ``per_task``: whether
    the caller builds a model per task (methods with ``per_task``) or one model (the rest)."""
    parsed = parse_spec(spec, registry.methods(), registry.refiners())
    if parsed.method is None or parsed.refiners:
        raise SpecError(
            f"{spec!r} needs training or validation data; only data-free merges run here "
            "(use 'atmbench run' or the runner for refiners)"
        )
    method = registry.methods()[parsed.method.name]
    if method.needs or method.data != "none":
        free = sorted(n for n, m in registry.methods().items() if m.data == "none" and not m.needs)
        raise SpecError(
            f"method {method.name!r} needs data ({', '.join(method.needs) or method.data}); "
            f"only data-free methods merge without a suite: {', '.join(free)}"
        )
    if method.per_task and not per_task:
        raise SpecError(
            f"method {method.name!r} keeps one model per task (it needs the task id at "
            "inference): use atmbench.merge_per_task or 'atmbench run'"
        )
    if per_task and not method.per_task:
        raise SpecError(f"method {method.name!r} merges into one model: use atmbench.merge")
    given = dict(parsed.method.fixed, **hp.resolve(method.all_hparams(), hparams, method.name))
    values = hp.defaults(method.all_hparams(), given)
    scale = values.pop(method.scale.name) if method.scale else 1.0
    return method, values, scale


def merge(
    spec: str,
    base: Mapping[str, Tensor],
    experts: Mapping[str, Mapping[str, Tensor]],
    seed: int = 0,
    **hparams: Any,
) -> dict[str, Tensor]:
    """Merge fine-tuned ``experts`` (task -> state dict) of ``base`` with the method ``spec``.

    Hyperparameters come from the spec string and ``hparams`` (keyword wins) and are used
    as given; missing ones take the method's default. No validation search happens here,
    and specs that need data (refiners such as ``+atm``) are refused: use the runner.
    Task vectors are computed parameter by parameter, on the tensors' device.
    """
    method, values, scale = _resolve(spec, hparams)
    vectors = DifferenceTaskVectors(base, experts)  # each τ_t computed per parameter
    delta = merged_task_vector(method, base, vectors, values, seed)
    return combine(base, delta, scale, consume=True)


def merge_per_task(
    spec: str,
    base: Mapping[str, Tensor],
    experts: Mapping[str, Mapping[str, Tensor]],
    seed: int = 0,
    **hparams: Any,
) -> dict[str, dict[str, Tensor]]:
    """Task -> its own model, for a method that keeps one model per task (``emr``,
    ``tall_masks``: a shared merged vector and per-task masks or rescalers); as
    :func:`merge` otherwise (no search, data-free specs only)."""
    method, values, scale = _resolve(spec, hparams, per_task=True)
    vectors = DifferenceTaskVectors(base, experts)
    shared, state = merged_with_state(method, base, vectors, values, seed)
    return {
        task: combine(
            base, task_vector(method, base, vectors, shared, values, state, task, seed), scale
        )
        for task in experts
    }


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise checkpoints.CheckpointError(
            f"device {name!r} is not a torch device (valid: cpu, cuda, cuda:N)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise checkpoints.CheckpointError(f"device {name!r}: no CUDA device (valid here: cpu)")
    if device.type not in ("cpu", "cuda"):
        raise checkpoints.CheckpointError(f"device {name!r}: valid are cpu, cuda, cuda:N")
    return device


@contextmanager
def _threads(device: torch.device, count: int) -> Iterator[None]:
    """torch (and the kernels, which follow it) on ``count`` threads while merging on the
    CPU: the streaming loop's operations run on blocks of a few MiB, too small for a
    parallel region to pay for its synchronisation, and on a busy machine every region
    waits for its slowest thread (measured: 11x slower with 2 threads than with 1 on 2
    loaded cores). The parallelism is the read-ahead thread's instead."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def task_names(models: Sequence[str]) -> list[str]:
    """Each expert's task name: its folder's (or hub id's) last part, numbered where two
    share one. DARE's masks are seeded by it, so the same names give the same merge."""
    names = [Path(m.partition("@")[0].rstrip("/")).name or m for m in models]
    return [
        f"{name}-{names[:i].count(name) + 1}" if names.count(name) > 1 else name
        for i, name in enumerate(names)
    ]


class _WrittenDelta(Mapping[str, Tensor]):
    """What ``method.finish`` sees of a merge already written out: parameter ``key`` is a
    float32 tensor of NaN, and the entries finish assigns in it (TIES' tie-break) are
    combined with the base as :func:`combine` does and written over the output when the
    next parameter is asked for (:meth:`flush`). A finish that *reads* the merged vector
    cannot run out of core."""

    def __init__(
        self,
        writer: checkpoints.CheckpointWriter,
        base: checkpoints.CheckpointReader,
        scale: float,
    ):
        self._writer, self._base, self._scale = writer, base, scale
        self._open: tuple[str, Tensor] | None = None

    def __getitem__(self, key: str) -> Tensor:
        self.flush()
        shape, device = self._writer.layout[key][1], self._base.device
        self._open = (key, torch.full(shape, math.nan, device=device))
        return self._open[1]

    def __iter__(self):
        return iter(self._writer.layout)

    def __len__(self) -> int:
        return len(self._writer.layout)

    def flush(self) -> None:
        if self._open is None:
            return
        key, edits = self._open
        self._open = None
        where = (~edits.isnan()).view(-1).nonzero().squeeze(1)
        if len(where):
            theta = self._writer.read(key)
            value = edits.view(-1)[where] * self._scale
            value += self._base[key].view(-1)[where]
            theta.view(-1)[where.cpu()] = value.to(theta.dtype).cpu()
            self._writer.write(key, theta)


class _WriteBehind:
    """θ = θ0 + λ·Δ of each merged parameter cast and written in a thread while the next
    parameter merges (the cast and the write cost about as much as the merge itself).
    One parameter is written at a time: :meth:`submit` waits for the previous one, so at
    most two merged parameters are in memory."""

    def __init__(self, writer: checkpoints.CheckpointWriter, scale: float):
        self._writer, self._scale = writer, scale
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending: Future | None = None

    def __enter__(self) -> _WriteBehind:
        return self

    def __exit__(self, *_: object) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown()

    def _write(self, key: str, base: Tensor, delta: Tensor) -> None:
        merged = combine({key: base}, {key: delta}, self._scale, consume=True)
        self._writer.write(key, merged[key])

    def submit(self, key: str, base: Tensor, delta: Tensor) -> None:
        self.wait()
        self._pending = self._pool.submit(self._write, key, base, delta)

    def wait(self) -> None:
        """Until the last parameter submitted is written (its error raised here)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()


def merge_checkpoints(
    spec: str,
    base: str,
    experts: Sequence[str],
    out: Path,
    *,
    device: str = "cpu",
    seed: int = 0,
    shard_size: str = DEFAULT_SHARD,
    **hparams: Any,
) -> list[Path]:
    """Merge Hugging Face checkpoints (folders or hub ids, safetensors) into ``out``.

    Equals :func:`merge` on the same tensors, with the experts named by
    :func:`task_names`, but holds one parameter (a block of rows for the elementwise
    methods) per model at a time: a model larger than the machine's memory merges. The
    output has the base's dtypes, shards of at most ``shard_size`` and the base's config
    and tokenizer files; ``atmbench_merge.json`` records the inputs.
    """
    method, values, scale = _resolve(spec, hparams)
    shard_bytes = checkpoints.parse_size(shard_size)
    where = _device(device)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise checkpoints.CheckpointError(f"--out {out} exists and is not an empty folder")
    if not experts:
        raise checkpoints.CheckpointError("no experts given: pass --experts A,B,...")
    folders = [checkpoints.resolve(m) for m in (base, *experts)]
    base_model = checkpoints.CheckpointReader(folders[0], where)
    names = task_names(experts)
    readers = [checkpoints.CheckpointReader(f, where) for f in folders[1:]]
    tuned = dict(zip(names, readers, strict=True))
    vectors = DifferenceTaskVectors(base_model, tuned)
    shapes = {k: base_model.rows(k, None) for k in base_model}  # meta: nothing read
    with _threads(where, 1):
        state = prepare(method, shapes, vectors, values, seed)
    layout = {k: (e.dtype, e.shape) for k, e in base_model.entries.items()}
    writer = checkpoints.CheckpointWriter(out, layout, shard_bytes, {"merged_by": "atmbench"})
    order = block_order(method, shapes, vectors)
    try:
        with (
            ReadAhead(vectors, order) as ahead,
            _threads(where, 1),
            _WriteBehind(writer, scale) as behind,
        ):
            for key, delta in merged_parameters(method, base_model, ahead, values, state, seed):
                behind.submit(key, base_model[key], delta)  # the base tensor just read
                del delta
        if method.finish:
            written = _WrittenDelta(writer, base_model, scale)
            method.finish(state, written)
            written.flush()
    except BaseException:
        writer.abort()  # the merge's own error, not the tensors it left unwritten
        raise
    files = writer.close()
    checkpoints.copy_extras(folders[0], out)
    record = {
        "spec": spec,
        "hparams": dict(values, **({method.scale.name: scale} if method.scale else {})),
        "seed": seed,
        "base": base,
        "experts": dict(zip(names, experts, strict=True)),
    }
    (out / "atmbench_merge.json").write_text(json.dumps(record, indent=2) + "\n")
    return files
