"""AdaMerging: the entropy step by hand, FusionBench's loop as a golden, labels never read."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.func import functional_call
from torch.utils.data import TensorDataset

import atmbench
from atmbench import registry
from atmbench.adapt import AdaptRequest, unlabeled_test_batches
from atmbench.default_plugins.methods import adamerging
from atmbench.generative import INPUTS, GenerativeTask, encode_example
from atmbench.method import DATA_ACCESS, FloatingOnly, InMemoryTaskVectors
from atmbench.spec import SpecError
from atmbench.streaming import merged_task_vector
from atmbench.suite import IGNORE
from atmbench.testing.refiners import ToyBenchmark

GOLDEN = Path(__file__).parent / "data" / "golden"


def test_entropy_is_the_mean_shannon_entropy_with_fusionbenchs_epsilon():
    # uniform over 4 classes: log 4; a certain prediction: about 0 (-1·log(1 + 1e-8))
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]])
    assert adamerging.entropy(logits[:1]).item() == pytest.approx(math.log(4), abs=1e-6)
    assert adamerging.entropy(logits).item() == pytest.approx(math.log(4) / 2, abs=1e-6)


def _one_logit_model(a: torch.Tensor, b: torch.Tensor):
    """Logits = θ with θ0 = a and one task vector b: θ(λ) = a + λ b."""
    base, vectors = {"z": a}, {"z": b[None]}

    def forward(params, step):
        return {"t": params["z"][None]}

    return base, vectors, forward


def test_first_step_moves_each_coefficient_by_lr_against_the_entropy_gradient():
    # logits (0.3, -0.3) at λ = 0.3 with τ = (1, -1): a larger λ separates the classes, the
    # entropy falls (dH/dλ < 0), so Adam's first step (m/√v = sign of the gradient) adds lr.
    base, vectors, forward = _one_logit_model(torch.zeros(2), torch.tensor([1.0, -1.0]))
    batches = iter(lambda: {"t": None}, 0)
    weights, losses = adamerging.learn(forward, base, vectors, ["t"], batches, 1, 0.01, 0.3, False)
    assert weights.tolist() == pytest.approx([0.31], abs=1e-7)
    p = torch.softmax(torch.tensor([0.3, -0.3]), 0)
    assert losses == pytest.approx([-(p * p.log()).sum().item()], abs=1e-6)
    # τ = (-1, 1) pulls the logits together instead: the coefficient falls
    base, vectors, forward = _one_logit_model(torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0]))
    weights, _ = adamerging.learn(forward, base, vectors, ["t"], batches, 1, 0.01, 0.3, False)
    assert weights.tolist() == pytest.approx([0.29], abs=1e-7)
    # zero steps: the coefficients stay at init (TA with λ = init)
    weights, _ = adamerging.learn(forward, base, vectors, ["t"], batches, 0, 0.01, 0.3, True)
    assert weights.tolist() == [[pytest.approx(0.3)]]


def _golden_inputs():
    raw = load_file(GOLDEN / "adamerging_inputs.safetensors")
    tasks = ("t0", "t1", "t2")
    encoder = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))
    # the module's parameter order, as FusionBench's layer-wise weights [T, P] count them
    base = {k: raw[f"base.{k}"] for k in encoder.state_dict()}
    vectors = {k: torch.stack([raw[f"tv.{t}.{k}"] for t in tasks]) for k in base}

    def forward(params, step):
        return {
            t: functional_call(encoder, params, (x,)) @ raw[f"head.{t}"].T for t, x in step.items()
        }

    def batches():
        for step in range(10):
            yield {t: raw[f"x.{step}.{t}"] for t in tasks}

    return base, vectors, tasks, forward, batches


@pytest.mark.parametrize("layerwise", [False, True], ids=["task_wise", "layer_wise"])
@pytest.mark.parametrize("steps", [1, 10])
def test_coefficients_match_fusionbench(layerwise, steps):
    """FusionBench's own test_time_adaptation on its merged-model wrappers (RECIPE.md)."""
    golden = load_file(GOLDEN / "adamerging.safetensors")
    expected = golden[f"{'layer_wise' if layerwise else 'task_wise'}.{steps}"]
    base, vectors, tasks, forward, batches = _golden_inputs()
    weights, _ = adamerging.learn(
        forward, base, vectors, tasks, batches(), steps, 0.05, 0.3, layerwise
    )
    assert weights.shape == expected.shape
    assert (weights - expected).abs().max().item() < 2e-6
    assert (expected - 0.3).abs().max() > 0.05 * steps / 2  # the coefficients really moved


