"""ATM on a tiny fake benchmark: equals TA when it runs once, exact compute, no train reads."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

import atmbench
from atmbench import analysis, executors, plots, registry, runner
from atmbench import hparams as hp
from atmbench.default_plugins.refiners import atm
from atmbench.executors.local import execute_local, run_local
from atmbench.finetune import Recipe, finetune, state_on_cpu
from atmbench.heads import Classifier
from atmbench.hookspecs import hookimpl
from atmbench.metrics import ACCURACY
from atmbench.refiner import TRACE_CHOICES, RefineRequest, RefineResult
from atmbench.seeds import derive
from atmbench.store import ResultStore
from atmbench.suite import Suite

RECIPE = Recipe(epochs=2, lr=0.05, batch_size=4, schedule="constant", warmup_steps=0)
SIZES = {"a": 10, "b": 7, "c": 4}
"""Train examples per task: 10 and 7 drop the last partial batch, 4 is one full batch."""


class FakeBenchmark:
    """Three tasks of 3 classes on 4-d inputs; a 2-layer MLP encoder; frozen linear heads."""

    suite, model, fingerprint = "fake3", "mlp", "fake3-mlp"
    tasks = tuple(SIZES)
    device = torch.device("cpu")

    def __init__(self, recipe: Recipe = RECIPE):
        self._recipe = recipe
        self._base = state_on_cpu(self._build(torch.Generator().manual_seed(0)))
        self._heads, self._data = {}, {}
        for index, (task, n) in enumerate(SIZES.items()):
            g = torch.Generator().manual_seed(10 + index)
            head = nn.Linear(5, 3, bias=False)
            head.weight.data = torch.randn(3, 5, generator=g)
            self._heads[task] = head.requires_grad_(False)
            teacher = torch.randn(4, 3, generator=g)
            for split, size in (("train", n), ("val", 5), ("test", 6)):
                x = torch.randn(size, 4, generator=g)
                self._data[task, split] = TensorDataset(x, (x @ teacher).argmax(-1))

    @staticmethod
    def _build(generator: torch.Generator | None = None) -> nn.Module:
        encoder = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5))
        if generator is not None:
            for p in encoder.parameters():
                p.data = torch.randn(p.shape, generator=generator) * 0.5
        return encoder

    def base_state(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self._base.items()}

    def backbone(self, state: dict[str, Tensor] | None = None) -> nn.Module:
        encoder = self._build()
        encoder.load_state_dict(self._base if state is None else state)
        return encoder

    def task_model(self, task: str, backbone: nn.Module, private=None) -> Classifier:
        return Classifier(backbone, self._heads[task])

    def metrics(self, task: str):
        return (ACCURACY,)

    def dataset(self, task: str, split: str) -> TensorDataset:
        return self._data[task, split]

    def recipe(self, task: str) -> Recipe:
        return self._recipe


class Spy(FakeBenchmark):
    """Records every (task, split) whose dataset is asked for."""

    def __init__(self):
        super().__init__()
        self.reads: list[tuple[str, str]] = []

    def dataset(self, task: str, split: str) -> TensorDataset:
        self.reads.append((task, split))
        return super().dataset(task, split)


def _refine(bench, start=None, method=None, trace=("val",), **fixed) -> RefineResult:
    base = bench.base_state()
    request = RefineRequest(
        benchmark=bench,
        base=base,
        start=base if start is None else start,
        method=method,
        method_hparams={},
        hparams=hp.defaults(atm.HPARAMS, fixed),
        seed=7,
        progress=False,
        from_base=start is None and method is None,
        trace=trace,
    )
    return atm.refine(request)


def test_merge_step_moves_by_alpha_times_the_mean():
    current = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor([3])}
    vectors = [{"w": torch.tensor([2.0, 0.0])}, {"w": torch.tensor([0.0, 4.0])}]
    assert torch.equal(atm.merge_step(current, vectors, 1.0)["w"], torch.tensor([2.0, 4.0]))
    merged = atm.merge_step(current, vectors, 0.5)
    assert torch.equal(merged["w"], torch.tensor([1.5, 3.0]))
    assert torch.equal(merged["n"], torch.tensor([3]))  # not a task-vector key: kept


def test_gram_and_cosines_flatten_over_all_tensors():
    # a = ([1, 0], [0]), b = ([1, 1], [0]), c = 0: |a| = 1, |b| = √2, cos(a, b) = 1/√2
    vectors = [
        {"w": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0])},
        {"w": torch.tensor([1.0, 1.0]), "b": torch.tensor([0.0])},
        {"w": torch.tensor([0.0, 0.0]), "b": torch.tensor([0.0])},
    ]
    inner = atm.gram(vectors)
    assert torch.equal(inner[:2, :2], torch.tensor([[1.0, 1.0], [1.0, 2.0]], dtype=torch.float64))
    cos = atm.cosines(inner)
    expected = [[1.0, 1 / math.sqrt(2), 0.0], [1 / math.sqrt(2), 1.0, 0.0], [0.0, 0.0, 1.0]]
    assert torch.allclose(cos, torch.tensor(expected, dtype=torch.float64))


def test_default_iterations_are_the_ceiling_of_the_largest_task_budget():
    """Not one per epoch of every task: vision8's SUN397 (76 epochs) sets 76 rounds, and
    SVHN (4 epochs) tunes 4/76 of an epoch per round."""
    recipes = {
        "sun397": Recipe(epochs=76, lr=1e-5, batch_size=128),
        "svhn": Recipe(epochs=4, lr=1e-5, batch_size=128),
    }
    plan = atm.make_plan(recipes, hp.defaults(atm.HPARAMS, {}))
    assert plan.iterations == 76 and plan.epochs == {"sun397": 1.0, "svhn": 4 / 76}


def test_plan_defaults_to_the_recipe_and_one_iteration_per_epoch():
    recipe = Recipe(epochs=2.5, lr=1e-3, batch_size=64, warmup_steps=10)
    plan = atm.make_plan({"a": recipe}, hp.defaults(atm.HPARAMS, {}))
    assert plan.iterations == 3 and plan.epochs == {"a": 2.5 / 3}
    assert plan.recipes["a"] == dataclasses.replace(recipe, schedule="constant", warmup_steps=0)
    given = hp.defaults(atm.HPARAMS, {"budget": 4.0, "iterations": 2, "lr": 0.1, "batch_size": 8})
    plan = atm.make_plan({"a": recipe}, given)
    assert (plan.iterations, plan.epochs["a"]) == (2, 2.0)
    assert (plan.recipes["a"].lr, plan.recipes["a"].batch_size) == (0.1, 8)


def test_one_iteration_from_the_base_is_task_arithmetic_with_lambda_one_over_t():
    """Reference experts are finetune() calls with ATM's seeds derive(seed, 'atm', 1, task)."""
    bench = FakeBenchmark()
    result = _refine(bench, iterations=1)
    experts = {}
    for task in bench.tasks:
        encoder = bench.backbone()
        finetune(
            bench.task_model(task, encoder),
            bench.dataset(task, "train"),
            RECIPE,
            seed=derive(7, "atm", 1, task),
            progress=False,
        )
        experts[task] = state_on_cpu(encoder)
    expected = atmbench.merge("ta", bench.base_state(), experts, lam=1 / 3)
    assert expected.keys() == result.state.keys()
    for key, value in expected.items():
        assert torch.allclose(result.state[key], value, atol=1e-6), key
    assert not torch.allclose(result.state["0.weight"], bench.base_state()["0.weight"])


