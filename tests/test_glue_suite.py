"""The GLUE suites end to end on tiny random models and tiny hub-format GLUE data.

No network: the tests write GLUE in the hub's parquet layout (``<task>/<split>-*.parquet``,
the columns and features of ``nyu-mll/glue``) and point ``ATMBENCH_GLUE_SOURCE`` at it,
and save tiny T5, RoBERTa and GPT-2 checkpoints and tokenizers with ``save_pretrained``,
which the suite loads as local model folders. Everything after that — fetching,
``save_to_disk``, offline loading, tokenizing, fine-tuning with private heads, merging,
evaluation through the runner, expert import (safetensors, ``.bin``, peft LoRA) — is
the real code.
"""

from __future__ import annotations

import functools
import json
import random

import pytest
import torch
from torch.utils.data import DataLoader

datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from click.testing import CliRunner  # noqa: E402

from atmbench import runner  # noqa: E402
from atmbench.adapt import AdaptRequest, without_labels  # noqa: E402
from atmbench.cli import cli  # noqa: E402
from atmbench.default_plugins.methods import adamerging  # noqa: E402
from atmbench.default_plugins.suites.glue import data  # noqa: E402
from atmbench.default_plugins.suites.glue import models as m  # noqa: E402
from atmbench.default_plugins.suites.glue.benchmark import GlueBenchmark  # noqa: E402
from atmbench.default_plugins.suites.glue.experts import load_experts, repositories  # noqa: E402
from atmbench.default_plugins.suites.glue.tasks import SUITES, TASKS  # noqa: E402
from atmbench.evaluate import evaluate  # noqa: E402
from atmbench.executors.local import run_local  # noqa: E402
from atmbench.finetune import Recipe, _lr_lambda  # noqa: E402
from atmbench.hookspecs import hookimpl  # noqa: E402
from atmbench.method import FloatingOnly, InMemoryTaskVectors  # noqa: E402
from atmbench.store import ResultStore  # noqa: E402
from atmbench.suite import PRIVATE, Suite, SuiteDataError  # noqa: E402

WORDS = ("red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "rock", "sea", "sky", "fox")
LABEL_WORDS = sorted({w for t in TASKS.values() for w in t.words})
SCORES = [f"{i / 10:.1f}" for i in range(51)]
ROWS = {"train": 40, "test": 12}
TWO_STEPS = Recipe(epochs=1, lr=1e-3, batch_size=18, warmup_steps=0, schedule="linear")
"""36 train rows after the 10% validation carve-out, batch 18, one epoch: two steps."""
SHORT = 32


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6)))


def _label(task, text: str, rng: random.Random):
    if task.regression:
        return float(f"{rng.randint(0, 50) / 10:.1f}")
    return text.split().count("red") % task.labels


def write_glue(root) -> None:
    """Every task's train and test split as the hub stores them (parquet, ClassLabel)."""
    for name, task in TASKS.items():
        for split, size in (("train", ROWS["train"]), (task.test_split, ROWS["test"])):
            rng = random.Random(f"{name}-{split}")
            columns = {c: [_sentence(rng) for _ in range(size)] for c in task.columns}
            columns["label"] = [_label(task, columns[task.columns[0]][i], rng) for i in range(size)]
            columns["idx"] = list(range(size))
            label = (
                datasets.Value("float32")
                if task.regression
                else datasets.ClassLabel(names=[f"c{i}" for i in range(task.labels)])
            )
            features = datasets.Features(
                {**{c: datasets.Value("string") for c in task.columns}, "label": label}
                | {"idx": datasets.Value("int32")}
            )
            folder = root / name
            folder.mkdir(parents=True, exist_ok=True)
            dataset = datasets.Dataset.from_dict(columns, features=features)
            dataset.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))


def _tokenizer(specials: list[str], post: tuple[str, str] | None, **named):
    vocab = [*specials, *WORDS, *LABEL_WORDS, *SCORES]
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    if post:
        used = sorted({t for t in " ".join(post).split() if t in specials})
        tok.post_processor = tokenizers.processors.TemplateProcessing(
            single=post[0], pair=post[1], special_tokens=[(t, vocab.index(t)) for t in used]
        )
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **named)