class _RecordingToy(ToyBenchmark):
    """ToyBenchmark that records which splits were read and can relabel its test split."""

    def __init__(self, labels_seed: int | None = None):
        super().__init__()
        self.read: set[str] = set()
        if labels_seed is not None:
            gen = torch.Generator().manual_seed(labels_seed)
            for task in self.tasks:
                x, y = self._data[task, "test"].tensors
                self._data[task, "test"] = TensorDataset(
                    x, torch.randint(0, 3, y.shape, generator=gen)
                )

    def dataset(self, task, split):
        self.read.add(split)
        return super().dataset(task, split)


def _toy_request(bench: ToyBenchmark) -> AdaptRequest:
    base = bench.base_state()
    gen = torch.Generator().manual_seed(5)
    vectors = {
        t: {k: 0.5 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        for t in bench.tasks
    }
    return AdaptRequest(bench, base, FloatingOnly(InMemoryTaskVectors(vectors), base), seed=0)


@pytest.mark.parametrize("name", ["adamerging", "adamerging_layer"])
def test_labels_are_never_read_only_test_inputs(name):
    method = registry.methods()[name]
    hparams = {"steps": 5, "lr": 0.05, "init": 0.3, "batch_size": 3}
    states = []
    for labels_seed in (None, 1, 2):
        bench = _RecordingToy(labels_seed)
        result = method.adapt(_toy_request(bench), **hparams)
        assert bench.read == {"test"}
        states.append(result.state)
        # 5 steps x 2 tasks, batches of 3 from 8 test inputs (3, 3, 2, 3, 3): 14 per task
        assert (result.stats.steps, result.stats.examples) == (10, 28)
    for state in states[1:]:
        assert state.keys() == states[0].keys()
        assert all(torch.equal(state[k], states[0][k]) for k in state)
    moved = torch.stack(list(states[0].values()))
    assert (moved - 0.3).abs().max() > 0.01


def test_test_batches_blank_the_labels_and_reshuffle_every_pass():
    bench = ToyBenchmark()
    batches = unlabeled_test_batches(bench, "a", seed=0, batch_size=3)
    seen = [next(batches) for _ in range(6)]  # two passes over 8 inputs
    assert [len(b[0]) for b in seen] == [3, 3, 2, 3, 3, 2]
    assert all((b[1] == IGNORE).all() for b in seen)
    x = bench.dataset("a", "test").tensors[0]
    first, second = torch.cat([b[0] for b in seen[:3]]), torch.cat([b[0] for b in seen[3:]])
    key = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert key(first) == key(second) == key(x)
    assert not torch.equal(first, second)


def test_merge_is_the_learned_weighted_sum_and_zero_steps_is_ta():
    bench = ToyBenchmark()
    request = _toy_request(bench)
    method = registry.methods()["adamerging_layer"]
    hparams = {"steps": 0, "lr": 1e-3, "init": 0.3, "batch_size": 4}
    result = method.adapt(request, **hparams)
    delta = merged_task_vector(
        method, request.base, request.vectors, hparams, 0, None, result.state
    )
    ta = registry.methods()["ta"]
    summed = merged_task_vector(ta, request.base, request.vectors, {}, 0)
    assert all(torch.allclose(delta[k], 0.3 * summed[k], atol=1e-6) for k in delta)
    # learned coefficients are applied per parameter tensor and task
    state = {k: torch.tensor([0.5, -1.0]) * (i + 1) for i, k in enumerate(request.base)}
    delta = merged_task_vector(method, request.base, request.vectors, hparams, 0, None, state)
    for i, k in enumerate(request.base):
        expected = (i + 1) * (0.5 * request.vectors.get("a", k) - request.vectors.get("b", k))
        assert torch.allclose(delta[k], expected, atol=1e-6)


def test_needs_the_runner_and_one_prediction_per_example():
    with pytest.raises(SpecError, match="needs data"):
        atmbench.merge("adamerging", {"p": torch.zeros(1)}, {"a": {"p": torch.ones(1)}})
    method = registry.methods()["adamerging"]
    vectors = InMemoryTaskVectors({"a": {"p": torch.ones(1)}})
    with pytest.raises(ValueError, match="learns its state from a benchmark"):
        merged_task_vector(method, {"p": torch.zeros(1)}, vectors, {}, 0)

    class Tokens(ToyBenchmark):
        def task_model(self, task, backbone, private=None):
            model = super().task_model(task, backbone, private)
            logits = model.logits
            model.logits = lambda f, b: (logits(f, b)[0][:, None], b[1])
            return model

    with pytest.raises(ValueError, match="shape \\(3, 1, 3\\), not one prediction per example"):
        method.adapt(_toy_request(Tokens()), steps=1, lr=1e-3, init=0.3, batch_size=3)


def test_test_time_adaptation_is_its_own_data_class():
    assert DATA_ACCESS[-1] == "test-unlabeled"
    for name in ("adamerging", "adamerging_layer"):
        method = registry.methods()[name]
        assert method.data == "test-unlabeled" and method.adapt is not None
        assert [h.name for h in method.hparams] == ["steps", "lr", "init", "batch_size"]
        assert {h.name: h.default for h in method.hparams} == {
            "steps": 500,
            "lr": 1e-3,
            "init": 0.3,
            "batch_size": 16,
        }


def test_a_run_records_test_unlabeled_and_the_adaptation_compute(use_shared_home):
    from click.testing import CliRunner

    from atmbench.cli import cli
    from atmbench.store import ResultStore

    specs = "ta:lam=0.3,adamerging:steps=0,adamerging_layer:steps=4"
    result = CliRunner().invoke(
        cli, ["run", "--model", "vit-micro", "--quiet", "--no-mtl", "--methods", specs]
    )
    assert result.exit_code == 0, result.output
    cells = ResultStore(use_shared_home / "results.sqlite").cells()
    cells = cells.drop_duplicates("method").set_index("method")
    assert cells.at["adamerging:steps=0", "data_access"] == "test-unlabeled"
    experts = cells.at["experts", "steps"]
    assert cells.at["adamerging:steps=0", "steps"] == experts
    assert cells.at["adamerging_layer:steps=4", "steps"] == experts + 4 * 8
    assert (
        cells.at["adamerging_layer:steps=4", "examples"] - cells.at["experts", "examples"]
        == 4 * 8 * 16
    )
    # zero steps is TA at λ = init = 0.3: the same test scores
    scores = ResultStore(use_shared_home / "results.sqlite").frame("test")
    by = scores.drop_duplicates(["method", "task"]).set_index(["method", "task"]).accuracy
    ta, ada = by.xs("ta:lam=0.3"), by.xs("adamerging:steps=0")
    assert (ta - ada.reindex(ta.index)).abs().max() < 0.5
    text = CliRunner().invoke(cli, ["leaderboard", "--data", "test-unlabeled"]).output
    assert "adamerging_layer:steps=4" in text and "ta:lam=0.3" not in text
    assert "test-unlabeled" in text


class _Bigram(nn.Module):
    """A causal LM whose next-token logits are the row of ``w`` of the current token."""

    def __init__(self, vocab: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(vocab, vocab))

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return SimpleNamespace(logits=self.w[input_ids])


class _BigramBench:
    """One generative task: prompts ``= =`` and ``=`` (token 2), answers ``1 1`` (token 1)."""

    suite, tasks, device = "bigram", ("t",), torch.device("cpu")

    def base_state(self):
        return {"w": torch.zeros(4, 4)}

    def backbone(self, state=None):
        module = _Bigram(4)
        module.load_state_dict(state or self.base_state())
        return module

    def task_model(self, task, backbone, private=None):
        return GenerativeTask(backbone, str, pad=0, eos=3)

    def dataset(self, task, split):
        rows = [encode_example(p, [1, 1], (2, 3), 0, 3) for p in ([2, 2], [2])]
        data = TensorDataset(*(torch.stack(c) for c in zip(*rows, strict=True)))
        data.inputs = INPUTS
        return data


def test_language_model_entropy_is_the_first_answer_tokens_from_the_prompt_alone():
    # θ0 = 0, τ: row 2 (the prompts' last token "=") = (1, -1, 0, 0); rows 1 and 3 (answer
    # and end tokens, which a teacher-forced pass would read) are large. Both prompts end in
    # "=" (one left-padded), so each prediction is softmax(0.3 · (1, -1, 0, 0)): its entropy
    # is the loss, and a larger λ sharpens it (dH/dλ < 0), so Adam's first step adds lr.
    bench = _BigramBench()
    tau = torch.zeros(4, 4)
    tau[2] = torch.tensor([1.0, -1.0, 0.0, 0.0])
    tau[1], tau[3] = torch.tensor([9.0, 0, 0, 0]), torch.tensor([0, 0, 0, 9.0])
    vectors = FloatingOnly(InMemoryTaskVectors({"t": {"w": tau}}), bench.base_state())
    request = AdaptRequest(bench, bench.base_state(), vectors, seed=0)
    forward = adamerging._forward(request)
    step = {"t": next(unlabeled_test_batches(bench, "t", 0, 2))}
    assert [(t == IGNORE).all().item() for t in step["t"]] == [True, True, False, True]
    logits = forward({"w": 0.3 * tau}, step)["t"]
    assert logits.tolist() == [pytest.approx([0.3, -0.3, 0.0, 0.0])] * 2
    p = torch.softmax(torch.tensor([0.3, -0.3, 0.0, 0.0]), 0)
    assert adamerging.entropy(logits).item() == pytest.approx(-(p * p.log()).sum().item())
    result = adamerging.adapt(request, steps=1, lr=0.01, init=0.3, batch_size=2, layerwise=False)
    assert result.state["w"].tolist() == pytest.approx([0.31], abs=1e-7)
    assert (result.stats.steps, result.stats.examples) == (1, 2)
