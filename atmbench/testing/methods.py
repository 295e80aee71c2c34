"""A conformance kit for merge methods: what every method must do, checked on tiny tensors.

A plugin author runs it in their own tests; atmbench runs it over every registered method.
All at once (one failure message listing every broken rule)::

    from atmbench.testing import check_method

    def test_my_method_conforms():
        check_method("my_method", hparams={"steps": 3})

or one pytest item per check::

    import pytest
    from atmbench.testing import CHECKS, run_pytest, subject

    @pytest.mark.parametrize("check", CHECKS, ids=str)
    def test_conformance(check):
        run_pytest(check, subject("my_method"))

The checks use only the public API (:func:`atmbench.merge`,
:func:`atmbench.streaming.merged_task_vector`, :class:`~atmbench.method.InMemoryTaskVectors`,
:func:`~atmbench.method.combine`), i.e. the runner's code path. Methods that declare
``needs`` get synthetic statistics: those of :mod:`atmbench.statistics` are faked on the
miniature model (``fisher``: positive tensors shaped like the parameters; ``gram`` and
``gram_rows``: positive definite input Gram matrices), others come from the ``statistics``
argument; without one, the checks that merge are skipped with the reason. Methods that
learn their state from a benchmark (``adapt``, e.g. AdaMerging's coefficients) get it from
the ``learned`` argument, ``factory(base, tasks) -> state``; without one, likewise.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

import atmbench
from atmbench import hparams as hp
from atmbench import registry
from atmbench.finetune import task_vector
from atmbench.method import DATA_ACCESS, InMemoryTaskVectors, MergeInputError, MergeMethod, combine
from atmbench.plugins import NAME_RE
from atmbench.streaming import BLOCK, merged_task_vector

State = dict[str, Tensor]
StatisticFactory = Callable[[Mapping[str, Tensor], tuple[str, ...]], Mapping[str, Tensor]]
"""``factory(base, tasks) -> {parameter: statistic stacked over tasks [T, ...]}``."""
StateFactory = Callable[[Mapping[str, Tensor], tuple[str, ...]], Any]
"""``factory(base, tasks) -> the state an adapt method would have learned``."""

SHAPES: dict[str, tuple[int, ...]] = {
    "conv1.weight": (4, 3, 2, 2),
    "class_embedding": (4,),
    "positional_embedding": (5, 4),
    "transformer.resblocks.0.attn.in_proj_weight": (12, 4),
    "transformer.resblocks.0.attn.in_proj_bias": (12,),
    "transformer.resblocks.0.mlp.c_fc.weight": (8, 4),
    "transformer.resblocks.0.mlp.c_proj.weight": (4, 8),
    "ln_post.weight": (4,),
    "proj": (4, 3),
}
"""A miniature open_clip image encoder: 1-D, 2-D (tall and wide) and 4-D tensors."""

LINEAR = tuple(k for k in SHAPES if k.startswith("transformer.") and k.endswith("weight"))
"""The miniature's weights applied as y = x Wᵀ (``nn.Linear`` layout [out, in])."""
ROWS = ("proj",)
"""The miniature's weights applied as y = x W ([in, out])."""

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class ConformanceError(AssertionError):
    """A method breaks a rule of the merge-method contract; the message says which."""


class ConformanceSkip(Exception):
    """A check cannot run for this method (e.g. unknown data statistics); the reason says why."""


def fisher_like(base: Mapping[str, Tensor], tasks: tuple[str, ...]) -> dict[str, Tensor]:
    """Positive float32 tensors shaped like each floating-point parameter, stacked over tasks."""
    gen = torch.Generator().manual_seed(1)
    return {
        k: torch.rand((len(tasks), *b.shape), generator=gen) + 0.1
        for k, b in base.items()
        if b.is_floating_point()
    }


def _spd(tasks: int, size: int, gen: torch.Generator) -> Tensor:
    """``tasks`` random symmetric positive definite matrices, like XᵀX / rows."""
    x = torch.randn(tasks, 2 * size, size, generator=gen)
    return x.transpose(1, 2) @ x / (2 * size) + 0.1 * torch.eye(size)


def gram_like(base: Mapping[str, Tensor], tasks: tuple[str, ...]) -> dict[str, Tensor]:
    """Input Gram matrices [T, in, in] of the miniature's weights applied as y = x Wᵀ."""
    gen = torch.Generator().manual_seed(2)
    return {k: _spd(len(tasks), base[k].shape[1], gen) for k in LINEAR if k in base}


