"""``mergebench5`` end to end on tiny random causal LMs, tiny local data and local lm-eval tasks.

No network: the tests save a tiny Llama (and Gemma-2) with its tokenizer and five
perturbed copies as sharded safetensors checkpoints with ``save_pretrained``, write the
domains' data as JSONL in the hub datasets' columns, and write lm-evaluation-harness
custom tasks (YAML + local JSONL). The suite then runs through the runner exactly as on
the real models: expert import, merging, lm-eval scoring in-process, ATM tuning.
"""

from __future__ import annotations

import functools
import json
import random
import sys

import pytest
import torch

datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from click.testing import CliRunner  # noqa: E402

from atmbench import runner  # noqa: E402
from atmbench.cli import cli  # noqa: E402
from atmbench.default_plugins.suites.mergebench.benchmark import MergeBenchmark  # noqa: E402
from atmbench.default_plugins.suites.mergebench.domains import DOMAINS  # noqa: E402
from atmbench.default_plugins.suites.mergebench.experts import repositories  # noqa: E402
from atmbench.executors.local import run_local  # noqa: E402
from atmbench.finetune import Recipe  # noqa: E402
from atmbench.hookspecs import hookimpl  # noqa: E402
from atmbench.method import combine  # noqa: E402
from atmbench.store import ResultStore  # noqa: E402
from atmbench.suite import Suite, SuiteDataError  # noqa: E402

SPECIALS = ["<pad>", "</s>", "<unk>"]
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "rock", "sea", "sky", "fox"]
DOMAINS_HERE = ("math", "safety")
QUICK = Recipe(epochs=1, lr=1e-3, batch_size=4, weight_decay=0.0, schedule="constant")


def _tokenizer():
    vocab = [*SPECIALS, *WORDS]
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>"
    )


def _config(family: str):
    common = dict(
        vocab_size=len(SPECIALS) + len(WORDS),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    if family == "llama":
        return transformers.LlamaConfig(tie_word_embeddings=False, **common)
    return transformers.Gemma2Config(head_dim=8, tie_word_embeddings=True, **common)


def _perturbed(model, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g).to(p.dtype))
    return model


def save_models(root, family: str) -> dict:
    """A base model and one expert per domain, bf16, sharded safetensors, with tokenizers."""
    torch.manual_seed(0)
    config = _config(family)
    cls = transformers.AutoModelForCausalLM
    base = root / family / "base"
    model = cls.from_config(config).to(torch.bfloat16)
    model.save_pretrained(base, max_shard_size="4KB")
    _tokenizer().save_pretrained(base)
    for i, domain in enumerate(DOMAINS):
        expert = _perturbed(cls.from_pretrained(base, dtype=torch.bfloat16), seed=i + 1)
        expert.save_pretrained(root / family / "experts" / domain, max_shard_size="4KB")
    return {"base": base, "experts": root / family / "experts"}


