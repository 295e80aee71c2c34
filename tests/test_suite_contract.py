"""The suite contract: metrics, and task-private parameters trained per task, never merged."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import matthews_corrcoef
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from atmbench import runner
from atmbench.executors.local import run_local
from atmbench.finetune import Recipe, state_on_cpu
from atmbench.hookspecs import hookimpl
from atmbench.metrics import ACCURACY, CHAR_ACCURACY, EXACT_MATCH, MATTHEWS, PEARSON, SPEARMAN
from atmbench.store import ResultStore
from atmbench.suite import PRIVATE, Suite, TaskModel


def test_metrics_match_scikit_learn_and_scipy():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (200,), generator=g)
    noisy = torch.where(torch.rand(200, generator=g) < 0.3, 1 - labels, labels)
    assert MATTHEWS(noisy, labels) == pytest.approx(100 * matthews_corrcoef(labels, noisy))
    three = torch.randint(0, 3, (50,), generator=g)
    guess = torch.randint(0, 3, (50,), generator=g)
    assert MATTHEWS(guess, three) == pytest.approx(100 * matthews_corrcoef(three, guess))
    assert MATTHEWS(torch.zeros(4), torch.tensor([0, 1, 0, 1])) == 0.0  # undefined: 0
    scores = torch.rand(100, generator=g).round(decimals=1)  # ties
    gold = scores + 0.3 * torch.rand(100, generator=g)
    assert SPEARMAN(scores, gold) == pytest.approx(100 * spearmanr(scores, gold).statistic)
    assert PEARSON(scores, gold) == pytest.approx(100 * pearsonr(scores, gold).statistic)
    assert PEARSON(torch.ones(3), gold[:3]) == 0.0  # undefined: 0
    assert ACCURACY(torch.tensor([1, 2, 3]), torch.tensor([1, 0, 3])) == pytest.approx(200 / 3)
    assert EXACT_MATCH(["ab ", "c", "d"], ["ab", "c", "e"]) == pytest.approx(200 / 3)
    # per answer: 3 of 4 right; 2 of 3 (one missing); 3 of 4 (one extra); 1 (both empty)
    shares = [3 / 4, 2 / 3, 3 / 4, 1.0]
    char = CHAR_ACCURACY(["abxd", "ab", "abcd", ""], ["abcd", "abc", "abc", " "])
    assert char == pytest.approx(100 * sum(shares) / 4)
    with pytest.raises(ValueError, match="exact_match: 1 predictions for 2 references"):
        EXACT_MATCH(["a"], ["a", "b"])


class HeadModel(TaskModel):
    """Shared linear encoder, private linear classification head."""

    def features(self, batch: list[Tensor]) -> Tensor:
        return torch.tanh(self.backbone(batch[0]))

    def logits(self, features: Tensor, batch: list[Tensor]) -> tuple[Tensor, Tensor]:
        return self.private["head"](features), batch[1]


class PrivateHeads:
    """Two 3-class tasks; each task's head is private, initialised from one seed."""

    suite, model, fingerprint = "heads2", "lin", "heads2-lin"
    tasks = ("a", "b")
    device = torch.device("cpu")

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self._base = {"weight": torch.randn(5, 4, generator=g), "bias": torch.zeros(5)}
        self._data = {}
        for task in self.tasks:
            teacher = torch.randn(3, 4, generator=g)
            for split, size in (("train", 32), ("val", 16), ("test", 16)):
                x = torch.randn(size, 4, generator=g)
                self._data[task, split] = TensorDataset(x, (x @ teacher.T).argmax(-1))

    def base_state(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self._base.items()}

    def backbone(self, state=None) -> nn.Module:
        layer = nn.Linear(4, 5)
        layer.load_state_dict(self._base if state is None else state)
        return layer

    def task_model(self, task, backbone, private=None) -> HeadModel:
        torch.manual_seed(1)
        model = HeadModel(backbone, nn.ModuleDict({"head": nn.Linear(5, 3)}))
        if private is not None:
            model.private.load_state_dict(private)
        return model

    def dataset(self, task, split):
        return self._data[task, split]

    def recipe(self, task):
        return Recipe(epochs=4, lr=0.05, batch_size=8, schedule="constant", warmup_steps=0)

    def metrics(self, task):
        return (ACCURACY,)


def test_private_heads_travel_with_their_expert_and_are_never_merged(register, home, tmp_path):
    class Plugin:
        @hookimpl
        def register_suites(self, register):
            register(Suite("heads2", PrivateHeads.tasks, ("lin",), lambda m, h, d: PrivateHeads()))

    with register(Plugin(), "heads2"):
        cells = runner.plan("heads2", None, ["ta:lam=0.5", "ta:lam=0.5+atm:iterations=1"], [0])
        store = ResultStore(tmp_path / "results.sqlite")
        ws = runner.Workspace(home, torch.device("cpu"), progress=False)
        summary = run_local(cells, store, ws)
    assert not summary.failed, [r.error for r in summary.failed]
    bench = ws.benchmark("heads2", "lin")
    experts = ws.experts(bench, 0)
    private = experts.private()
    initial = state_on_cpu(bench.task_model("a", bench.backbone()).private)
    assert set(private["a"]) == {"head.weight", "head.bias"}
    assert not torch.equal(private["a"]["head.weight"], initial["head.weight"])  # trained
    assert not torch.equal(private["a"]["head.weight"], private["b"]["head.weight"])
    vectors = experts.vectors()
    assert sorted(vectors.keys("a")) == ["bias", "weight"]  # only shared tensors merge
    assert not any(k.startswith(PRIVATE) for k in vectors.keys("b"))
    # The merged row: θ0 + 0.5 Σ τ on the shared encoder, each task under its expert's head.
    base = bench.base_state()
    merged = {k: v + 0.5 * vectors.stacked(k).sum(0) for k, v in base.items()}
    expected = runner.evaluate_state(bench, merged, "test", private=private)
    rows = store.frame("test")
    ta = rows[rows.method == "ta:lam=0.5"].set_index("task").accuracy.to_dict()
    assert ta == pytest.approx(expected)
    with_initial = runner.evaluate_state(bench, merged, "test")
    assert with_initial != expected  # the heads matter: the runner used the experts' ones
    experts_rows = rows[rows.method == "experts"].set_index("task").accuracy
    assert experts_rows.min() > 50.0


def test_run_prints_the_pretrained_merged_experts_gap():
    import pandas as pd

    from atmbench.cli import _gap_line

    frame = pd.DataFrame(
        {
            "method": ["pretrained"] * 2
            + ["ta"] * 2
            + ["ties"] * 2
            + ["mtl", "experts", "experts"],
            "accuracy": [10.0, 20.0, 40.0, 50.0, 30.0, 30.0, 99.0, 90.0, 80.0],
        }
    )
    assert _gap_line(frame) == (
        "mean test score: pretrained 15.0 | best merged 45.0 (ta) | experts 85.0"
    )
    assert _gap_line(frame[frame.method != "experts"]) is None