def gram_rows_like(base: Mapping[str, Tensor], tasks: tuple[str, ...]) -> dict[str, Tensor]:
    """Input Gram matrices [T, in, in] of the miniature's weights applied as y = x W."""
    gen = torch.Generator().manual_seed(3)
    return {k: _spd(len(tasks), base[k].shape[0], gen) for k in ROWS if k in base}


SYNTHETIC_STATISTICS: dict[str, StatisticFactory] = {
    "fisher": fisher_like,
    "gram": gram_like,
    "gram_rows": gram_rows_like,
}
"""The statistics of :mod:`atmbench.statistics`, faked on the miniature model."""


def sample_model(
    dtype: torch.dtype = torch.float32, tasks: int = 3, seed: int = 0
) -> tuple[State, dict[str, State]]:
    """θ0 ~ N(0, 1) and experts θ0 + τ_t with τ_t ~ N(0, 0.1²), cast to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(shape, generator=gen) for k, shape in SHAPES.items()}
    experts = {
        f"task{t}": {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        for t in range(tasks)
    }
    cast = {k: v.to(dtype) for k, v in base.items()}
    return cast, {t: {k: v.to(dtype) for k, v in s.items()} for t, s in experts.items()}


@dataclass(frozen=True)
class Subject:
    """A method under test with the hyperparameters it runs with (every declared one)."""

    method: MergeMethod
    hparams: Mapping[str, Any]
    statistics: Mapping[str, StatisticFactory] = field(default_factory=dict)
    registered_as: str | None = None
    """The registry name when the method is registered (enables the public-API check)."""
    learned: StateFactory | None = None

    @property
    def what(self) -> str:
        return f"method {self.method.name!r}"

    def merge_hparams(self) -> dict[str, Any]:
        scale = self.method.scale
        return {k: v for k, v in self.hparams.items() if not (scale and k == scale.name)}

    def scale(self) -> float:
        scale = self.method.scale
        return float(self.hparams[scale.name]) if scale else 1.0

    def stats(self, base: Mapping[str, Tensor], tasks: tuple[str, ...]) -> dict | None:
        """The method's data statistics for these inputs, or a skip naming what is missing."""
        if not self.method.needs:
            return None
        factories = {**SYNTHETIC_STATISTICS, **self.statistics}
        missing = [n for n in self.method.needs if n not in factories]
        if missing:
            raise ConformanceSkip(
                f"method {self.method.name!r} needs data statistics {missing} that the kit "
                "cannot synthesise: pass statistics={name: factory(base, tasks)}"
            )
        return {n: dict(factories[n](base, tasks)) for n in self.method.needs}

    def state(self, base: Mapping[str, Tensor], tasks: tuple[str, ...]) -> Any:
        """What an ``adapt`` method learned for these inputs (None for other methods)."""
        if self.method.adapt is None:
            return None
        if self.learned is None:
            raise ConformanceSkip(
                f"method {self.method.name!r} learns its state from a benchmark (adapt): "
                "pass learned=factory(base, tasks)"
            )
        return self.learned(base, tasks)

    def merged(self, base: State, vectors: InMemoryTaskVectors, seed: int = 0) -> State:
        """The unscaled merged task vector of task vectors, on the runner's code path."""
        stats = self.stats(base, vectors.tasks)
        learned = self.state(base, vectors.tasks)
        return merged_task_vector(
            self.method, base, vectors, self.merge_hparams(), seed, stats, learned
        )

    def delta(self, base: State, experts: Mapping[str, State], seed: int = 0) -> State:
        """The unscaled merged task vector, on the runner's code path."""
        vectors = InMemoryTaskVectors({t: task_vector(s, base) for t, s in experts.items()})
        return self.merged(base, vectors, seed)

    def merge(self, base: State, experts: Mapping[str, State], seed: int = 0) -> State:
        """θ0 + scale · Δ, cast back to the base's dtypes."""
        return combine(base, self.delta(base, experts, seed), self.scale(), consume=True)


def subject(
    method: MergeMethod | str,
    hparams: Mapping[str, Any] | None = None,
    statistics: Mapping[str, StatisticFactory] | None = None,
    learned: StateFactory | None = None,
) -> Subject:
    """Resolve a method (or its registered name) and its hyperparameters (defaults filled)."""
    registered = registry.methods()
    if isinstance(method, str):
        if method not in registered:
            raise ConformanceError(
                f"method {method!r} is not registered (registered: {', '.join(sorted(registered))})"
            )
        method = registered[method]
    if not isinstance(method, MergeMethod):
        raise ConformanceError(f"expected a MergeMethod or a name, got {type(method).__name__}")
    given = hp.resolve(method.all_hparams(), hparams or {}, method.name)
    name = method.name if registered.get(method.name) is method else None
    defaults = hp.defaults(method.all_hparams(), given)
    return Subject(method, defaults, statistics or {}, name, learned)


