"""text8, the embedded language suite: its data, the generative evaluator, the runner on it."""

from __future__ import annotations

import pytest
import torch

from atmbench import runner, statistics
from atmbench.default_plugins.suites import text8
from atmbench.evaluate import evaluate
from atmbench.generative import encode_example
from atmbench.store import ResultStore
from atmbench.suite import IGNORE


def _text(ids: torch.Tensor) -> str:
    return text8.decode([i for i in ids.tolist() if i not in (text8.PAD, text8.EOS)])


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    home = tmp_path_factory.mktemp("text8-home")
    return text8.TextBenchmark("llama-micro", home, torch.device("cpu"))


def test_encode_example_lays_out_prompt_answer_and_labels():
    input_ids, labels, prompt, answer = encode_example([5, 6], [7], (3, 3), pad=0, eos=1)
    assert input_ids.tolist() == [5, 6, 7, 1, 0, 0]
    assert labels.tolist() == [IGNORE, IGNORE, 7, 1, IGNORE, IGNORE]
    assert prompt.tolist() == [0, 5, 6] and answer.tolist() == [7, 0, 0]
    with pytest.raises(ValueError, match="exceeds the lengths"):
        encode_example([5], [7, 7, 7], (3, 3), pad=0, eos=1)


def test_tasks_answer_what_they_say():
    answers = {name: answer for name, (_, answer) in text8.TASKS.items()}
    assert answers["reverse"]("abc") == "cba"
    assert answers["sort"]("cab") == "abc"
    assert answers["successor"]("akl") == "bla"
    assert answers["dedup"]("abacb") == "abc"
    assert answers["rotate"]("abc") == "bca"
    assert answers["count"]("abacb") == "2"
    assert answers["addition"]("57+68") == "125"
    assert sorted(text8.CIPHER.values()) == list(text8.LETTERS)


def test_splits_are_disjoint_fixed_and_decode_to_the_task(bench):
    for task, (_, answer) in text8.TASKS.items():
        prompts = {}
        for split, size in text8.SIZES.items():
            data = bench.dataset(task, split)
            assert len(data) == size
            prompts[split] = {_text(row) for row in data.tensors[2]}
        assert not (prompts["test"] & prompts["train"]) and not (prompts["val"] & prompts["train"])
        _, _, prompt, reference = bench.dataset(task, "test")[0]
        text = _text(prompt)
        assert text.startswith("?") and text.endswith("=")  # the task token decodes as "?"
        assert _text(reference) == answer(text[1:-1])
    again = text8.TextBenchmark("llama-micro", bench._home, torch.device("cpu"))
    first, second = (b.dataset("sort", "train").tensors[0] for b in (bench, again))
    assert torch.equal(first, second)


def test_generation_is_scored_by_exact_match(bench):
    model = bench.task_model("sort", bench.backbone())
    batch = [t[:4] for t in bench.dataset("sort", "test").tensors]
    predictions, references = model.predict(batch)
    assert references == [_text(a) for a in batch[3]]
    assert all(isinstance(p, str) for p in predictions)
    test = bench.dataset("sort", "test")
    scores = evaluate(model, test, bench.metrics("sort"), batch_size=64)
    predictions, references = model.predict(list(test.tensors))
    same = sum(p == r for p, r in zip(predictions, references, strict=True))
    assert scores == {"exact_match": pytest.approx(100.0 * same / len(test))}


def test_loss_reads_answer_tokens_only(bench):
    model = bench.task_model("reverse", bench.backbone())
    batch = [t[:8] for t in bench.dataset("reverse", "train").tensors]
    logits, labels = model(batch)
    assert logits.shape[:2] == labels.shape and (labels != IGNORE).sum() > 0
    changed = [batch[0].clone(), batch[1], batch[2], batch[3]]
    pad_positions = batch[0] == text8.PAD
    changed[0][pad_positions] = text8.TOKEN["a"]  # padding follows the answer: never scored
    assert torch.allclose(model.loss(batch), model.loss(changed))


def test_fisher_and_gram_statistics_on_the_language_model(bench):
    model = bench.task_model("count", bench.backbone())
    fisher = statistics.compute("fisher", bench, model, "count", 0)
    assert set(fisher) == {n for n, _ in model.backbone.named_parameters()}
    assert all((v >= 0).all() for v in fisher.values()) and fisher["lm_head.weight"].sum() > 0
    grams = statistics.compute("gram", bench, model, "count", 0)
    assert "model.layers.0.self_attn.q_proj.weight" in grams and "lm_head.weight" in grams
    width = text8.MODELS["llama-micro"].hidden
    assert grams["model.layers.0.mlp.gate_proj.weight"].shape == (width, width)


def test_runner_merges_tunes_and_scores_text8(bench, tmp_path):
    """Every kind of cell on the language suite: references, a merge, a data-using merge, ATM."""
    specs = ["ta:lam=0.3", "fisher", "atm:iterations=1"]
    cells = runner.plan("text8", "llama-micro", specs, [0])
    store = ResultStore(tmp_path / "results.sqlite")
    ws = runner.Workspace(bench._home, torch.device("cpu"), progress=False)
    ws._benchmarks["text8", "llama-micro"] = bench
    summary = runner.run(cells, store, ws)
    assert not summary.failed, [r.error for r in summary.failed]
    rows = store.frame("test")
    assert set(rows.method) == {"pretrained", "experts", "mtl", *specs}
    assert len(rows) == len(cells) * len(text8.TASKS)
    assert rows.accuracy.between(0, 100).all()
    # scores are exact-match percentages of 200 test prompts
    assert all(abs(a * 2 - round(a * 2)) < 1e-9 for a in rows.accuracy)
    merged = runner.evaluate_state(
        bench,
        {
            k: v + 0.3 * ws.experts(bench, 0).vectors().stacked(k).sum(0)
            for k, v in bench.base_state().items()
        },
        "test",
    )
    ta = rows[rows.method == "ta:lam=0.3"].set_index("task").accuracy.to_dict()
    assert ta == pytest.approx(merged)