def save_t5(folder) -> None:
    tok = _tokenizer(
        ["<pad>", "</s>", "<unk>"],
        ("$A </s>", "$A </s> $B </s>"),
        pad_token="<pad>",
        eos_token="</s>",
    )
    config = transformers.T5Config(
        vocab_size=len(tok),
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(0)
    transformers.T5ForConditionalGeneration(config).save_pretrained(folder)
    tok.save_pretrained(folder)


def save_roberta(folder) -> None:
    specials = ["<pad>", "</s>", "<unk>", "<s>"]
    post = ("<s> $A </s>", "<s> $A </s> </s> $B </s>")
    tok = _tokenizer(specials, post, pad_token="<pad>", eos_token="</s>", bos_token="<s>")
    config = transformers.RobertaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=SHORT + 4,
        pad_token_id=0,
        bos_token_id=3,
        eos_token_id=1,
        type_vocab_size=1,
    )
    torch.manual_seed(0)
    transformers.RobertaForMaskedLM(config).save_pretrained(folder)  # as roberta-base is
    tok.save_pretrained(folder)


def save_gpt2(folder) -> None:
    end = "<|endoftext|>"
    tok = _tokenizer(["<unk>", end], None, eos_token=end, bos_token=end)  # no pad: as gpt2
    config = transformers.GPT2Config(
        vocab_size=len(tok),
        n_embd=16,
        n_layer=1,
        n_head=2,
        n_positions=SHORT,
        bos_token_id=1,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)  # as gpt2 is
    tok.save_pretrained(folder)


