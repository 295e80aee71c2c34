"""The fused kernels' math in torch, for tensors that live on another device than the CPU.

:mod:`atmbench.kernels` compiles its loops for the CPU with Numba and reads tensors by
address, so a GPU tensor must never reach it: each public kernel is wrapped by
:func:`routed`, which sends calls with tensors elsewhere (a GPU) here, and CPU calls too
while the kernels are still compiling in the background. These functions take the same
arguments and give the same float32 values as the kernels, step for step (the same
products, sums in task order, IEEE divisions by tensors), and DARE draws the same masks:
SplitMix64 in wrapping int64 arithmetic, with logical shifts. Counts, thresholds and flags
come back on the CPU, as the kernels return them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

_U64 = 1 << 64


def dare_denominator(p: float) -> np.float32:
    """DARE's rescale denominator 1 − p in float32: the one place it is computed, so that
    every kernel (Numba's in :mod:`atmbench.kernels` and these) divides by the same value.
    Rounded from the float64 difference, as ``τ / (1.0 - p)`` on a float32 tensor does
    (FusionBench's ``div_(1 - p)``); ``np.float32(1) - np.float32(p)`` differs from it for
    414 of p = 0.001 … 0.999, 0.9 among them."""
    return np.float32(1.0 - p)


def _signed(value: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    value %= _U64
    return value - _U64 if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def elsewhere(value: object) -> bool:
    """True for a tensor (or a sequence holding one) that is not on the CPU."""
    if isinstance(value, Tensor):
        return value.device.type != "cpu"
    if isinstance(value, (list, tuple)):
        return any(isinstance(v, Tensor) and v.device.type != "cpu" for v in value)
    return False


def routed(compiled: Callable[[], bool]) -> Callable[[Callable], Callable]:
    """Wrap a public kernel: calls whose first argument or ``out`` is off the CPU, or that
    come while ``compiled()`` says the CPU kernels are not ready yet, run the torch function
    of the same name in this module instead (the same values, so which one ran never shows
    in a result)."""

    def wrap(kernel: Callable) -> Callable:
        @functools.wraps(kernel)
        def call(*args, **kwargs):
            if (args and elsewhere(args[0])) or elsewhere(kwargs.get("out")) or not compiled():
                return globals()[kernel.__name__](*args, **kwargs)
            return kernel(*args, **kwargs)

        return call

    return wrap


def _shift(z: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 bit patterns (``>>`` on int64 is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def bits24(seed: int, first: int, count: int, device: torch.device | str = "cpu") -> Tensor:
    """The top 24 bits of SplitMix64's outputs ``first … first + count − 1`` of the stream of
    ``seed`` (int64): what :func:`atmbench.kernels.uniform` scales by 2⁻²⁴."""
    z = torch.arange(first + 1, first + 1 + count, dtype=torch.int64, device=device)
    z = z * _GOLDEN + _signed(seed)
    z = (z ^ _shift(z, 30)) * _MIX1
    z = (z ^ _shift(z, 27)) * _MIX2
    return _shift(z ^ _shift(z, 31), 40)


def uniform(seed: int, offset: int, count: int) -> Tensor:
    """:func:`atmbench.kernels.uniform`: the same float32 uniforms, on the CPU."""
    return bits24(seed, offset, count).float() * 2.0**-24


def _dropped(values: Tensor, seed: int, first: int, p: float, survivors: Tensor) -> Tensor:
    """τ ⊙ (u > p) / (1 − p) of one task's values (any shape), u from entry ``first`` of
    the stream of ``seed``: the kernels' ``_dropped``."""
    cut = int(np.float64(p) * 16777216.0)
    keep = (bits24(seed, first, values.numel(), values.device) > cut).view(values.shape)
    return values.float() * keep / survivors


def _survivors(value: np.float32, device: torch.device) -> Tensor:
    # A 1-element tensor, not a Python number: division by a scalar may multiply by its
    # reciprocal, which is not the kernels' IEEE division.
    return torch.tensor([value], dtype=torch.float32, device=device)


def dare(
    task_vectors: Tensor | Sequence[Tensor],
    seeds: list[int],
    offset: int,
    p: float,
    out: Tensor | None = None,
) -> Tensor:
    """:func:`atmbench.kernels.dare` in torch."""
    device = task_vectors[0].device
    survivors = _survivors(dare_denominator(p), device)
    if out is None:
        out = torch.empty(len(task_vectors), *task_vectors[0].shape, device=device)
    for t, tv in enumerate(task_vectors):
        out[t] = _dropped(tv, seeds[t], offset, p, survivors)
    return out


def ties_merge(
    task_vectors: Tensor | Sequence[Tensor],
    thresholds: Tensor,
    majority: float,
    mean: bool,
    out: Tensor | None = None,
    drop: tuple[list[int], int, float] | None = None,
    consensus: tuple[float, int] | None = None,
) -> tuple[Tensor, int, int]:
    """:func:`atmbench.kernels.ties_merge` in torch."""
    device = task_vectors[0].device
    values = [tv.float() for tv in task_vectors]
    if drop:
        seeds, offset, p = drop
        survivors = _survivors(dare_denominator(p), device)
        values = [_dropped(v, s, offset, p, survivors) for v, s in zip(values, seeds, strict=True)]
    limits = thresholds.float().to(device)
    kept = [v.abs() >= limits[t] for t, v in enumerate(values)]
    total = torch.zeros(values[0].shape, device=device)
    for v, keep in zip(values, kept, strict=True):
        total += v * keep
    sign = torch.sign(total)
    direction = sign + (1.0 if majority > 0 else -1.0) * (sign == 0)
    picked = torch.zeros_like(total)
    count = torch.zeros_like(total)
    for v, keep in zip(values, kept, strict=True):
        agree = (keep & (v * direction > 0)).float()
        picked += v * agree
        count += agree
    merged = picked / count.clamp(min=1.0) if mean else picked
    if consensus:
        lam, agree_count = consensus
        merged = _consensus(values, merged, np.float32(lam), agree_count)
    votes = int((total > 0).sum()) - int((total < 0).sum())
    undecided = int(((total == 0) & (count > 0)).sum())
    if out is None:
        return merged, votes, undecided
    out.copy_(merged)
    return out, votes, undecided


def _consensus(values: Sequence[Tensor], merged: Tensor, lam, agree: int) -> Tensor:
    votes = torch.zeros_like(merged)
    for v in values:
        votes += v.abs() > float(lam) * (merged - v).abs()
    return merged * (votes >= agree)


def consensus(
    task_vectors: Tensor | Sequence[Tensor],
    merged: Tensor,
    lam: float,
    agree: int,
    out: Tensor | None = None,
) -> Tensor:
    """:func:`atmbench.kernels.consensus` in torch."""
    values = [tv.float() for tv in task_vectors]
    result = _consensus(values, merged.float(), np.float32(lam), agree)
    return result if out is None else out.copy_(result)


def bracket_counts(
    values: Tensor,
    lo: float,
    hi: float,
    below: Tensor,
    kept: Tensor,
    filled: Tensor,
    drop: tuple[int, float] | None = None,
) -> None:
    """:func:`atmbench.kernels.bracket_counts` in torch (the accumulators stay on the CPU)."""
    flat = values.detach().float().reshape(-1)
    if drop:
        seed, p = drop
        flat = _dropped(flat, seed, 0, p, _survivors(dare_denominator(p), flat.device))
    magnitudes = flat.abs()
    low, high = float(np.float32(lo)), float(np.float32(hi))
    parts = kept.shape[0]
    step = (magnitudes.numel() + parts - 1) // parts
    for part in range(parts):
        piece = magnitudes[part * step : (part + 1) * step]
        below[part] += int((piece < low).sum())
        inside = piece[(piece >= low) & (piece <= high)].cpu()
        start = int(filled[part])
        space = max(0, kept.shape[1] - start)  # past it only the count grows, as in the kernel
        kept[part, start : start + min(space, inside.numel())] = inside[:space]
        filled[part] += inside.numel()


def radix_counts(
    values: Tensor, prefix: int, counts: Tensor, drop: tuple[int, float] | None = None
) -> None:
    """:func:`atmbench.kernels.radix_counts` in torch (the counts stay on the CPU)."""
    flat = values.detach().float().reshape(-1)
    if drop:
        seed, p = drop
        flat = _dropped(flat, seed, 0, p, _survivors(dare_denominator(p), flat.device))
    bits = flat.view(torch.int32) & 0x7FFFFFFF  # |x|, as the kernel reads it
    parts, bins = counts.shape
    step = (bits.numel() + parts - 1) // parts
    for part in range(parts):
        piece = bits[part * step : (part + 1) * step]
        if prefix >= 0:
            piece = piece[(piece >> 16) == prefix] & 0xFFFF
        else:
            piece = piece >> 16
        counts[part] += torch.bincount(piece, minlength=bins).cpu()


def kth_smallest(magnitudes: Tensor, counts: Tensor, ranks: Tensor) -> Tensor:
    """:func:`atmbench.kernels.kth_smallest` in torch (``[T]`` float32 on the CPU)."""
    out = torch.empty(magnitudes.shape[0])
    for t in range(magnitudes.shape[0]):
        values = magnitudes[t, : int(counts[t])].float()
        out[t] = torch.kthvalue(values.cpu(), int(ranks[t])).values
    return out


def band_sum(
    task_vectors: Tensor | Sequence[Tensor], start: int, stop: int, out: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """:func:`atmbench.kernels.band_sum` in torch: each row's band bounds by ``topk``."""
    shape = task_vectors[0].shape
    cols = shape[-1]
    device = task_vectors[0].device
    total = torch.zeros(shape, device=device) if out is None else out.zero_()
    rows_total = total.view(-1, cols)
    repeats = torch.zeros(rows_total.shape[0], dtype=torch.bool, device=device)
    for tv in task_vectors:
        rows = tv.float().reshape(-1, cols)
        magnitudes = rows.abs()
        top = magnitudes.topk(stop, dim=1).values  # descending
        upper, lower = top[:, start : start + 1], top[:, stop - 1 : stop]
        rows_total += rows * ((magnitudes >= lower) & (magnitudes <= upper))
        above = (magnitudes > upper).sum(1)
        at_least = (magnitudes >= lower).sum(1)
        repeats |= (upper[:, 0] > 0) & (above != start)
        repeats |= (lower[:, 0] > 0) & (at_least != stop)
    return total, repeats.view(shape[:-1])
