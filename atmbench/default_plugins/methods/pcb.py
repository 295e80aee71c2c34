"""PCB-Merging, Parameter Competition Balancing (Du et al., NeurIPS 2024, arXiv 2410.02396).

Every entry of every task vector gets a weight from how it competes within its own task
(intra-balancing) and with the other tasks (inter-balancing); only the top fraction ``ratio``
of each task's weights survive, and the merged task vector is the weighted average of the
(clipped) task vectors, scaled by λ:

1. Clip: |τ_t| is clamped to its own [q, 1 − q] quantiles over the whole model,
   τ̃_t = sign(τ_t)·clamp(|τ_t|) (q = ``clip``).
2. Intra: exp(T·m_t²), m_t = clamp(|τ_t|) min-max normalised over the whole model.
3. Inter: tanh(τ_t ⊙ Σ_s τ_s).
4. Drop and rescale: β_t = intra ⊙ inter is clamped from below at its own (1 − ratio)
   quantile and min-max normalised, so the bottom entries get weight 0 and the top ``ratio``
   fall in (0, 1].
5. τ_m = Σ_t β̂_t τ̃_t / max(Σ_t β̂_t, 1e-12); θ = θ0 + λ τ_m (0 where no task survives).

Follows the official generic function (duguodong7/pcb-merging @5897888,
``pcb-merging.py::PCB_merge``, which the README names as the method's definition),
checked in ``tests/data/golden/pcb*.safetensors``:

- Quantiles and min-max ranges are per task over every floating-point entry of the model
  (the code flattens the whole state dict), as order statistics: the (int(d·q))-th and
  (int(d(1 − q)) − 1)-th smallest |τ| for the clip, the int(d(1 − ratio))-th smallest β_t for
  the drop (0-based, d entries). ``prepare`` computes them exactly, one task in memory at a time.
- λ multiplies every task vector before the weighted average (``pcb.py``: ``lams`` 1.2 for
  every task), which is λ times the average: it is the final coefficient here.
- Defaults: ratio 0.05 and λ 1.2, the vision scripts' values (``vision_source_code/pcb.py``;
  the generic function's own default ratio is 0.1). Search space: ratio ∈ {0.05, 0.1, 0.2}
  (``run_merging.sh``'s 5, 10 and 20 %) and λ ∈ 0.8 … 1.3 (the range the evolution-strategy
  variant ``pcb_ES.py`` searches per task), on a grid of 0.1.

Departures:

- The official vision scripts differ from the generic function: ``vision_source_code/pcb.py``
  clips at the 1 % quantiles (``clip=0.01`` here) and takes the inter term against the sum
  of the *normalised* task vectors; ``pcb_ES.py`` sums tanh(n_t ⊙ n_s) over s. Only the
  generic inter term is offered; the paper's softmax form is not what any released file runs.
- λ is one value for all tasks, searched on validation like every scaled method, where
  ``pcb_ES.py`` optimises one λ per task with nevergrad on validation.
- A degenerate min-max range (every clipped |τ| of a task equal, or every kept β equal)
  divides by zero in the official code (NaN); here the normalised values are 0 for the
  magnitudes and 1 for the kept weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from atmbench.hookspecs import hookimpl
from atmbench.hparams import HParam
from atmbench.method import MergeMethod, TaskVectors, TensorContext, sum_tasks
from atmbench.streaming import floating_keys

RATIO = HParam(
    "ratio",
    default=0.05,
    search=(0.05, 0.1, 0.2),
    low=0.0,
    high=1.0,
    open_low=True,
    help="fraction of each task's entries kept by their balancing weight (the rest get 0)",
)
CLIP = HParam(
    "clip",
    default=1e-4,
    low=0.0,
    high=0.5,
    open_high=True,
    help="each task's |τ| is clamped to its [clip, 1 − clip] quantiles over the model",
)
LAMBDA = HParam(
    "lam",
    default=1.2,
    search=(0.8, 0.9, 1.0, 1.1, 1.2, 1.3),
    low=0.0,
    help="scaling coefficient of the balanced average of the task vectors",
)


@dataclass(frozen=True)
class PcbState:
    """Per task ``[T]``: the clip range of |τ_t| and the drop range of β_t."""

    low: Tensor
    high: Tensor
    floor: Tensor
    top: Tensor


def _unit(x: Tensor, low: Tensor, high: Tensor, degenerate: float) -> Tensor:
    """(clamp(x, low, high) − low) / (high − low), ``degenerate`` where high == low."""
    span = high - low
    if float(span) <= 0:
        return torch.full_like(x, degenerate)
    return (x.clamp(low, high) - low) / span


def _balance(tau: Tensor, total: Tensor, low: Tensor, high: Tensor, tasks: int) -> Tensor:
    """β_t = exp(T·m_t²) ⊙ tanh(τ_t ⊙ Σ_s τ_s), m_t the clipped |τ_t| min-max normalised."""
    intra = torch.exp(tasks * _unit(tau.abs(), low, high, 0.0) ** 2)
    return intra * torch.tanh(tau * total)


def _order_statistics(values: Tensor, indices: tuple[int, ...]) -> list[Tensor]:
    """The ``indices``-th smallest entries (0-based) of a flat float32 tensor, exactly. On the
    CPU by partitioning ``values`` in place (its order is lost): no copy of a model-sized
    buffer, where ``kthvalue`` (used on other devices) copies its input."""
    if values.device.type != "cpu":
        return [values.kthvalue(i + 1).values.cpu() for i in indices]
    array = values.numpy()
    array.partition(indices)
    return [torch.tensor(array[i]) for i in indices]


def _sum(vectors: TaskVectors, key: str) -> Tensor:
    """Σ_s τ_s of one parameter, summed in task order as the merge sums a block."""
    tensors = [vectors.get(t, key).float() for t in vectors.tasks]
    return sum_tasks(tensors, torch.empty(tensors[0].shape))


def prepare(vectors: TaskVectors, seed: int, ratio: float, clip: float, **_: object) -> PcbState:
    """One model-sized float32 buffer besides Σ_s τ_s: each task's |τ_t|, then its β_t,
    written parameter by parameter into it and partitioned in place for the order statistics
    (β_t's elementwise terms are computed per parameter, as the merge computes them)."""
    keys = floating_keys(vectors)
    tasks = len(vectors.tasks)
    total = {k: _sum(vectors, k) for k in keys}
    stats = {name: torch.zeros(tasks) for name in ("low", "high", "floor", "top")}
    d = sum(t.numel() for t in total.values())
    if d == 0:
        return PcbState(**stats)
    buffer = torch.empty(d, device=next(iter(total.values())).device)
    for i, task in enumerate(vectors.tasks):
        for key, part in _slices(buffer, total):
            torch.abs(vectors.get(task, key).float().reshape(-1), out=part)
        low, high = _order_statistics(buffer, (int(d * clip), int(d * (1 - clip) - 1)))
        for key, part in _slices(buffer, total):
            tau = vectors.get(task, key).float().reshape(-1)
            part.copy_(_balance(tau, total[key].reshape(-1), low, high, tasks))
        stats["low"][i], stats["high"][i] = low, high
        stats["top"][i] = buffer.max()
        (stats["floor"][i],) = _order_statistics(buffer, (min(int(d * (1 - ratio)), d - 1),))
    return PcbState(**stats)


def _slices(buffer: Tensor, shapes: dict[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
    """(key, the key's flat slice of ``buffer``), in the order of ``shapes``."""
    start = 0
    for key, tensor in shapes.items():
        yield key, buffer[start : start + tensor.numel()]
        start += tensor.numel()


def pcb(
    base: Tensor, task_vectors: Tensor, ctx: TensorContext, ratio: float, clip: float
) -> Tensor:
    state: PcbState = ctx.state
    tasks = len(task_vectors)
    total = sum_tasks(task_vectors, ctx.scratch.empty("total", task_vectors.shape[1:]))
    weighted = torch.zeros_like(total)
    weights = torch.zeros_like(total)
    for i, tau in enumerate(task_vectors):
        low, high = state.low[i], state.high[i]
        beta = _balance(tau, total, low, high, tasks)
        kept = _unit(beta, state.floor[i], state.top[i], 1.0) * (beta >= state.floor[i])
        weighted += kept * (tau.sign() * tau.abs().clamp(low, high))
        weights += kept
    return weighted / weights.clamp(min=1e-12)


@hookimpl
def register_methods(register):
    register(
        MergeMethod(
            name="pcb",
            merge=pcb,
            data="none",
            rowwise=True,
            hparams=(RATIO, CLIP),
            scale=LAMBDA,
            prepare=prepare,
            description="PCB-Merging: intra/inter-task balancing weights, drop, weighted mean",
        )
    )
