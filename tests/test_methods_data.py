"""Fisher merging and RegMean on hand-worked statistics; the statistics on tiny modules."""

from __future__ import annotations

import copy

import pytest
import torch
from open_clip.transformer import VisionTransformer
from torch import nn
from torch.utils.data import TensorDataset
from transformers.pytorch_utils import Conv1D

import atmbench
from atmbench import registry, statistics
from atmbench.heads import Classifier
from atmbench.method import InMemoryTaskVectors, MergeInputError
from atmbench.spec import SpecError, parse_spec
from atmbench.streaming import merged_task_vector


def _delta(name: str, vectors: dict, stats: dict, **hparams) -> dict:
    method = registry.methods()[name]
    values = {h.name: hparams.get(h.name, h.default) for h in method.hparams}
    base = {k: torch.zeros_like(v) for k, v in next(iter(vectors.values())).items()}
    return merged_task_vector(method, base, InMemoryTaskVectors(vectors), values, 0, stats)


# ------------------------------------------------------------------------------- Fisher


def test_fisher_weights_each_entry_by_the_tasks_fisher():
    # Δ = (F_a τ_a + F_b τ_b) / (F_a + F_b) per entry:
    # entry 0: (1·2 + 1·0)/2 = 1; entry 1: (3·4 + 1·0)/4 = 3; entry 2: F = 0 for both,
    # floored to 1e-6 each: the plain mean (6 + 2)/2 = 4.
    vectors = {"a": {"p": torch.tensor([2.0, 4.0, 6.0])}, "b": {"p": torch.tensor([0.0, 0.0, 2.0])}}
    fisher = {"p": torch.tensor([[1.0, 3.0, 0.0], [1.0, 1.0, 0.0]])}
    delta = _delta("fisher", vectors, {"fisher": fisher})
    assert torch.allclose(delta["p"], torch.tensor([1.0, 3.0, 4.0]))


def test_fisher_with_equal_fishers_is_averaging_and_a_dominant_one_wins():
    gen = torch.Generator().manual_seed(0)
    vectors = {t: {"p": torch.randn(3, 2, generator=gen)} for t in "abc"}
    stacked = torch.stack([vectors[t]["p"] for t in "abc"])
    equal = {"p": torch.full((3, 3, 2), 0.7)}
    assert torch.allclose(_delta("fisher", vectors, {"fisher": equal})["p"], stacked.mean(0))
    dominant = {"p": torch.tensor([1e6, 1e-3, 1e-3])[:, None, None].expand(3, 3, 2)}
    delta = _delta("fisher", vectors, {"fisher": dominant})
    assert torch.allclose(delta["p"], stacked[0], atol=1e-4)


def test_fisher_averages_parameters_without_a_fisher_and_checks_shapes():
    vectors = {"a": {"p": torch.tensor([2.0])}, "b": {"p": torch.tensor([4.0])}}
    assert torch.equal(_delta("fisher", vectors, {"fisher": {}})["p"], torch.tensor([3.0]))
    with pytest.raises(MergeInputError, match="'p': Fisher of shape"):
        _delta("fisher", vectors, {"fisher": {"p": torch.ones(2, 2)}})


def test_data_using_methods_are_refused_by_the_data_free_api():
    with pytest.raises(
        SpecError, match="needs data .*only data-free methods merge without a suite"
    ):
        atmbench.merge("fisher", {"p": torch.zeros(1)}, {"a": {"p": torch.ones(1)}})


# ------------------------------------------------------------------------------ RegMean


def test_regmean_solves_the_linear_least_squares_merge():
    # A 1x2 nn.Linear weight (y = x Wᵀ). α = 0.5 halves off-diagonals:
    # G̃_a = [[2, 1], [1, 4]] (from [[2, 2], [2, 4]]), G̃_b = diag(2, 0).
    # Σ τ_t G̃_t = [1, 0]·G̃_a = [2, 1];  Σ G̃_t = [[4, 1], [1, 4]], inverse [[4, -1], [-1, 4]]/15.
    # Δ = [2, 1]·inverse = [(8 - 1)/15, (-2 + 4)/15] = [7/15, 2/15].
    vectors = {"a": {"w": torch.tensor([[1.0, 0.0]])}, "b": {"w": torch.tensor([[0.0, 0.0]])}}
    grams = {"w": torch.tensor([[[2.0, 2.0], [2.0, 4.0]], [[2.0, 0.0], [0.0, 0.0]]])}
    delta = _delta("regmean", vectors, {"gram": grams}, alpha=0.5)
    assert torch.allclose(delta["w"], torch.tensor([[7 / 15, 2 / 15]]))
    # The same map stored as x @ P (P = Wᵀ, 2x1, open_clip's proj): the transposed answer.
    rows = {t: {"w": v["w"].T.contiguous()} for t, v in vectors.items()}
    delta = _delta("regmean", rows, {"gram_rows": grams}, alpha=0.5)
    assert torch.allclose(delta["w"], torch.tensor([[7 / 15], [2 / 15]]))