# ---------------------------------------------------------------- the checks


def _fail(message: str) -> None:
    raise ConformanceError(message)


def _same_structure(out: Mapping[str, Tensor], ref: Mapping[str, Tensor], what: str) -> None:
    if not isinstance(out, dict):
        _fail(f"{what} is a {type(out).__name__}, expected a dict of tensors")
    if list(out) != list(ref):
        _fail(f"{what} has keys {sorted(out)[:4]}..., expected the base's {sorted(ref)[:4]}...")
    for k, v in out.items():
        if not isinstance(v, Tensor):
            _fail(f"{what}[{k!r}] is a {type(v).__name__}, expected a Tensor")
        if v.shape != ref[k].shape or v.dtype != ref[k].dtype:
            _fail(
                f"{what}[{k!r}] is {v.dtype} {tuple(v.shape)}, "
                f"expected {ref[k].dtype} {tuple(ref[k].shape)}"
            )
        if v.is_floating_point() and not torch.isfinite(v).all():
            _fail(f"{what}[{k!r}] holds NaN or inf values")


def _clone(tree: Any) -> Any:
    if isinstance(tree, Tensor):
        return tree.clone()
    return {k: _clone(v) for k, v in tree.items()}


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)


def check_registration(s: Subject) -> None:
    """A valid name, data-access class, hyperparameters its functions accept, a description."""
    m = s.method
    if not NAME_RE.match(m.name):
        _fail(f"name {m.name!r} must match {NAME_RE.pattern}")
    if m.data not in DATA_ACCESS:
        _fail(f"data={m.data!r} is not one of {', '.join(DATA_ACCESS)}")
    optional = (m.prepare, m.adapt)
    if not callable(m.merge) or any(f is not None and not callable(f) for f in optional):
        _fail("merge (and prepare or adapt, when given) must be callable")
    if not m.description:
        _fail("description is empty: 'atmbench list' shows it")
    if not isinstance(m.needs, tuple) or not all(isinstance(n, str) for n in m.needs):
        _fail(f"needs={m.needs!r} must be a tuple of statistic names")
    for h in m.all_hparams():
        if not isinstance(h, hp.HParam) or not h.name.isidentifier():
            _fail(f"hyperparameter {h!r} must be an HParam with an identifier for a name")
    values = s.merge_hparams()
    try:
        inspect.signature(m.merge).bind(None, None, None, **values)
        if m.prepare is not None:
            inspect.signature(m.prepare).bind(None, seed=0, **values)
        if m.adapt is not None:
            inspect.signature(m.adapt).bind(None, **values)
    except TypeError as exc:
        _fail(
            f"merge/prepare/adapt do not take the declared hyperparameters {sorted(values)}: {exc}"
        )
    if s.registered_as is not None:
        source = registry.registered_methods()[s.registered_as].source
        if not source.package or not source.version:
            _fail(f"registered without a package name and version: {source}")


def check_structure(s: Subject) -> None:
    """One and three tasks: a float32 Δ and a merged dict with the base's keys, shapes, dtypes."""
    for tasks in (1, 3):
        base, experts = sample_model(tasks=tasks)
        delta = s.delta(base, experts)
        _same_structure(delta, base, f"merged task vector ({tasks} task(s))")
        _same_structure(s.merge(base, experts), base, f"merged model ({tasks} task(s))")


def check_dtypes(s: Subject) -> None:
    """fp32, bf16 and fp16 inputs give outputs of the same dtype, finite."""
    for dtype in DTYPES:
        base, experts = sample_model(dtype)
        _same_structure(s.merge(base, experts), base, f"merged model from {dtype} inputs")


def check_no_mutation(s: Subject) -> None:
    """The base, the experts, the task vectors and the statistics are left untouched."""
    base, experts = sample_model()
    vectors = {t: task_vector(e, base) for t, e in experts.items()}
    stats = s.stats(base, tuple(experts))
    before = _clone({"base": base, "experts": experts, "vectors": vectors, "stats": stats or {}})
    s.merge(base, experts)
    s.merged(base, InMemoryTaskVectors(vectors))
    after = {"base": base, "experts": experts, "vectors": vectors, "stats": stats or {}}
    for part, tree in after.items():
        if not _equal(tree, before[part]):
            _fail(f"merging modified its input ({part}) in place")