def write_data(folder) -> None:
    """Each domain's instruction data in its hub dataset's columns (12 rows)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, domain in DOMAINS.items():
        rng = random.Random(name)
        with open(folder / f"{name}.jsonl", "w") as f:
            for _ in range(12):
                row = {
                    domain.instruction: " ".join(rng.choices(WORDS, k=4)),
                    domain.response: " ".join(rng.choices(WORDS, k=3)),
                }
                if domain.extra:
                    row[domain.extra] = " ".join(rng.choices(WORDS, k=2))
                f.write(json.dumps(row) + "\n")


MC_ROWS = [
    {"question": "red cat sun", "choices": ["dog", "moon", "sea"], "label": i % 3} for i in range(3)
] + [{"question": "blue tree", "choices": ["fox", "sky"], "label": 1}]
GEN_ROWS = [{"question": q, "answer": w} for q in ("green rock", "sun dog sea") for w in WORDS]
"""Every word is once the answer to each question: a greedy word scores 1 of 12."""


def write_tasks(folder) -> None:
    """Two lm-eval custom tasks reading local JSONL: multiple choice and generation."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("tiny_mc", MC_ROWS), ("tiny_gen", GEN_ROWS)):
        with open(folder / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    (folder / "tiny_mc.yaml").write_text(
        f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files: {{test: {folder / "tiny_mc.jsonl"}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list: [{{metric: acc, aggregation: mean, higher_is_better: true}}]
metadata: {{version: 1.0}}
"""
    )
    (folder / "tiny_gen.yaml").write_text(
        f"""task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files: {{test: {folder / "tiny_gen.jsonl"}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: ["</s>"], do_sample: false, max_gen_toks: 1}}
metric_list: [{{metric: exact_match, aggregation: mean, higher_is_better: true}}]
metadata: {{version: 1.0}}
"""
    )


EVALS = {"math": [("tiny_mc", "acc,none")], "safety": [("tiny_gen", "exact_match,none")]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("lm_eval")  # the suite scores with it: install atmbench[test]
    root = tmp_path_factory.mktemp("mergebench")
    write_data(root / "data")
    write_tasks(root / "tasks")
    return {"root": root, "llama": save_models(root, "llama"), "gemma": save_models(root, "gemma")}


def _load(tiny, **kwargs):
    return functools.partial(
        MergeBenchmark,
        domains=DOMAINS_HERE,
        evals=EVALS,
        include_path=tiny["root"] / "tasks",
        data=tiny["root"] / "data",
        recipes=dict.fromkeys(DOMAINS_HERE, QUICK),
        batch_size=4,
        **kwargs,
    )


def _plugin(tiny, name):
    class Plugin:
        @hookimpl
        def register_suites(self, register):
            register(Suite(name, DOMAINS_HERE, (), _load(tiny), any_model=True))

    return Plugin()


# -- by hand: what lm-eval must have computed ------------------------------------------


@torch.no_grad()
def mc_accuracy(model, tokenizer) -> float:
    """lm-eval's multiple-choice accuracy for one-token choices: the choice whose token is
    most likely after the question."""
    right = 0
    for row in MC_ROWS:
        ids = tokenizer(row["question"], return_tensors="pt")["input_ids"]
        logits = model(input_ids=ids).logits[0, -1].float()
        choices = [tokenizer.convert_tokens_to_ids(c) for c in row["choices"]]
        right += int(torch.stack([logits[c] for c in choices]).argmax()) == row["label"]
    return 100.0 * right / len(MC_ROWS)


@torch.no_grad()
def gen_exact_match(model, tokenizer) -> float:
    right = 0
    for row in GEN_ROWS:
        ids = tokenizer(row["question"], return_tensors="pt")["input_ids"]
        token = int(model(input_ids=ids).logits[0, -1].argmax())
        right += tokenizer.convert_ids_to_tokens(token) == row["answer"]
    return 100.0 * right / len(GEN_ROWS)


# -- tests ------------------------------------------------------------------------------


def test_merge_and_score_with_lm_eval_through_the_runner(tiny, tmp_path, register, monkeypatch):
    monkeypatch.setenv("ATMBENCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    store = ResultStore(tmp_path / "results.sqlite")
    ws = runner.Workspace(tmp_path, torch.device("cpu"), progress=False)
    model, experts = str(tiny["llama"]["base"]), str(tiny["llama"]["experts"])
    with register(_plugin(tiny, "mb_tiny"), "mb_tiny"):
        cells = runner.plan("mb_tiny", model, ["ta:lam=0.5"], [0], experts=experts)
        cells = [c for c in cells if c.method != "mtl"]
        summary = run_local(cells, store, ws)
        assert summary.failed == [], summary.failed[0].error if summary.failed else ""
        bench = ws.benchmark("mb_tiny", model)
        vectors = ws.experts(bench, 0, experts).vectors()
    base = bench.base_state()
    assert all(v.dtype == torch.bfloat16 for v in base.values() if v.is_floating_point())
    merged = combine(
        base, {k: vectors.stacked(k).sum(0) for k in vectors.keys(DOMAINS_HERE[0])}, 0.5
    )
    by_hand = bench.backbone(merged)
    expected = {
        "math": mc_accuracy(by_hand, bench.tokenizer),
        "safety": gen_exact_match(by_hand, bench.tokenizer),
    }
    rows = store.frame("test")
    ta = rows[rows.method == "ta:lam=0.5"].set_index("task").accuracy.to_dict()
    assert ta == pytest.approx(expected)
    stored = rows[rows.method == "ta:lam=0.5"].set_index("task").scores.map(json.loads)
    assert stored["math"] == {"score": expected["math"], "tiny_mc": expected["math"]}
    assert list(stored["safety"]) == ["score", "tiny_gen"]  # each lm-eval task's score too
    pretrained = rows[rows.method == "pretrained"].set_index("task").accuracy.to_dict()
    plain = bench.backbone(base)  # θ0 as evaluated: bf16 (backbone() is a float32 copy)
    assert pretrained["math"] == pytest.approx(mc_accuracy(plain, bench.tokenizer))
    # the suite's own "score" is what is stored and ranked; each lm-eval task's follows
    assert [json.loads(t)["score"] for t in rows.scores] == list(rows.accuracy)
    val = store.frame("val")
    assert set(val.method) == {"pretrained", "experts", "ta:lam=0.5"}
    assert all(0 <= a <= 100 for a in val.accuracy)


def test_atm_tunes_with_the_causal_lm_loss_through_the_runner(
    tiny, tmp_path, register, monkeypatch
):
    monkeypatch.setenv("ATMBENCH_HOME", str(tmp_path))
    store = ResultStore(tmp_path / "results.sqlite")
    ws = runner.Workspace(tmp_path, torch.device("cpu"), progress=False)
    model = str(tiny["llama"]["base"])
    with register(_plugin(tiny, "mb_atm"), "mb_atm"):
        cells = [
            c
            for c in runner.plan("mb_atm", model, ["atm:iterations=1"], [0])
            if c.method == "atm:iterations=1"
        ]
        summary = run_local(cells, store, ws)
    assert summary.failed == [], summary.failed[0].error if summary.failed else ""
    cell = store.cells().iloc[0]
    # 12 rows, 1 held out to validate: 11 train items in batches of 4, one epoch: 3 steps
    # per domain, under the causal-LM loss on the responses
    assert cell.steps == 6
    trace = json.loads(cell.trace)
    assert [r["iteration"] for r in trace] == [0, 1]
    assert trace[1]["steps"] == {"math": 3, "safety": 3}
    assert all(n > 0 for n in trace[1]["norms"].values())  # the tuning moved the weights
    rows = store.frame("test")
    assert sorted(rows.task) == sorted(DOMAINS_HERE)
    assert all(0 <= a <= 100 for a in rows.accuracy)


def test_refine_a_merge_and_train_the_multi_task_row(tiny, tmp_path, register, monkeypatch):
    """``ta+atm`` tunes the bf16 merge on validation as float32; ``mtl`` trains from θ0."""
    monkeypatch.setenv("ATMBENCH_HOME", str(tmp_path))
    store = ResultStore(tmp_path / "results.sqlite")
    ws = runner.Workspace(tmp_path, torch.device("cpu"), progress=False)
    model, experts = str(tiny["llama"]["base"]), str(tiny["llama"]["experts"])
    wanted = {"mtl", "ta:lam=0.5+atm:iterations=1"}
    with register(_plugin(tiny, "mb_refine"), "mb_refine"):
        cells = runner.plan("mb_refine", model, sorted(wanted), [0], experts=experts)
        summary = run_local([c for c in cells if c.method in wanted], store, ws)
    assert summary.failed == [], summary.failed[0].error if summary.failed else ""
    steps = store.cells().set_index("method").steps.to_dict()
    # validation holds 1 of 12 rows: one step per domain; imported experts cost 0 steps
    assert steps["ta:lam=0.5+atm:iterations=1"] == 2
    assert steps["mtl"] == 6  # the experts' budget: 3 steps per domain
    rows = store.frame("test")
    assert set(rows.method) == wanted and len(rows) == 4


def test_gemma_tied_embeddings_import_and_score(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    gemma = tiny["gemma"]
    bench = _load(tiny)(str(gemma["base"]), tmp_path, torch.device("cpu"))
    base = bench.base_state()
    assert "lm_head.weight" not in base  # tied to the embedding: one tensor, merged once
    experts = bench.import_experts(str(gemma["experts"]))
    assert list(experts) == list(DOMAINS_HERE)
    delta = {
        k: sum(experts[d][k].float() - v.float() for d in DOMAINS_HERE) for k, v in base.items()
    }
    model = bench.task_model("math", bench.backbone(combine(base, delta, 0.3)))
    assert bench.score("math", "test", model)["score"] == pytest.approx(
        mc_accuracy(model.backbone, bench.tokenizer)
    )


def test_hub_names_follow_mergebench():
    repos = repositories("hub:MergeBench", "meta-llama/Llama-3.2-3B", ["math", "coding"])
    assert repos == {
        "math": "MergeBench/Llama-3.2-3B_math",
        "coding": "MergeBench/Llama-3.2-3B_coding",
    }
    assert repositories("hub:MergeBench", "google/gemma-2-9b-it", ["safety"]) == {
        "safety": "MergeBench/gemma-2-9b-it_safety"
    }
    with pytest.raises(ValueError, match="expected hub:ORG"):
        repositories("hub:MergeBench/x", "google/gemma-2-2b", ["math"])


def test_dry_run_lists_the_five_domains_and_cells_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("ATMBENCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["run", "--suite", "mergebench5", "--model", "Llama-3.2-3B"]
    args += ["--methods", "ta,ties,dare_ties,atm", "--experts", "hub:MergeBench", "--dry-run"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    cells = [line.split()[3] for line in lines if line.startswith("mergebench5")]
    assert cells == ["experts", "mtl", "pretrained", "ta", "ties", "dare_ties", "atm"]
    assert lines[-1] == (
        "experts  Llama-3.2-3B  seed=0  import from hub:MergeBench 5: instruction, math, "
        "coding, safety, multilingual  |  reuse 0: -"
    )


def test_missing_lm_eval_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(SuiteDataError, match=r"pip install 'atmbench\[llm\]'"):
        MergeBenchmark("Llama-3.2-3B", tmp_path, torch.device("cpu"))


def test_offline_weights_and_data_name_the_repo_and_the_command(tiny, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    command = "atmbench download --suite mergebench5 --model Llama-3.2-3B"
    with pytest.raises(SuiteDataError, match=f"meta-llama/Llama-3.2-3B is not in .*{command}"):
        MergeBenchmark("Llama-3.2-3B", tmp_path, torch.device("cpu"))
    local = str(tiny["llama"]["base"])
    with pytest.raises(
        SuiteDataError,
        match="math data .MergeBench/math_val. could not be loaded.*"
        "atmbench download --suite mergebench5",
    ):
        MergeBenchmark(local, tmp_path, torch.device("cpu"), domains=["math"])


def test_download_without_network_is_one_line(home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["download", "--suite", "mergebench5", "--model", "Llama-3.2-3B"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: HF_HUB_OFFLINE is set and mergebench5 / Llama-3.2-3B is not all cached "
        f"under {home}: unset it"
    ]


def test_lm_eval_data_missing_offline_names_the_tasks_and_the_command(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "from_hub.yaml").write_text(  # a built-in task's form: its data is on the hub
        (tiny["root"] / "tasks" / "tiny_mc.yaml")
        .read_text()
        .replace("task: tiny_mc", "task: from_hub")
        .replace("dataset_path: json", "dataset_path: openai/gsm8k")
    )
    bench = MergeBenchmark(
        str(tiny["llama"]["base"]),
        tmp_path,
        torch.device("cpu"),
        domains=["math"],
        evals={"math": [("from_hub", None)]},
        include_path=tasks,
        data=tiny["root"] / "data",
    )
    model = bench.task_model("math", bench.backbone())
    with pytest.raises(
        SuiteDataError,
        match="lm-eval could not load the data of from_hub .*; fetch it with: atmbench "
        "download --suite mergebench5 --model",
    ):
        bench.score("math", "test", model)
