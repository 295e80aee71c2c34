"""Data statistics that data-using merge methods declare in ``MergeMethod.needs``.

The runner computes them per task on that task's expert and hands them to the method,
stacked over tasks, parameter by parameter: methods stay pure tensor functions.
A statistic is ``fn(bench, encoder, task, seed) -> {parameter name: tensor}``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from atmbench.suite import Benchmark

Statistic = Callable[[Benchmark, nn.Module, str, int], dict[str, Tensor]]

STATISTICS: dict[str, Statistic] = {}


def compute(
    name: str, bench: Benchmark, encoder: nn.Module, task: str, seed: int
) -> dict[str, Tensor]:
    if name not in STATISTICS:
        valid = ", ".join(sorted(STATISTICS)) or "none"
        raise ValueError(f"unknown data statistic {name!r} (valid: {valid})")
    return STATISTICS[name](bench, encoder, task, seed)