def check_deterministic(s: Subject) -> None:
    """The same inputs and seed give bit-identical outputs (randomness via ctx.generator)."""
    base, experts = sample_model()
    for seed in (0, 7):
        if not _equal(s.merge(base, experts, seed), s.merge(base, experts, seed)):
            _fail(
                f"two merges with seed {seed} differ: "
                "draw randomness from ctx.generator() or ctx.uniform()"
            )


def check_no_experts(s: Subject) -> None:
    """merge(θ0, {}) is θ0, exactly."""
    base, _ = sample_model()
    merged = s.merge(base, {})
    _same_structure(merged, base, "merge of no experts")
    if not _equal(merged, base):
        _fail("merge(θ0, {}) differs from θ0")


def check_mismatched_inputs(s: Subject) -> None:
    """A missing or an extra parameter is a MergeInputError naming the task; task vectors
    whose parameter has another shape than the base's are one naming the parameter."""
    key = "transformer.resblocks.0.mlp.c_fc.weight"
    base, experts = sample_model()
    vectors = {t: task_vector(e, base) for t, e in experts.items()}
    missing = dict(experts, task1={k: v for k, v in experts["task1"].items() if k != key})
    extra = dict(experts, task1={**experts["task1"], "extra.w": torch.zeros(2)})
    misshapen = {t: {**v, key: torch.zeros(3, 3)} for t, v in vectors.items()}
    cases: dict[str, tuple[str, Callable[[], object]]] = {
        "a missing parameter": ("task1", lambda: s.merge(base, missing)),
        "an unexpected parameter": ("task1", lambda: s.merge(base, extra)),
        "misshapen task vectors": (key, lambda: s.merged(base, InMemoryTaskVectors(misshapen))),
    }
    for what, (named, attempt) in cases.items():
        try:
            attempt()
        except MergeInputError as exc:
            if named not in str(exc):
                _fail(f"the error for {what} does not name {named!r}: {exc}")
            continue
        except ConformanceSkip:
            raise
        except Exception as exc:  # noqa: BLE001 - any other failure is the finding
            _fail(f"{what} raised {type(exc).__name__}: {exc}, expected a MergeInputError")
        _fail(f"{what} was accepted, expected a MergeInputError")


def check_zero_task_vectors(s: Subject) -> None:
    """Experts equal to θ0 (τ = 0, e.g. a frozen layer) give finite outputs, not 0/0."""
    base, experts = sample_model()
    experts["task1"] = {k: v.clone() for k, v in base.items()}
    _same_structure(s.merge(base, experts), base, "merge with one zero task vector")
    unchanged = {t: {k: v.clone() for k, v in base.items()} for t in experts}
    _same_structure(s.merge(base, unchanged), base, "merge of experts all equal to θ0")


def check_public_api(s: Subject) -> None:
    """``atmbench.merge(name, ...)`` gives exactly what the kit's runner-path merge gives."""
    if s.registered_as is None:
        raise ConformanceSkip("the method is not registered")
    if s.method.needs:
        raise ConformanceSkip("atmbench.merge refuses methods that need data statistics")
    if s.method.adapt is not None:
        raise ConformanceSkip("atmbench.merge refuses methods that learn from data (adapt)")
    base, experts = sample_model()
    if s.method.per_task:  # one model per task: each from the shared merge and its τ_t
        models = atmbench.merge_per_task(s.registered_as, base, experts, seed=3, **s.hparams)
        for task, model in models.items():
            _same_structure(model, base, f"atmbench.merge_per_task's model of {task!r}")
        return
    merged = atmbench.merge(s.registered_as, base, experts, seed=3, **s.hparams)
    if not _equal(merged, s.merge(base, experts, seed=3)):
        _fail("atmbench.merge differs from merged_task_vector + combine")


ROWWISE_KEY = "transformer.resblocks.0.mlp.c_fc.weight"
ROWWISE_COLUMNS = 64
ROWWISE_BLOCKS = 4