def test_steps_and_examples_are_counted_exactly():
    # 3 epochs in 2 iterations = 1.5 epochs each; batches per epoch ceil(n/4) = 3, 2, 1;
    # Recipe.steps rounds half to even: round(4.5) = 4, round(3.0) = 3, round(1.5) = 2.
    result = _refine(FakeBenchmark(), iterations=2, budget=3.0)
    assert {t: s.steps for t, s in result.stats.items()} == {"a": 8, "b": 6, "c": 4}
    # every batch holds 4 examples: 10 and 7 drop their partial batch, 4 is one full batch
    assert {t: s.examples for t, s in result.stats.items()} == {"a": 32, "b": 24, "c": 16}
    assert [r["steps"] for r in result.trace[1:]] == [{"a": 4, "b": 3, "c": 2}] * 2


def test_refinement_never_reads_train_and_starts_from_the_merge():
    spy = Spy()
    ta = registry.methods()["ta"]
    start = {k: v + 0.01 for k, v in spy.base_state().items()}
    result = _refine(spy, start=start, method=ta, iterations=2, budget=2.0)
    assert ("a", "train") not in spy.reads and {s for _, s in spy.reads} == {"val"}
    # val: 5 examples, batch 4 -> 2 batches per epoch, 1 epoch per iteration, 2 iterations
    assert {t: s.steps for t, s in result.stats.items()} == {"a": 4, "b": 4, "c": 4}
    first = result.trace[0]["accuracy"]
    assert first == atm._scores(spy, start, {}, ["val"])  # record 0 is METHOD's merge, not θ0
    spy.reads.clear()
    _refine(spy, iterations=1, budget=1.0)
    assert {(t, "train") for t in spy.tasks} <= set(spy.reads)


