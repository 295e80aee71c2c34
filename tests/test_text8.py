"""text8, the embedded language suite: its data, the generative evaluator, the runner on it."""

from __future__ import annotations

import json

import pytest
import torch

from atmbench import leaderboard, runner, statistics
from atmbench.adapt import unlabeled_test_batches, without_labels
from atmbench.default_plugins.suites import text8
from atmbench.evaluate import evaluate
from atmbench.executors.local import run_local
from atmbench.generative import INPUTS, encode_example
from atmbench.metrics import CHAR_ACCURACY
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
    def solve(task: str, text: str) -> str:
        return text8.TASKS[task][1](text, text8.alphabet(0))

    assert text8.alphabet(0) == "abcdef" and text8.alphabet(7) == "vwxabc"
    assert solve("reverse", "abc") == "cba"
    assert solve("sort", "cab") == "abc"
    assert text8.TASKS["sort"][1]("axv", text8.alphabet(7)) == "vxa"  # the alphabet's order
    assert solve("successor", "aef") == "bfa"
    assert solve("dedup", "abacb") == "abc"
    assert solve("rotate", "abc") == "bca"
    assert solve("swap", "abcde") == "badce"
    assert solve("alternate", "abcde") == "ace"
    assert sorted(text8.CIPHER) == list(range(text8.WINDOW))
    assert sorted(solve("cipher", "abcdef")) == list("abcdef")


def test_pretraining_corpus_holds_out_letters_the_tasks_use(bench):
    """The base sees every task, but never on the last letters of the task's alphabet."""
    corpus = bench._pretrain_data
    texts = {}
    for data in corpus.datasets:
        for prompt in data.tensors[2]:
            token = int(prompt[prompt != text8.PAD][0])
            texts.setdefault(text8.SYMBOLS[token], []).append(_text(prompt)[1:-1])
    assert len(texts["copy"]) == text8.PRETRAIN_COPY
    for i, task in enumerate(text8.TASKS):
        held = set(text8.alphabet(i)[-text8.HELD_OUT :])
        assert len(texts[task]) == text8.PRETRAIN_PER_TASK
        assert not held & set("".join(texts[task]))
        test = {_text(p)[1:-1] for p in bench.dataset(task, "test").tensors[2]}
        assert held & set("".join(test)) and not test & set(texts[task])


def test_splits_are_disjoint_fixed_and_decode_to_the_task(bench):
    for i, (task, (_, answer)) in enumerate(text8.TASKS.items()):
        prompts = {}
        for split, size in text8.SIZES.items():
            data = bench.dataset(task, split)
            assert len(data) == size
            prompts[split] = {_text(row) for row in data.tensors[2]}
        assert not (prompts["test"] & prompts["train"]) and not (prompts["val"] & prompts["train"])
        _, _, prompt, reference = bench.dataset(task, "test")[0]
        text = _text(prompt)
        assert text.startswith("?") and text.endswith("=")  # the task token decodes as "?"
        assert _text(reference) == answer(text[1:-1], text8.alphabet(i))
        assert set(text[1:-1]) <= set(text8.alphabet(i))
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
    assert scores["exact_match"] == pytest.approx(100.0 * same / len(test))
    assert scores["exact_match"] <= scores["char_accuracy"] <= 100.0


def test_loss_reads_answer_tokens_only(bench):
    model = bench.task_model("reverse", bench.backbone())
    batch = [t[:8] for t in bench.dataset("reverse", "train").tensors]
    logits, labels = model(batch)
    assert logits.shape[:2] == labels.shape and (labels != IGNORE).sum() > 0
    changed = [batch[0].clone(), batch[1], batch[2], batch[3]]
    pad_positions = batch[0] == text8.PAD
    changed[0][pad_positions] = text8.TOKEN["a"]  # padding follows the answer: never scored
    assert torch.allclose(model.loss(batch), model.loss(changed))