SAVERS = {"t5": save_t5, "roberta": save_roberta, "gpt2": save_gpt2}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> folder of a tiny pretrained checkpoint; and the GLUE mirror."""
    root = tmp_path_factory.mktemp("glue")
    write_glue(root / "mirror")
    folders = {}
    for family, save in SAVERS.items():
        save(root / family)
        folders[family] = root / family
    folders["mirror"] = root / "mirror"
    return folders


@pytest.fixture
def mirror(tiny, monkeypatch):
    monkeypatch.setenv(data.SOURCE_ENV, str(tiny["mirror"]))
    return tiny["mirror"]


def bench(tiny, home, family, tasks, suite="glue8"):
    recipes = dict.fromkeys(tasks, TWO_STEPS)
    model = str(tiny[family])
    return GlueBenchmark(
        model,
        home,
        torch.device("cpu"),
        suite=suite,
        tasks=tasks,
        recipes=recipes,
        max_length=SHORT,
    )


# -- tables and metrics (FusionBench's facts) --------------------------------------------


def test_tasks_are_fusionbench_glue():
    assert SUITES["glue8"] == ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb")
    assert SUITES["glue7"] == SUITES["glue8"][:-1]
    assert TASKS["mnli"].test_split == "validation_matched"
    assert {t.test_split for n, t in TASKS.items() if n != "mnli"} == {"validation"}
    # label words: FusionBench's templates (QNLI and RTE say "yes" for class 0)
    assert TASKS["mnli"].words == ("entailment", "neutral", "contradiction")
    assert TASKS["qnli"].words == ("yes", "no") and TASKS["rte"].words == ("yes", "no")
    assert TASKS["mrpc"].words == ("no", "yes") and TASKS["cola"].words[1] == "acceptable"
    assert TASKS["stsb"].answer(3.8) == "3.8" and TASKS["stsb"].answer(4) == "4.0"
    prompt = TASKS["rte"].prompt.format(sentence1="A", sentence2="B")
    assert prompt == "Does the text: 'A' entail that 'B' is true? Provide 'yes' or 'no'."
    metrics = {n: t.metric for n, t in TASKS.items()}
    assert metrics["cola"] == "matthews" and metrics["stsb"] == "spearman"
    assert m.RECIPE.lr == 5e-5 and m.RECIPE.epochs == 3  # FusionBench's GPT-2 recipe
    decay = _lr_lambda(m.RECIPE, 10)  # transformers' Trainer default: linear to 0
    assert [decay(s) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]


def test_text_to_text_metrics():
    cola, cola_accuracy = m.metrics(TASKS["cola"], "t5")
    words = ["acceptable", "unacceptable", "acceptable", "maybe"]
    gold = ["acceptable", "unacceptable", "unacceptable", "acceptable"]
    # MCC over label indices; an answer that is no label word is a class of its own
    expected = m.MATTHEWS(torch.tensor([1, 0, 1, 2]), torch.tensor([1, 0, 0, 1]))
    assert cola.name == "matthews" and cola(words, gold) == pytest.approx(expected)
    # CoLA's second metric: accuracy, what FusionBench reports (2 of 4 right)
    assert cola_accuracy.name == "accuracy" and cola_accuracy(words, gold) == 50.0
    stsb, pearson = m.metrics(TASKS["stsb"], "t5")
    # a generation that is no number scores 0.0, as FusionBench parses it
    assert stsb(["4.0", "x", "1.0"], ["3.8", "0.2", "1.0"]) == pytest.approx(100.0)
    # Pearson on (2, 0, 1) vs (3, 0, 3): deviations (1, -1, 0) and (1, -2, 1),
    # r = (1 + 2 + 0) / sqrt(2 * 6)
    assert pearson.name == "pearson"
    assert pearson(["2.0", "x", "1.0"], ["3.0", "0.0", "3.0"]) == pytest.approx(100 * 3 / 12**0.5)
    sst2 = m.metrics(TASKS["sst2"], "t5")
    assert [s.name for s in sst2] == ["exact_match"]
    assert sst2[0](["positive", "negative"], ["positive", "positive"]) == 50
    names = {t: [s.name for s in m.metrics(TASKS[t], "roberta")] for t in ("cola", "stsb", "qqp")}
    assert names == {
        "cola": ["matthews", "accuracy"],
        "stsb": ["spearman", "pearson"],
        "qqp": ["accuracy"],
    }
    assert [s.name for s in m.metrics(TASKS["qqp"], "gpt2")] == ["accuracy"]


def test_model_names():
    assert m.parse_model("flan-t5-base").source == "google/flan-t5-base"
    assert m.parse_model("gpt2").family == "gpt2"
    with pytest.raises(ValueError, match="unknown GLUE model 'bert'.*flan-t5-base, flan-t5-large"):
        m.parse_model("bert")


# -- data: fetch, offline errors, dry run -----------------------------------------------


def test_fetch_from_the_parquet_layout_then_offline(tmp_path, mirror, tiny, monkeypatch):
    data.fetch("mnli", tmp_path)
    stored = datasets.load_from_disk(str(tmp_path / "datasets" / "glue" / "mnli"))
    assert stored["train"].column_names == ["premise", "hypothesis", "label"]
    assert stored["test"].num_rows == 12  # validation_matched
    assert data.read_source(tmp_path, "mnli")["splits"]["test"] == "validation_matched"
    monkeypatch.delenv(data.SOURCE_ENV)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    b = bench(tiny, tmp_path, "t5", ("mnli",))  # no fetching now: all on disk
    assert len(b.dataset("mnli", "train")) == 36 and len(b.dataset("mnli", "val")) == 4
    input_ids, mask, labels = b.dataset("mnli", "test")[0]
    answer = b.tokenizer.decode(labels, skip_special_tokens=True)
    assert answer in TASKS["mnli"].words and mask.sum() == len(input_ids)


def test_missing_data_offline_is_one_line_naming_tasks_and_command(tmp_path, tiny, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(data.SOURCE_ENV, raising=False)
    with pytest.raises(SuiteDataError) as info:
        GlueBenchmark("flan-t5-base", tmp_path, torch.device("cpu"), suite="glue8", tasks=["rte"])
    message = str(info.value)
    assert "\n" not in message and "rte (nyu-mll/glue/rte)" in message
    assert message.endswith("atmbench download --suite glue8 --model flan-t5-base")


def test_missing_weights_offline_name_the_command(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    command = "atmbench download --suite glue8 --model gpt2"
    with pytest.raises(
        SuiteDataError,
        match="openai-community/gpt2 is not in .*atmbench download --suite glue8 --model gpt2",
    ):
        m.load_pretrained(m.MODELS["gpt2"], tmp_path, command)


def test_dry_run_lists_eight_tasks_offline_on_a_fresh_home(home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["run", "--suite", "glue8", "--model", "flan-t5-base", "--methods", "ta,ties,atm"]
    result = CliRunner().invoke(cli, [*args, "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    cells = [line.split()[3] for line in lines if line.startswith("glue8")]
    assert cells == ["experts", "mtl", "pretrained", "ta", "ties", "atm"]
    assert lines[-1].startswith(
        "experts  flan-t5-base  seed=0  train 8: cola, mnli, mrpc, qnli, qqp, rte, sst2, stsb"
    )


# -- through the runner, per family -----------------------------------------------------


def _suite_plugin(tiny, family, tasks):
    load = functools.partial(
        GlueBenchmark,
        suite="glue8",
        tasks=tasks,
        recipes=dict.fromkeys(tasks, TWO_STEPS),
        max_length=SHORT,
    )

    class Plugin:
        @hookimpl
        def register_suites(self, register):
            register(Suite(f"glue_{family}", tasks, (str(tiny[family]),), load, any_model=True))

    return Plugin()


FAMILY_TASKS = {"t5": ("cola", "stsb"), "roberta": ("rte", "stsb"), "gpt2": ("mnli", "sst2")}


@pytest.mark.parametrize("family", ["t5", "roberta", "gpt2"])
def test_fine_tune_merge_evaluate_through_the_runner(
    family, tiny, mirror, tmp_path, register, monkeypatch
):
    monkeypatch.setenv("ATMBENCH_HOME", str(tmp_path))
    tasks = FAMILY_TASKS[family]
    store = ResultStore(tmp_path / "results.sqlite")
    ws = runner.Workspace(tmp_path, torch.device("cpu"), progress=False)
    model = str(tiny[family])
    with register(_suite_plugin(tiny, family, tasks), f"glue_{family}"):
        cells = runner.plan(f"glue_{family}", model, ["ta:lam=0.5"], [0])
        if family != "roberta":  # the multi-task row runs once, on the regression family
            cells = [c for c in cells if c.method != "mtl"]
        summary = run_local(cells, store, ws)
        assert summary.failed == [], summary.failed
        b = ws.benchmark(f"glue_{family}", model)
        experts = ws.experts(b, 0)
    assert [experts.stats[t].steps for t in tasks] == [2, 2]
    private = experts.private()
    if family == "t5":
        assert private == {t: {} for t in tasks}  # text-to-text: nothing private
    else:  # each task's head trained with its expert and stored beside it, never merged
        for task in tasks:
            initial = b.task_model(task, b.backbone()).private_state()
            assert set(private[task]) == set(initial)
            assert any(not torch.equal(private[task][k], initial[k]) for k in initial)
        assert not any(k.startswith(PRIVATE) for k in experts.vectors().keys(tasks[0]))
    rows = store.frame("test")
    # The stored TA row is θ0 + 0.5 Σ τ, each task under its own expert's private head.
    vectors = experts.vectors()
    merged = {
        k: v + 0.5 * vectors.stacked(k).sum(0) if v.is_floating_point() else v
        for k, v in b.base_state().items()
    }
    expected = runner.evaluate_state(b, merged, "test", private=private)
    ta = rows[rows.method == "ta:lam=0.5"].set_index("task")
    assert ta.accuracy.to_dict() == pytest.approx(expected)
    # every declared metric is stored too (CoLA: MCC then accuracy; STS-B: Spearman, Pearson)
    for task in tasks:
        model = b.task_model(task, b.backbone(merged), private[task] or None)
        declared = evaluate(model, b.dataset(task, "test"), b.metrics(task))
        stored = json.loads(ta.scores[task])
        assert list(stored) == [metric.name for metric in b.metrics(task)]
        assert stored == pytest.approx(declared)
        assert next(iter(stored.values())) == pytest.approx(ta.accuracy[task])
    counts = {"t5": [2, 2], "roberta": [1, 2], "gpt2": [1, 1]}[family]  # cola/stsb declare 2
    assert [len(json.loads(t)) for t in ta.scores] == counts
    assert set(rows.method) >= {"pretrained", "experts", "ta:lam=0.5"}
    if family == "roberta":  # the multi-task model trains STS-B under its regression loss
        assert len(rows[rows.method == "mtl"]) == 2
    if family == "t5":  # T5's tied embedding is one tensor: stored and merged once
        assert "shared.weight" in merged and "encoder.embed_tokens.weight" not in merged


def test_text_to_text_adamerging_reads_the_first_answer_token(tiny, mirror, tmp_path):
    b = bench(tiny, tmp_path, "t5", ("cola", "rte"))
    model = b.task_model("rte", b.backbone())
    labeled = next(
        iter(DataLoader(b.dataset("rte", "test"), 4, collate_fn=b.dataset("rte", "test").collate))
    )
    unlabeled = without_labels(list(labeled))
    with torch.no_grad():
        got = model.prediction_logits(model.unlabeled_features(unlabeled), unlabeled)
        forced, _ = model(list(labeled))  # teacher forcing starts from the decoder start token
    assert torch.allclose(got, forced[:, 0], atol=1e-5)
    base = b.base_state()
    gen = torch.Generator().manual_seed(0)
    vectors = {
        t: {k: 0.02 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for t in b.tasks
    }
    request = AdaptRequest(b, base, FloatingOnly(InMemoryTaskVectors(vectors), base), seed=0)
    state = adamerging.adapt(request, steps=2, lr=0.05, init=0.3, batch_size=4, layerwise=False)
    weights = next(iter(state.state.values()))
    assert weights.shape == (2,) and torch.isfinite(weights).all()
    assert (weights - 0.3).abs().min() > 0.01  # Adam's steps move every coefficient


@pytest.mark.parametrize("family", ["roberta", "gpt2"])  # GPT-2: Conv1D Grams (gram_rows)
def test_atm_regmean_and_regmean_pp_on_a_language_suite(
    family, tiny, mirror, tmp_path, register, monkeypatch
):
    monkeypatch.setenv("ATMBENCH_HOME", str(tmp_path))
    tasks = ("rte", "sst2")
    store = ResultStore(tmp_path / "results.sqlite")
    ws = runner.Workspace(tmp_path, torch.device("cpu"), progress=False)
    model = str(tiny[family])
    specs = ["regmean", "regmean_pp:alpha=0.95"] + ["atm:iterations=1"] * (family == "roberta")
    with register(_suite_plugin(tiny, family, tasks), f"glue_{family}"):
        cells = runner.plan(f"glue_{family}", model, specs, [0])
        cells = [c for c in cells if c.method not in ("mtl",)]
        summary = run_local(cells, store, ws)
    assert summary.failed == [], summary.failed
    rows = store.frame("test")
    assert set(rows.method) >= set(specs)
    assert (
        len(rows[rows.method == "regmean"])
        == len(rows[rows.method == "regmean_pp:alpha=0.95"])
        == 2
    )
    assert all(0 <= a <= 100 for a in rows.accuracy)


# -- published experts ------------------------------------------------------------------


def test_hub_repository_names():
    t5, gpt2 = m.MODELS["flan-t5-base"], m.MODELS["gpt2"]
    assert repositories("hub:tanganke/flan-t5-base", t5, ["cola"]) == {
        "cola": "tanganke/flan-t5-base_glue-cola"
    }
    lora = repositories("hub:tanganke/flan-t5-large_glue-{task}_lora-16", t5, ["qqp"])
    assert lora == {"qqp": "tanganke/flan-t5-large_glue-qqp_lora-16"}
    assert repositories("hub:tanganke/gpt2", gpt2, ["sst2"]) == {"sst2": "tanganke/gpt2_sst2"}
    with pytest.raises(SuiteDataError, match="seven tasks, not STS-B; use --suite glue7"):
        repositories("hub:tanganke/gpt2", gpt2, ["cola", "stsb"])
    with pytest.raises(ValueError, match="expected hub:ORG/PREFIX"):
        repositories("hub:flan", t5, ["cola"])


def _perturbed(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    return model


def test_import_full_t5_and_lora_folded(tiny, tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model

    base = transformers.T5ForConditionalGeneration.from_pretrained(tiny["t5"])
    full = _perturbed(transformers.T5ForConditionalGeneration.from_pretrained(tiny["t5"]))
    full.save_pretrained(tmp_path / "hub" / "cola")  # safetensors, tied aliases deduplicated
    lora_config = LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM")
    peft_model = get_peft_model(
        transformers.T5ForConditionalGeneration.from_pretrained(tiny["t5"]), lora_config
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    peft_model.save_pretrained(tmp_path / "hub" / "rte")  # adapter_config.json + safetensors
    layer = peft_model.base_model.model.encoder.block[0].layer[0].SelfAttention.q
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * (4 / 2)

    spec = m.parse_model(str(tiny["t5"]))
    downloaded = []

    def snapshot_download(repo, allow_patterns, cache_dir):
        downloaded.append(repo)
        return str(tmp_path / "hub" / repo.split("_glue-")[1].split("_")[0])

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    cola = load_experts("hub:me/tiny", spec, ["cola"], base)["cola"]
    assert downloaded == ["me/tiny_glue-cola"]
    assert set(cola) == set(m.canonical_state(base))  # one name per tied tensor
    for k, v in m.canonical_state(full).items():
        assert torch.equal(cola[k], v), k
    rte = load_experts("hub:me/tiny_glue-{task}_lora-16", spec, ["rte"], base)["rte"]
    key = "encoder.block.0.layer.0.SelfAttention.q.weight"
    torch.testing.assert_close(rte[key], base.state_dict()[key] + delta)
    untouched = "encoder.block.0.layer.0.SelfAttention.k.weight"
    assert torch.equal(rte[untouched], base.state_dict()[untouched])
    # a folder of task subfolders works the same way, without the hub
    assert torch.equal(
        load_experts(str(tmp_path / "hub"), spec, ["rte"], base)["rte"][key], rte[key]
    )


def test_import_gpt2_bin_head_becomes_private(tiny, mirror, tmp_path):
    b = bench(tiny, tmp_path, "gpt2", ("mnli",))
    config = transformers.AutoConfig.from_pretrained(tiny["gpt2"], num_labels=3, pad_token_id=1)
    expert = _perturbed(
        transformers.GPT2ForSequenceClassification.from_pretrained(tiny["gpt2"], config=config)
    )
    folder = tmp_path / "experts" / "mnli"
    config.save_pretrained(folder)
    torch.save(expert.state_dict(), folder / "pytorch_model.bin")  # FusionBench's GPT-2 format
    imported = b.import_experts(str(tmp_path / "experts"))["mnli"]
    assert torch.equal(imported[f"{PRIVATE}head.weight"], expert.score.weight)
    shared = {k: v for k, v in imported.items() if not k.startswith(PRIVATE)}
    assert set(shared) == set(b.base_state())
    assert torch.equal(shared["h.0.attn.c_attn.weight"], expert.transformer.h[0].attn.c_attn.weight)
    wrong = tmp_path / "wrong" / "mnli"
    transformers.AutoConfig.from_pretrained(tiny["gpt2"], num_labels=2).save_pretrained(wrong)
    torch.save(
        transformers.GPT2ForSequenceClassification(
            transformers.AutoConfig.from_pretrained(tiny["gpt2"], num_labels=2)
        ).state_dict(),
        wrong / "pytorch_model.bin",
    )
    with pytest.raises(SuiteDataError, match="2 labels, task mnli has 3"):
        b.import_experts(str(tmp_path / "wrong"))


def test_download_without_network_is_one_line(home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(data.SOURCE_ENV, raising=False)
    result = CliRunner().invoke(cli, ["download", "--suite", "glue8", "--model", "gpt2"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: HF_HUB_OFFLINE is set and glue8 / gpt2 is not all cached under {home}: unset it"
    ]


def test_reported_glue_figures_are_cited_apart():
    from atmbench import reported

    gpt2 = {f.method: f.figure for f in reported.figures("glue7", "gpt2")}
    assert gpt2["regmean"] == "68.8" and gpt2["ta"] == "70.0"
    text = reported.render_markdown("glue8", "flan-t5-large")
    assert "(average test score, %)" in text and "| ties " in text
    assert "docs/modelpool/flan-t5_generation.md" in text and "CoLA by accuracy" in text