def test_trace_scores_test_only_when_asked():
    """Validation after every round; test only with ``--trace test``; the same final model."""
    plain, traced = Spy(), Spy()
    default = _refine(plain, iterations=3, budget=3.0)
    curve = _refine(traced, iterations=3, budget=3.0, trace=("val", "test"))
    assert not [r for r in plain.reads if r[1] == "test"]
    assert sorted(r for r in traced.reads if r[1] == "test") == [
        (t, "test")
        for t in sorted(SIZES)
        for _ in range(4)  # records 0..3
    ]
    assert all(set(r["accuracy"]) == {"val"} for r in default.trace)
    assert all(set(r["accuracy"]) == {"val", "test"} for r in curve.trace)
    assert [r["accuracy"]["val"] for r in default.trace] == [
        r["accuracy"]["val"] for r in curve.trace
    ]
    assert all(torch.equal(default.state[k], v) for k, v in curve.state.items())


def test_trace_has_one_record_per_iteration_with_valid_cosines():
    result = _refine(FakeBenchmark(), iterations=3, budget=3.0, trace=("val", "test"))
    trace = json.loads(json.dumps(result.trace))  # as stored in the result store
    assert [r["iteration"] for r in trace] == [0, 1, 2, 3]
    for record in trace:
        for split in ("val", "test"):
            assert set(record["accuracy"][split]) == set(SIZES)
            assert all(0 <= a <= 100 for a in record["accuracy"][split].values())
    for record in trace[1:]:
        cos = torch.tensor(record["cosine"])
        assert cos.shape == (3, 3)
        assert torch.equal(cos.diagonal(), torch.ones(3)) and torch.equal(cos, cos.T)
        assert cos.abs().max() <= 1.0
        assert all(n > 0 for n in record["norms"].values())


def test_analysis_summarises_and_draws_a_hand_made_trace(tmp_path):
    acc = {"val": {"a": 50.0, "b": 70.0}, "test": {"a": 40.0, "b": 60.0}}
    trace = analysis.parse_trace(
        json.dumps(
            [
                {"iteration": 0, "accuracy": acc},
                {
                    "iteration": 1,
                    "tasks": ["a", "b"],
                    "accuracy": acc,
                    "norms": {"a": 3.0, "b": 5.0},
                    "cosine": [[1.0, 0.25], [0.25, 1.0]],
                },
            ]
        )
    )
    table = analysis.summary(trace)
    assert table.loc[0, "test"] == 50.0 and math.isnan(table.loc[0, "cosine"])
    assert (table.loc[1, "val"], table.loc[1, "norm"], table.loc[1, "cosine"]) == (60.0, 4.0, 0.25)
    for path in (
        analysis.plot_accuracy(trace, tmp_path / "acc.png", split="val"),
        analysis.plot_cosines(trace, tmp_path / "cos.png"),
    ):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(analysis.TraceError, match="not an ATM trace"):
        analysis.parse_trace([{"traceback": "..."}])
    with pytest.raises(analysis.TraceError, match="valid: val, test"):
        analysis.plot_accuracy(trace, tmp_path / "x.png", split="train")


