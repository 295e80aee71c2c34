"""A conformance kit for refiners: what every refiner must do, checked on a toy benchmark.

A refiner needs data, so the kit brings a benchmark small enough to train on in a blink
(:class:`ToyBenchmark`: two 3-class tasks on 4-d inputs, a two-layer MLP backbone, frozen
linear heads). The checks call ``refiner.refine`` with a :class:`~atmbench.refiner.RefineRequest`
built the way the runner builds one, after a merge (``from_base=False``) and, for refiners
that can start from θ0 (``data_from_base``), alone::

    from atmbench.testing import check_refiner

    def test_my_refiner_conforms():
        check_refiner("my_refiner", hparams={"steps": 2})
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from atmbench import hparams as hp
from atmbench import registry
from atmbench.finetune import Recipe, TrainStats, state_on_cpu
from atmbench.heads import Classifier
from atmbench.method import DATA_ACCESS, InMemoryTaskVectors
from atmbench.metrics import ACCURACY, Metric
from atmbench.plugins import NAME_RE
from atmbench.refiner import Refiner, RefineRequest, RefineResult
from atmbench.testing.methods import (
    Check,
    ConformanceError,
    ConformanceSkip,
    _clone,
    _equal,
    run_checks,
)

State = dict[str, Tensor]


class ToyBenchmark:
    """A benchmark small enough for a test: two tasks, an MLP encoder, linear heads.

    It implements the :class:`~atmbench.suite.Benchmark` protocol: what a refiner may use.
    """

    suite, model, fingerprint = "toy2", "mlp", "toy2-mlp"
    tasks = ("a", "b")
    num_workers = 0
    device = torch.device("cpu")

    def __init__(self, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self._base = state_on_cpu(self._build(gen))
        self._heads: dict[str, nn.Module] = {}
        self._data: dict[tuple[str, str], TensorDataset] = {}
        for task in self.tasks:
            head = nn.Linear(5, 3, bias=False)
            head.weight.data = torch.randn(3, 5, generator=gen)
            self._heads[task] = head.requires_grad_(False)
            teacher = torch.randn(4, 3, generator=gen)
            for split, size in (("train", 12), ("val", 8), ("test", 8)):
                x = torch.randn(size, 4, generator=gen)
                self._data[task, split] = TensorDataset(x, (x @ teacher).argmax(-1))

    @staticmethod
    def _build(gen: torch.Generator | None = None) -> nn.Module:
        encoder = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5))
        if gen is not None:
            for p in encoder.parameters():
                p.data = torch.randn(p.shape, generator=gen) * 0.5
        return encoder

    def base_state(self) -> State:
        return {k: v.clone() for k, v in self._base.items()}

    def backbone(self, state: Mapping[str, Tensor] | None = None) -> nn.Module:
        encoder = self._build()
        encoder.load_state_dict(dict(self._base if state is None else state))
        return encoder

    def task_model(self, task: str, backbone: nn.Module, private: Any = None) -> Classifier:
        return Classifier(backbone, self._heads[task])

    def metrics(self, task: str) -> tuple[Metric, ...]:
        return (ACCURACY,)

    def dataset(self, task: str, split: str) -> TensorDataset:
        return self._data[task, split]

    def recipe(self, task: str) -> Recipe:
        return Recipe(epochs=1, lr=0.05, batch_size=4, schedule="constant", warmup_steps=0)


@dataclass(frozen=True)
class RefinerSubject:
    """A refiner under test with the hyperparameters it runs with (every declared one)."""

    refiner: Refiner
    hparams: Mapping[str, Any]
    benchmark: Callable[[], Any] = ToyBenchmark
    registered_as: str | None = None

    def request(
        self, from_base: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32
    ) -> RefineRequest:
        """A request as the runner makes it: after a merge (``start`` is θ0 moved by a fixed
        perturbation standing in for a merged task vector), or from θ0 alone."""
        bench = self.benchmark()
        base = {k: v.to(dtype) for k, v in bench.base_state().items()}
        gen = torch.Generator().manual_seed(99)
        start = {
            k: (v.float() + 0.1 * torch.randn(v.shape, generator=gen)).to(dtype)
            for k, v in base.items()
        }
        vectors = {  # the experts' task vectors the stand-in merge came from
            task: {k: 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
            for task in bench.tasks
        }
        return RefineRequest(
            benchmark=bench,
            base=base,
            start=dict(base) if from_base else start,
            method=None,
            method_hparams={},
            hparams=dict(self.hparams),
            seed=seed,
            progress=False,
            from_base=from_base,
            vectors=None if from_base else InMemoryTaskVectors(vectors),
        )

    @property
    def what(self) -> str:
        return f"refiner {self.refiner.name!r}"

    def refine(self, request: RefineRequest) -> RefineResult:
        return self.refiner.refine(request)


def refiner_subject(
    refiner: Refiner | str,
    hparams: Mapping[str, Any] | None = None,
    benchmark: Callable[[], Any] = ToyBenchmark,
) -> RefinerSubject:
    """Resolve a refiner (or its registered name) and its hyperparameters (defaults filled)."""
    registered = registry.refiners()
    if isinstance(refiner, str):
        if refiner not in registered:
            valid = ", ".join(sorted(registered))
            raise ConformanceError(f"refiner {refiner!r} is not registered (registered: {valid})")
        refiner = registered[refiner]
    if not isinstance(refiner, Refiner):
        raise ConformanceError(f"expected a Refiner or a name, got {type(refiner).__name__}")
    given = hp.resolve(refiner.hparams, hparams or {}, refiner.name)
    name = refiner.name if registered.get(refiner.name) is refiner else None
    return RefinerSubject(refiner, hp.defaults(refiner.hparams, given), benchmark, name)


# ---------------------------------------------------------------- the checks


def _fail(message: str) -> None:
    raise ConformanceError(message)


def _valid_result(result: Any, request: RefineRequest, what: str) -> None:
    """A RefineResult whose state has ``start``'s keys, shapes and dtypes, finite; stats per
    task; a trace of JSON-serialisable records (the store keeps it as JSON)."""
    if not isinstance(result, RefineResult):
        _fail(f"{what}: refine returned a {type(result).__name__}, expected a RefineResult")
    state, ref = result.state, request.start
    if not isinstance(state, dict) or list(state) != list(ref):
        _fail(f"{what}: the state's keys differ from the start's")
    for k, v in state.items():
        if not isinstance(v, Tensor) or v.shape != ref[k].shape or v.dtype != ref[k].dtype:
            got = f"{v.dtype} {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__
            _fail(f"{what}: state[{k!r}] is {got}, expected {ref[k].dtype} {tuple(ref[k].shape)}")
        if v.is_floating_point() and not torch.isfinite(v).all():
            _fail(f"{what}: state[{k!r}] holds NaN or inf values")
    tasks = set(request.benchmark.tasks)
    if not isinstance(result.stats, dict) or not set(result.stats) <= tasks:
        _fail(f"{what}: stats must map task names {sorted(tasks)} to TrainStats")
    if not all(isinstance(s, TrainStats) for s in result.stats.values()):
        _fail(f"{what}: stats values must be TrainStats (steps and examples spent)")
    try:
        json.dumps(result.trace)
    except (TypeError, ValueError) as exc:
        _fail(f"{what}: the trace is not JSON-serialisable ({exc}); the store keeps it as JSON")
    if not isinstance(result.trace, list) or not all(isinstance(r, dict) for r in result.trace):
        _fail(f"{what}: the trace must be a list of dicts, one record per iteration")


def check_registration(s: RefinerSubject) -> None:
    """A valid name, data-access classes, a description, and declared hyperparameters."""
    r = s.refiner
    if not NAME_RE.match(r.name):
        _fail(f"name {r.name!r} must match {NAME_RE.pattern}")
    if r.data not in DATA_ACCESS:
        _fail(f"data={r.data!r} is not one of {', '.join(DATA_ACCESS)}")
    if r.data_from_base is not None and r.data_from_base not in DATA_ACCESS:
        _fail(f"data_from_base={r.data_from_base!r} is not None or one of {DATA_ACCESS}")
    if not callable(r.refine):
        _fail("refine must be callable")
    if not r.description:
        _fail("description is empty: 'atmbench list' shows it")
    names = [h.name for h in r.hparams if isinstance(h, hp.HParam)]
    if len(names) != len(r.hparams) or not all(n.isidentifier() for n in names):
        _fail("hyperparameters must be HParams with identifiers for names")
    if len(set(names)) != len(names):
        _fail(f"hyperparameter names repeat: {names}")
    if s.registered_as is not None:
        source = registry.registered_refiners()[s.registered_as].source
        if not source.package or not source.version:
            _fail(f"registered without a package name and version: {source}")


def check_result(s: RefinerSubject) -> None:
    """Refining a merged model returns a valid RefineResult shaped like the start."""
    request = s.request()
    _valid_result(s.refine(request), request, "after a merge")


def check_from_base(s: RefinerSubject) -> None:
    """A refiner that declares ``data_from_base`` also works alone, from θ0."""
    if s.refiner.data_from_base is None:
        raise ConformanceSkip("the refiner declares data_from_base=None: it cannot start at θ0")
    request = s.request(from_base=True)
    _valid_result(s.refine(request), request, "from the base")


def check_dtypes(s: RefinerSubject) -> None:
    """A bfloat16 model comes back in bfloat16 (the runner stores what it gets)."""
    request = s.request(dtype=torch.bfloat16)
    _valid_result(s.refine(request), request, "from bfloat16 inputs")


def check_no_mutation(s: RefinerSubject) -> None:
    """The base, the start and the hyperparameters are left untouched."""
    request = s.request()
    before = _clone({"base": request.base, "start": request.start})
    hparams = dict(request.hparams)
    s.refine(request)
    for part in ("base", "start"):
        if not _equal(getattr(request, part), before[part]):
            _fail(f"refining modified its input ({part}) in place")
    if dict(request.hparams) != hparams:
        _fail("refining modified request.hparams")


def check_deterministic(s: RefinerSubject) -> None:
    """The same request and seed give bit-identical states (seed every random draw)."""
    first = s.refine(s.request(seed=3)).state
    if not _equal(first, s.refine(s.request(seed=3)).state):
        _fail("two refinements with seed 3 differ: derive all randomness from request.seed")


REFINER_CHECKS: tuple[Check, ...] = tuple(
    Check(fn.__name__.removeprefix("check_"), fn)
    for fn in (
        check_registration,
        check_result,
        check_from_base,
        check_dtypes,
        check_no_mutation,
        check_deterministic,
    )
)
"""Every refiner check, in order; parametrize a pytest test over it for one item per check."""


def check_refiner(
    refiner: Refiner | str,
    hparams: Mapping[str, Any] | None = None,
    benchmark: Callable[[], Any] = ToyBenchmark,
) -> dict[str, str]:
    """Run every refiner check; raise one :class:`ConformanceError` listing all failures.

    ``benchmark`` builds the benchmark the refiner runs on (default :class:`ToyBenchmark`).
    Returns check name -> ``"passed"`` or ``"skipped: <reason>"``.
    """
    s = refiner_subject(refiner, hparams, benchmark)
    return run_checks(REFINER_CHECKS, s, s.what)
