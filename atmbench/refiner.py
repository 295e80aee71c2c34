"""The refiner contract: improve a merged model with data, e.g. ATM's tune/merge loop."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from atmbench.finetune import TrainStats
from atmbench.hparams import HParam
from atmbench.method import DATA_ACCESS, MergeMethod, TaskVectors
from atmbench.suite import Benchmark

TRACE = ("val",)
"""The splits traced per iteration unless ``--trace test`` asks for the test curve too."""
TRACE_CHOICES = {"val": ("val",), "test": ("val", "test")}
"""``--trace`` values and the splits each traces."""


@dataclass
class RefineRequest:
    """What a refiner gets. ``method`` is ``None`` unless a merge method produced ``start``."""

    benchmark: Benchmark
    base: dict[str, Tensor]
    start: dict[str, Tensor]
    method: MergeMethod | None
    method_hparams: Mapping[str, Any]
    hparams: Mapping[str, Any]
    seed: int
    progress: bool = True
    from_base: bool = False
    """True when the refiner is the whole method (``atm`` alone): start from θ0, read
    its ``data_from_base`` split; False when it refines ``start`` (``METHOD+atm``)."""
    private: Mapping[str, Mapping[str, Tensor]] = field(default_factory=dict)
    """task -> the private parameters that go with ``start`` (the experts'); a task
    missing starts from its initial ones."""
    vectors: TaskVectors | None = None
    """The experts' task vectors that ``method`` merged (read a parameter at a time), for
    refiners that rescale a merge by them (LiNeS); ``None`` when no method ran."""
    trace: tuple[str, ...] = TRACE
    """Splits a refiner that keeps a per-iteration trace scores after every iteration:
    validation (what a user selects on); ``--trace test`` adds the test curve."""


@dataclass
class RefineResult:
    state: dict[str, Tensor]
    stats: dict[str, TrainStats] = field(default_factory=dict)
    """Compute per task."""
    trace: list[dict[str, Any]] = field(default_factory=list)
    """One record per iteration (scores, task-vector cosines, ...)."""
    private: dict[str, dict[str, Tensor]] | None = None
    """task -> private parameters that go with ``state``; None: the request's are kept."""
    resolved: dict[str, Any] = field(default_factory=dict)
    """Hyperparameters whose given value stood for a default resolved at run time (ATM's
    ``iterations=0``), as they ran: stored with the cell's hyperparameters as
    ``REFINER.NAME``, so that a row says what actually ran."""


@dataclass(frozen=True)
class Refiner:
    """A registered refiner.

    ``data`` is what it reads when refining a merged model; ``data_from_base`` what it
    reads when it is the whole method (``atm`` alone), or ``None`` if it cannot start there.
    """

    name: str
    refine: Callable[[RefineRequest], RefineResult]
    data: str
    data_from_base: str | None = None
    hparams: tuple[HParam, ...] = ()
    description: str = ""
    version: str = "1"

    def __post_init__(self) -> None:
        for value in (self.data, self.data_from_base):
            if value is not None and value not in DATA_ACCESS:
                raise ValueError(
                    f"refiner {self.name!r}: data access {value!r} is invalid, expected one of "
                    + ", ".join(DATA_ACCESS)
                )