def test_regmean_with_identity_grams_is_the_average_and_a_dominant_gram_wins():
    gen = torch.Generator().manual_seed(1)
    vectors = {t: {"w": torch.randn(3, 3, generator=gen), "b": torch.randn(3)} for t in "ab"}
    identity = {"w": torch.eye(3).expand(2, 3, 3)}
    delta = _delta("regmean", vectors, {"gram": identity, "gram_rows": {}})
    assert torch.allclose(delta["w"], (vectors["a"]["w"] + vectors["b"]["w"]) / 2, atol=1e-6)
    assert torch.allclose(delta["b"], (vectors["a"]["b"] + vectors["b"]["b"]) / 2)  # no Gram
    spd = torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 1.0], [0.0, 1.0, 2.0]])
    dominant = {"w": torch.stack([1e6 * spd, spd])}
    delta = _delta("regmean", vectors, {"gram": dominant}, alpha=1.0)
    assert torch.allclose(delta["w"], vectors["a"]["w"], atol=1e-4)


def test_regmean_with_one_task_gives_the_expert_and_rejects_misfit_grams():
    vectors = {"a": {"w": torch.tensor([[1.0, -2.0, 3.0]])}}
    grams = {"w": torch.tensor([[[2.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 1.0]]])}
    delta = _delta("regmean", vectors, {"gram": grams})
    assert torch.allclose(delta["w"], vectors["a"]["w"], atol=1e-6)
    with pytest.raises(MergeInputError, match=r"'w' of shape \(1, 3\): Gram matrices"):
        _delta("regmean", vectors, {"gram_rows": grams})  # rows meet 1 input, not 3


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("regmean:alpha=1.5", r"alpha=1.5 is invalid: expected a float in \[0.0, 1.0\]"),
        ("fisher:alpha=0.5", "fisher has no hyperparameter 'alpha'"),
    ],
)
def test_bad_hyperparameters_are_rejected(spec, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(spec, registry.methods(), registry.refiners())


def test_data_methods_declare_their_statistics_and_data():
    methods = registry.methods()
    assert (methods["fisher"].needs, methods["fisher"].data) == (("fisher",), "train")
    assert (methods["regmean"].needs, methods["regmean"].data) == (("gram", "gram_rows"), "train")
    assert set(methods["regmean"].needs + methods["fisher"].needs) <= set(statistics.STATISTICS)


# --------------------------------------------------------------------------- statistics


class TinyBench:
    """The part of a Benchmark the statistics read: a train split and a device."""

    device = torch.device("cpu")

    def __init__(self, inputs: torch.Tensor):
        self._data = TensorDataset(inputs, torch.zeros(len(inputs), dtype=torch.long))

    def dataset(self, task: str, split: str) -> TensorDataset:
        assert split == "train"
        return self._data


def _task(model: nn.Module) -> Classifier:
    """``model`` as a task model's shared part, its outputs taken as logits."""
    return Classifier(model, nn.Identity())


def _gram(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    return x.T @ x / len(x)


def test_gram_of_linear_layers_is_xtx_of_their_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(10, 3)  # fewer than EXAMPLES: every example is used
    grams = statistics.compute("gram", TinyBench(x), _task(model), "t", 0)
    assert set(grams) == {"0.weight", "2.weight"}
    assert torch.allclose(grams["0.weight"], _gram(x), atol=1e-6)
    with torch.no_grad():
        hidden = torch.relu(model[0](x))
    assert torch.allclose(grams["2.weight"], _gram(hidden), atol=1e-6)
    assert statistics.compute("gram_rows", TinyBench(x), _task(model), "t", 0) == {}


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x):
        h = self.ln(x)
        return self.attn(h, h, h, need_weights=False)[0]


def test_gram_of_attention_uses_its_input_and_the_context_out_proj_sees():
    torch.manual_seed(0)
    model = SelfAttention().eval()
    x = torch.randn(6, 5, 4)  # 6 sequences of 5 tokens: 30 rows
    grams = statistics.compute("gram", TinyBench(x), _task(model), "t", 0)
    assert set(grams) == {"attn.in_proj_weight", "attn.out_proj.weight"}
    with torch.no_grad():
        h = model.ln(x)
        context = statistics.attention_context(model.attn, h)
        out = model.attn.out_proj
        assert torch.allclose(context @ out.weight.T + out.bias, model(x), atol=1e-5)
    assert torch.allclose(grams["attn.in_proj_weight"], _gram(h), atol=1e-5)
    assert torch.allclose(grams["attn.out_proj.weight"], _gram(context), atol=1e-5)


def test_gram_rows_of_open_clip_proj_is_the_pooled_features_gram():
    torch.manual_seed(0)
    vit = VisionTransformer(
        image_size=8, patch_size=4, width=8, layers=1, heads=2, mlp_ratio=2.0, output_dim=6
    ).eval()
    x = torch.randn(5, 3, 8, 8)
    rows = statistics.compute("gram_rows", TinyBench(x), _task(vit), "t", 0)
    columns = statistics.compute("gram", TinyBench(x), _task(vit), "t", 0)
    unprojected = copy.deepcopy(vit)
    unprojected.proj = None
    with torch.no_grad():
        pooled = unprojected(x)
    assert set(rows) == {"proj"} and rows["proj"].shape == (8, 8)
    assert torch.allclose(rows["proj"], _gram(pooled), atol=1e-5)
    layers = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    assert set(columns) == {f"transformer.resblocks.0.{k}" for k in layers}
    assert "_pool" not in vars(vit)  # the recording wrapper is gone afterwards


def test_gram_rows_of_gpt2_conv1d_is_xtx_of_its_inputs():
    """GPT-2's Conv1D (weight [in, out], y = x W + b) is RegMean's too, on its rows' side."""
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(4, 3), nn.ReLU(), Conv1D(2, 4))
    x = torch.randn(2, 5, 3)  # 2 sequences of 5 tokens: 10 rows
    rows = statistics.compute("gram_rows", TinyBench(x), _task(model), "t", 0)
    assert statistics.compute("gram", TinyBench(x), _task(model), "t", 0) == {}
    assert set(rows) == {"0.weight", "2.weight"} and rows["0.weight"].shape == (3, 3)
    assert torch.allclose(rows["0.weight"], _gram(x.reshape(-1, 3)), atol=1e-6)
    with torch.no_grad():
        hidden = torch.relu(model[0](x))
    assert torch.allclose(rows["2.weight"], _gram(hidden.reshape(-1, 4)), atol=1e-6)


