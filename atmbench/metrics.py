"""Task metrics: predictions and references in, a score in percent out.

Accuracy for classification, Matthews correlation for CoLA, Spearman correlation for
STS-B (GLUE's own choices), exact match of generated answers for text-to-text tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[[Sequence, Sequence], float]

    def __call__(self, predictions: Sequence, references: Sequence) -> float:
        if len(predictions) == 0:
            raise ValueError(f"cannot compute {self.name} on an empty dataset")
        if len(predictions) != len(references):
            raise ValueError(
                f"{self.name}: {len(predictions)} predictions for {len(references)} references"
            )
        return self.fn(predictions, references)


def _tensor(values: Sequence) -> Tensor:
    return values if isinstance(values, Tensor) else torch.as_tensor(values)


def _accuracy(predictions: Sequence, references: Sequence) -> float:
    correct = int((_tensor(predictions) == _tensor(references)).sum().item())
    return 100.0 * correct / len(references)


def _matthews(predictions: Sequence, references: Sequence) -> float:
    """Binary or multi-class MCC (Gorodkin's R_K, what scikit-learn computes), 0 when undefined."""
    p, r = _tensor(predictions).long(), _tensor(references).long()
    k = int(max(p.max(), r.max())) + 1
    confusion = torch.zeros(k, k, dtype=torch.float64)
    confusion.index_put_((r, p), torch.ones(len(r), dtype=torch.float64), accumulate=True)
    t, q = confusion.sum(1), confusion.sum(0)
    n, c = confusion.sum(), confusion.trace()
    denominator = ((n * n - (q * q).sum()) * (n * n - (t * t).sum())).sqrt()
    return 0.0 if denominator == 0 else float(100.0 * (c * n - (t * q).sum()) / denominator)


def _ranks(x: Tensor) -> Tensor:
    """Ranks from 1, ties getting their mean rank."""
    x = x.double()
    order = x.argsort()
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    values, inverse = x.unique(return_inverse=True)
    sums = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(values), dtype=torch.float64).index_add_(
        0, inverse, torch.ones_like(x)
    )
    return (sums / counts)[inverse]


def _spearman(predictions: Sequence, references: Sequence) -> float:
    a, b = _ranks(_tensor(predictions)), _ranks(_tensor(references))
    a, b = a - a.mean(), b - b.mean()
    denominator = (a.square().sum() * b.square().sum()).sqrt()
    return 0.0 if denominator == 0 else float(100.0 * (a * b).sum() / denominator)


def _exact_match(predictions: Sequence, references: Sequence) -> float:
    """Generated answers equal to the reference, after stripping surrounding whitespace."""
    pairs = zip(predictions, references, strict=True)
    same = sum(str(p).strip() == str(r).strip() for p, r in pairs)
    return 100.0 * same / len(references)


ACCURACY = Metric("accuracy", _accuracy)
MATTHEWS = Metric("matthews", _matthews)
SPEARMAN = Metric("spearman", _spearman)
EXACT_MATCH = Metric("exact_match", _exact_match)
