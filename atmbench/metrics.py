"""Task metrics: predictions and references in, a score in percent out.

Accuracy for classification, Matthews correlation for CoLA, Spearman and Pearson
correlation for STS-B (GLUE's own choices), exact match of generated answers for
text-to-text tasks, and character accuracy as their partial-credit companion.
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


def _pearson(predictions: Sequence, references: Sequence) -> float:
    a, b = _tensor(predictions).double(), _tensor(references).double()
    a, b = a - a.mean(), b - b.mean()
    denominator = (a.square().sum() * b.square().sum()).sqrt()
    return 0.0 if denominator == 0 else float(100.0 * (a * b).sum() / denominator)


def _spearman(predictions: Sequence, references: Sequence) -> float:
    """Pearson correlation of the ranks."""
    return _pearson(_ranks(_tensor(predictions)), _ranks(_tensor(references)))


def _exact_match(predictions: Sequence, references: Sequence) -> float:
    """Generated answers equal to the reference, after stripping surrounding whitespace."""
    pairs = zip(predictions, references, strict=True)
    same = sum(str(p).strip() == str(r).strip() for p, r in pairs)
    return 100.0 * same / len(references)


def _char_accuracy(predictions: Sequence, references: Sequence) -> float:
    """Per answer, the share of positions where the generation has the reference's character
    (over the longer of the two, so a missing or an extra character counts as wrong);
    the mean over answers. Partial credit that exact match does not give: it shows a merge
    moving towards the answers before whole answers come out right."""

    def share(p: str, r: str) -> float:
        p, r = p.strip(), r.strip()
        longer = max(len(p), len(r))
        return 1.0 if longer == 0 else sum(a == b for a, b in zip(p, r, strict=False)) / longer

    pairs = zip(predictions, references, strict=True)
    return 100.0 * sum(share(str(p), str(r)) for p, r in pairs) / len(references)


ACCURACY = Metric("accuracy", _accuracy)
MATTHEWS = Metric("matthews", _matthews)
SPEARMAN = Metric("spearman", _spearman)
PEARSON = Metric("pearson", _pearson)
EXACT_MATCH = Metric("exact_match", _exact_match)
CHAR_ACCURACY = Metric("char_accuracy", _char_accuracy)