def test_fisher_diagonal_is_the_squared_log_likelihood_gradient():
    # Linear model, W = 0: p = (1/3, 1/3, 1/3); ∂ log p_y/∂W = (e_y − p) xᵀ.
    # x = (1, 2), y = 0: e − p = (2/3, −1/3, −1/3) → gradient [[2/3, 4/3], [−1/3, −2/3] x2],
    # squared [[4/9, 16/9], [1/9, 4/9], [1/9, 4/9]]. Twice the same example: twice that.
    model = nn.Linear(2, 3, bias=False)
    nn.init.zeros_(model.weight)
    images = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    targets = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    fisher = statistics.fisher_diagonal(_task(model), [images, torch.zeros(2)], targets)
    expected = 2 * torch.tensor([[4.0, 16.0], [1.0, 4.0], [1.0, 4.0]]) / 9
    assert torch.allclose(fisher["weight"], expected, atol=1e-6)


def test_fisher_statistic_is_seeded_and_vanishes_for_a_certain_model():
    torch.manual_seed(0)
    model = nn.Linear(2, 3)
    bench = TinyBench(torch.randn(20, 2))
    first = statistics.compute("fisher", bench, _task(model), "t", 0)
    assert set(first) == {"weight", "bias"} and first["weight"].shape == (3, 2)
    again = statistics.compute("fisher", bench, _task(model), "t", 0)
    assert all(torch.equal(first[k], v) for k, v in again.items())
    assert (first["weight"] >= 0).all() and first["weight"].sum() > 0
    with torch.no_grad():  # logits (1000, 0, 0): p(y=0) = 1, every gradient e_0 − p = 0
        model.weight.zero_()
        model.bias.copy_(torch.tensor([1000.0, 0.0, 0.0]))
    certain = statistics.compute("fisher", bench, _task(model), "t", 0)
    assert all(torch.allclose(v, torch.zeros_like(v)) for v in certain.values())


def test_unknown_statistic_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown data statistic 'hessian' \(valid: fisher, gram"):
        statistics.compute("hessian", TinyBench(torch.zeros(1, 2)), nn.Linear(2, 2), "t", 0)