def test_test_time_adaptation_reads_the_prompt_and_its_first_answer_token(bench):
    # the unlabeled batches keep the prompt alone; input_ids, labels and answer are blanked
    batch = next(unlabeled_test_batches(bench, "sort", seed=0, batch_size=5))
    assert [(t == IGNORE).all().item() for t in batch] == [True, True, False, True]
    input_ids, _, prompts, _ = bench.dataset("sort", "test").tensors
    assert {tuple(p) for p in batch[2].tolist()} <= {tuple(p) for p in prompts.tolist()}
    # the prediction is the next-token distribution after the left-padded prompt: what a
    # teacher-forced pass gives at the prompt's last token, and what generation emits first
    model = bench.task_model("sort", bench.backbone())
    labeled = [t[:6] for t in bench.dataset("sort", "test").tensors]
    unlabeled = without_labels(labeled, INPUTS)
    with torch.no_grad():
        got = model.prediction_logits(model.unlabeled_features(unlabeled), unlabeled)
        last = (labeled[2] != text8.PAD).sum(1) - 1
        forced = model.backbone(input_ids=labeled[0]).logits[torch.arange(6), last]
        first = model.backbone.generate(
            input_ids=labeled[2],
            attention_mask=(labeled[2] != text8.PAD).long(),
            max_new_tokens=1,
            do_sample=False,
            pad_token_id=text8.PAD,
        )[:, -1]
    assert got.shape == (6, len(text8.SYMBOLS))
    assert torch.allclose(got, forced, atol=1e-5)
    assert torch.equal(got.argmax(-1), first)


def test_fisher_and_gram_statistics_on_the_language_model(bench):
    model = bench.task_model("dedup", bench.backbone())
    fisher = statistics.compute("fisher", bench, model, "dedup", 0)
    assert set(fisher) == {n for n, _ in model.backbone.named_parameters()}
    assert all((v >= 0).all() for v in fisher.values()) and fisher["lm_head.weight"].sum() > 0
    grams = statistics.compute("gram", bench, model, "dedup", 0)
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
    summary = run_local(cells, store, ws)
    assert not summary.failed, [r.error for r in summary.failed]
    rows = store.frame("test")
    assert set(rows.method) == {"pretrained", "experts", "mtl", *specs}
    assert len(rows) == len(cells) * len(text8.TASKS)
    assert rows.accuracy.between(0, 100).all()
    # scores are exact-match percentages of 200 test prompts
    assert all(abs(a * 2 - round(a * 2)) < 1e-9 for a in rows.accuracy)
    state = {
        k: v + 0.3 * ws.experts(bench, 0).vectors().stacked(k).sum(0)
        for k, v in bench.base_state().items()
    }
    merged = runner.evaluate_state(bench, state, "test")
    ta = rows[rows.method == "ta:lam=0.3"].set_index("task")
    assert ta.accuracy.to_dict() == pytest.approx(merged)
    # both declared metrics are stored, exact match first (= accuracy), in the task's order
    stored = {task: json.loads(text) for task, text in ta.scores.items()}
    model = bench.task_model("sort", bench.backbone(state))
    chars = evaluate(model, bench.dataset("sort", "test"), [CHAR_ACCURACY])["char_accuracy"]
    assert stored["sort"]["char_accuracy"] == pytest.approx(chars)
    for task, scores in stored.items():
        assert list(scores) == ["exact_match", "char_accuracy"]
        assert scores["exact_match"] == pytest.approx(merged[task])
        assert scores["exact_match"] <= scores["char_accuracy"] <= 100.0
    assert all(list(json.loads(t)) == ["exact_match", "char_accuracy"] for t in rows.scores)
    assert leaderboard.json_document(leaderboard.board(rows, "x"))["other_metrics"] == [
        "test char accuracy (%)"
    ]
    # the tables name the suite's metric
    table = leaderboard.board(rows, "atmbench leaderboard")
    assert table.title == "text8 / llama-micro  (test exact match, %)"
    assert leaderboard.json_document(table)["metric"] == "test exact match (%)"