def test_runner_stores_compute_and_a_trace_that_analysis_reads(register, home, tmp_path):
    class Plugin:
        @hookimpl
        def register_suites(self, register):
            register(Suite("fake3", FakeBenchmark.tasks, ("mlp",), lambda m, h, d: Spy()))

    with register(Plugin(), "fake3"):
        cells = runner.plan("fake3", None, ["ta:lam=0.3", "atm:iterations=2", "ta+atm"], [0])
        store = ResultStore(tmp_path / "results.sqlite")
        ws = runner.Workspace(home, torch.device("cpu"), progress=False)
        summary = run_local(cells, store, ws)
    assert not summary.failed
    rows = store.cells().set_index("method")
    # atm from the base at the default budget spends exactly the experts' compute
    assert rows.loc["atm:iterations=2", "steps"] == rows.loc["experts", "steps"] == 6 + 4 + 2
    assert rows.loc["atm:iterations=2", "data_access"] == "train"
    assert rows.loc["ta+atm", "data_access"] == "validation"
    # ta+atm: the experts' compute plus 2 iterations x 2 val batches per task
    assert rows.loc["ta+atm", "steps"] == 12 + 3 * 4
    trace = analysis.parse_trace(rows.loc["ta+atm", "trace"])
    assert len(trace) == 3 and len(trace[-1]["cosine"]) == 3
    assert set(trace[-1]["accuracy"]) == {"val"} and math.isnan(analysis.summary(trace).test[2])
    assert plots.trace_curves({"ta+atm": [trace]}) == {}  # no test curve was asked for
    # --trace test (Options.trace, through the local executor): the test curve is stored
    traced = ResultStore(tmp_path / "traced.sqlite")
    options = executors.Options(home, "cpu", False, trace=TRACE_CHOICES["test"])
    with register(Plugin(), "fake3"):
        refined = [c for c in cells if c.method == "ta+atm"]
        executors.run_grid(refined, traced, execute_local, options)
    curve = analysis.parse_trace(traced.cells().set_index("method").loc["ta+atm", "trace"])
    assert all(set(r["accuracy"]) == {"val", "test"} for r in curve)
    assert len(plots.trace_curves({"ta+atm": [curve]})["ta+atm"]) == 3
    assert [r["accuracy"]["val"] for r in curve] == [r["accuracy"]["val"] for r in trace]
    # the iterations that ran are stored with the cell, the resolved default too
    for method in ("atm:iterations=2", "ta+atm"):
        stored = rows.loc[method, "hparams"]
        stored = json.loads(stored) if isinstance(stored, str) else stored
        assert stored["atm.iterations"] == 2


def test_cli_trace_option_reaches_the_refiner(register, home, tmp_path):
    from click.testing import CliRunner

    from atmbench.cli import cli

    class Plugin:
        @hookimpl
        def register_suites(self, register):
            register(Suite("fake3", FakeBenchmark.tasks, ("mlp",), lambda m, h, d: Spy()))

    args = ["run", "--suite", "fake3", "--methods", "atm:iterations=2", "--no-mtl", "--quiet"]
    with register(Plugin(), "fake3"):
        for option, store in (([], "val"), (["--trace", "test"], "test")):
            path = str(tmp_path / f"{store}.sqlite")
            result = CliRunner().invoke(cli, [*args, *option, "--store", path])
            assert result.exit_code == 0, result.output
            rows = ResultStore(path).cells().set_index("method")
            trace = json.loads(rows.loc["atm:iterations=2", "trace"])
            assert {s for r in trace for s in r["accuracy"]} == {"val", store}
        bad = CliRunner().invoke(cli, [*args, "--trace", "train"])
    assert bad.exit_code == 2 and "Invalid value for '--trace'" in bad.output
    assert "'val', 'test'" in bad.output