def rowwise_model(tasks: int = 3, seed: int = 0) -> tuple[State, dict[str, State]]:
    """One [rows, 64] parameter that the streaming loop cuts into 4 row blocks, the last one
    short, whose rows' scales span e^-3 .. e^3: any statistic of the whole tensor (a norm,
    a quantile, a standard deviation) differs from the same statistic of one block."""
    step = max(1, BLOCK // ROWWISE_COLUMNS)
    rows = (ROWWISE_BLOCKS - 1) * step + step // 2 + 1
    gen = torch.Generator().manual_seed(seed)
    scale = torch.linspace(-3.0, 3.0, rows).exp()[:, None]
    base = {ROWWISE_KEY: torch.randn(rows, ROWWISE_COLUMNS, generator=gen)}
    experts = {
        f"task{t}": {
            k: v + 0.1 * scale * torch.randn(v.shape, generator=gen) for k, v in base.items()
        }
        for t in range(tasks)
    }
    return base, experts


def check_rowwise(s: Subject) -> None:
    """A method that declares ``rowwise=True`` merges a parameter that the loop cuts into
    row blocks exactly as it merges it whole (the claim the blocked loop relies on)."""
    if not s.method.rowwise:
        raise ConformanceSkip("the method does not declare rowwise=True")
    base, experts = rowwise_model()
    vectors = InMemoryTaskVectors({t: task_vector(e, base) for t, e in experts.items()})
    stats = s.stats(base, vectors.tasks)
    learned = s.state(base, vectors.tasks)
    hparams = s.merge_hparams()
    blocked = merged_task_vector(s.method, base, vectors, hparams, 5, stats, learned)[ROWWISE_KEY]
    whole_method = dataclasses.replace(s.method, rowwise=False)
    whole = merged_task_vector(whole_method, base, vectors, hparams, 5, stats, learned)
    whole = whole[ROWWISE_KEY]
    error = (blocked - whole).abs().max().item()
    if not error <= 1e-5 * max(whole.abs().max().item(), 1e-30):
        _fail(
            f"declares rowwise=True, but merging a {tuple(whole.shape)} parameter in "
            f"{ROWWISE_BLOCKS} row blocks differs from merging it whole by up to {error:.3g}: "
            "it uses more than its rows (e.g. a whole-tensor statistic); declare rowwise=False"
        )


@dataclass(frozen=True)
class Check:
    """One named rule, for a method's :class:`Subject` or a refiner's subject."""

    name: str
    run: Callable[[Any], None]

    def __call__(self, s: Subject) -> None:
        try:
            self.run(s)
        except ConformanceError as exc:
            raise ConformanceError(f"{s.what}, check {self.name}: {exc}") from None

    def __str__(self) -> str:
        return self.name


CHECKS: tuple[Check, ...] = tuple(
    Check(fn.__name__.removeprefix("check_"), fn)
    for fn in (
        check_registration,
        check_structure,
        check_dtypes,
        check_no_mutation,
        check_deterministic,
        check_no_experts,
        check_mismatched_inputs,
        check_zero_task_vectors,
        check_rowwise,
        check_public_api,
    )
)
"""Every check, in order; parametrize a pytest test over it for one item per check."""


def run_pytest(check: Check, s: Subject) -> None:
    """Run one check inside a pytest test: a :class:`ConformanceSkip` becomes a pytest skip."""
    import pytest

    try:
        check(s)
    except ConformanceSkip as exc:
        pytest.skip(f"{check.name}: {exc}")


def check_method(
    method: MergeMethod | str,
    hparams: Mapping[str, Any] | None = None,
    statistics: Mapping[str, StatisticFactory] | None = None,
) -> dict[str, str]:
    """Run every check; raise one :class:`ConformanceError` listing all failures.

    Returns check name -> ``"passed"`` or ``"skipped: <reason>"``.
    """
    s = subject(method, hparams, statistics)
    return run_checks(CHECKS, s, f"method {s.method.name!r}")


def run_checks(checks: Sequence[Check], s: Any, what: str) -> dict[str, str]:
    """Run ``checks`` on ``s``; raise one :class:`ConformanceError` listing all failures.

    Shared by the method and refiner kits. ``what`` names the subject in the message of a
    check that crashed. Returns check name -> ``"passed"`` or ``"skipped: <reason>"``.
    """
    outcome: dict[str, str] = {}
    failures: list[str] = []
    for check in checks:
        try:
            check(s)
        except ConformanceSkip as exc:
            outcome[check.name] = f"skipped: {exc}"
        except ConformanceError as exc:
            failures.append(str(exc))
        except Exception as exc:  # noqa: BLE001 - a crash is a failure of that check
            failures.append(f"{what}, check {check.name}: {type(exc).__name__}: {exc}")
        else:
            outcome[check.name] = "passed"
    if failures:
        raise ConformanceError("\n".join(failures))
    return outcome
