"""The vision suites end to end on tiny hub-format datasets and a tiny open_clip config.

No network: ``datasets.load_dataset`` is replaced by a function returning small datasets
with the hub copies' features (column names, ``Image``, ``ClassLabel`` / bool / int
labels); everything after it — normalisation, ``save_to_disk``, offline loading, zero-shot
heads, fine-tuning, merging, evaluation through the runner — is the real code.
"""

from __future__ import annotations

import functools
import importlib
import json

import numpy as np
import pytest
import torch

datasets = pytest.importorskip("datasets")
open_clip = pytest.importorskip("open_clip")

from atmbench import runner  # noqa: E402
from atmbench.cache import EntryCache  # noqa: E402
from atmbench.default_plugins.suites.vision import backbone as bb  # noqa: E402
from atmbench.default_plugins.suites.vision import data  # noqa: E402
from atmbench.default_plugins.suites.vision.benchmark import (  # noqa: E402
    VisionBenchmark,
    task_vectors_recipe,
)
from atmbench.default_plugins.suites.vision.classnames import (  # noqa: E402
    CLASSNAMES,
    classnames,
)
from atmbench.default_plugins.suites.vision.download import download  # noqa: E402
from atmbench.default_plugins.suites.vision.tasks import SUITES, TASKS  # noqa: E402
from atmbench.default_plugins.suites.vision.templates import TEMPLATES  # noqa: E402
from atmbench.default_plugins.suites.vision.zeroshot import head_key  # noqa: E402
from atmbench.executors.local import run_local  # noqa: E402
from atmbench.finetune import Recipe  # noqa: E402
from atmbench.hookspecs import hookimpl  # noqa: E402
from atmbench.store import ResultStore  # noqa: E402
from atmbench.suite import Suite, SuiteDataError  # noqa: E402

TINY = "atmb-tiny-clip"
MODEL = f"{TINY}:random"
TINY_CONFIG = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
ROWS = {"train": 40, "test": 12}
TWO_STEPS = Recipe(epochs=1, lr=1e-3, batch_size=18, warmup_steps=1)
"""36 train rows after the 10% validation carve-out, batch 18, one epoch: two steps."""


@pytest.fixture(scope="module", autouse=True)
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("oc") / f"{TINY}.json"
    path.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(path)


def _features(task: str):
    spec = TASKS[task]
    n = len(CLASSNAMES[task])
    label = {
        "pcam": datasets.Value("bool"),  # 1aurent/PatchCamelyon: bool labels
        "fer2013": datasets.Value("int64"),  # clip-benchmark/wds_fer2013: webdataset "cls"
    }.get(task, datasets.ClassLabel(names=[f"hub_{i}" for i in range(n)]))
    return datasets.Features(
        {
            spec.image_column: datasets.Image(),
            spec.label_column: label,
            "extra": datasets.Value("int64"),
        }
    )


def fake_hub(calls: list):
    """A stand-in for ``datasets.load_dataset`` serving hub-format splits of every task."""
    by_path = {spec.path: name for name, spec in TASKS.items()}

    def load_dataset(path, name=None, split=None, cache_dir=None):
        task = by_path[path]
        spec = TASKS[task]
        assert name == spec.config and split in (spec.train_split, spec.test_split)
        calls.append((path, split))
        n, classes = ROWS["train" if split == spec.train_split else "test"], len(CLASSNAMES[task])
        rng = np.random.default_rng(len(calls))
        labels = [i % classes for i in range(n)]
        images = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(n)]
        label_values = [bool(y) for y in labels] if task == "pcam" else labels
        columns = {spec.image_column: images, spec.label_column: label_values, "extra": labels}
        return datasets.Dataset.from_dict(columns, features=_features(task))

    return load_dataset


@pytest.fixture
def hub(monkeypatch):
    calls: list = []
    monkeypatch.setattr(datasets, "load_dataset", fake_hub(calls))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # the fake hub answers: the download command's reachability probe must say so too
    probe = importlib.import_module("atmbench.default_plugins.suites.vision.download")
    monkeypatch.setattr(probe, "hub_unreachable", lambda: None)
    return calls


def test_tables_are_consistent():
    assert SUITES["vision8"] == (
        "sun397", "cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"
    )  # fmt: skip
    assert len(SUITES["vision14"]) == 14 and len(SUITES["vision20"]) == 20
    assert set(TASKS) == set(CLASSNAMES) == set(TEMPLATES)
    sizes = {t: len(CLASSNAMES[t]) for t in ("sun397", "cars", "resisc45", "gtsrb", "dtd")}
    assert sizes == {"sun397": 397, "cars": 196, "resisc45": 45, "gtsrb": 43, "dtd": 47}
    assert (
        len(TEMPLATES["resisc45"]) == 18 and TEMPLATES["resisc45"][7] == "aerial imagery of a {}."
    )
    assert TEMPLATES["dtd"][3] == "a photo of a {} object."


def test_validation_split_is_task_vectors():
    # task_vectors asserts its MNISTVal train subset starts at index 36044 (60,000 rows).
    train, val = data.validation_split(60_000)
    assert (len(train), len(val)) == (55_000, 5_000)  # 10% capped at 5,000
    assert train[0].item() == 36044
    assert sorted(torch.cat([train, val]).tolist()) == list(range(60_000))
    split = torch.utils.data.random_split(range(40), [36, 4], torch.Generator().manual_seed(0))
    assert data.validation_split(40)[1].tolist() == split[1].indices


def test_recipe_is_task_vectors():
    recipe = task_vectors_recipe(TASKS["mnist"].epochs)
    assert (recipe.lr, recipe.batch_size, recipe.weight_decay) == (1e-5, 128, 0.1)
    assert (recipe.warmup_steps, recipe.schedule, recipe.grad_clip) == (500, "cosine", 1.0)
    assert recipe.steps(54_000) == 2110  # ⌈54,000 / 128⌉ = 422 steps x 5 epochs


def test_model_names():
    assert bb.parse_model("ViT-B-32") == bb.ModelId("ViT-B-32", "openai")
    assert bb.parse_model("ViT-B-16:laion2b_s34b_b88k").tag == "laion2b_s34b_b88k"
    with pytest.raises(ValueError, match="needs a pretrained tag"):
        bb.parse_model("ViT-H-14")
    with pytest.raises(ValueError, match="unknown pretrained tag 'nope'.*openai"):
        bb.create(bb.parse_model("ViT-B-32:nope"), "unused", "vision8")


def _towers_activations(model) -> tuple[str, str]:
    """(image tower, text tower) activation of a built CLIP model."""
    return bb.activation(model.visual), bb.activation(model.transformer)


def test_openai_tags_run_quick_gelu(tmp_path, monkeypatch):
    """OpenAI's weights were trained with QuickGELU; open_clip >= 2.29 builds NAME with GELU.

    bb.create is the production path; only the weight download is taken out (the wrapper
    builds the same architecture with random weights), so the test needs no network.
    """
    real = open_clip.create_model_and_transforms
    asked = []

    def without_weights(name, pretrained=None, **kwargs):
        asked.append((name, pretrained, kwargs.get("force_quick_gelu")))
        return real(name, pretrained=None, **kwargs)

    monkeypatch.setattr(open_clip, "create_model_and_transforms", without_weights)
    openai = bb.create(bb.parse_model("ViT-B-32"), tmp_path, "vision8")
    assert _towers_activations(openai.model) == ("QuickGELU", "QuickGELU")
    assert openai.activation == "QuickGELU"
    mlp = openai.model.visual.transformer.resblocks[0].mlp
    assert isinstance(mlp.gelu, open_clip.transformer.QuickGELU)
    laion = bb.create(bb.parse_model("ViT-B-32:laion2b_s34b_b79k"), tmp_path, "vision8")
    assert _towers_activations(laion.model) == ("GELU", "GELU")  # its config's activation
    assert asked == [("ViT-B-32", "openai", True), ("ViT-B-32", "laion2b_s34b_b79k", False)]
    assert not bb.quick_gelu(bb.parse_model("ViT-B-32:random"))
    # A config that already says QuickGELU keeps it whatever the tag.
    assert open_clip.get_model_config("ViT-B-32-quickgelu")["quick_gelu"] is True


def test_missing_weights_offline_name_the_command(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read at import: set the constant as well
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SuiteDataError, match="atmbench download --suite vision8 --model ViT-B-32"):
        bb.create(bb.parse_model("ViT-B-32"), tmp_path, "vision8")


def test_missing_data_offline_names_tasks_and_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SuiteDataError) as info:
        VisionBenchmark(MODEL, tmp_path, torch.device("cpu"), suite="vision8", tasks=["dtd"])
    message = str(info.value)
    assert "dtd (tanganke/dtd)" in message
    assert f"atmbench download --suite vision8 --model {MODEL}" in message


def test_fetch_normalises_to_the_on_disk_layout(tmp_path, hub):
    data.fetch(TASKS["pcam"], tmp_path)
    data.fetch(TASKS["fer2013"], tmp_path)
    assert hub == [("1aurent/PatchCamelyon", "train"), ("1aurent/PatchCamelyon", "test")] + [
        ("clip-benchmark/wds_fer2013", "train"),
        ("clip-benchmark/wds_fer2013", "test"),
    ]
    pcam = datasets.load_from_disk(str(tmp_path / "datasets" / "pcam"))
    assert pcam["train"].column_names == ["image", "label"]
    assert pcam["train"].features["label"].names == list(CLASSNAMES["pcam"])
    assert pcam["train"]["label"][:4] == [0, 1, 0, 1]  # bools became class indices
    fer = datasets.load_from_disk(str(tmp_path / "datasets" / "fer2013"))
    assert fer["test"].num_rows == 12 and fer["test"].features["label"].num_classes == 7
    assert data.read_source(tmp_path, "fer2013")["rows"] == {"train": 40, "test": 12}
    assert not [p for p in (tmp_path / "datasets").iterdir() if p.name.startswith(".")]


def test_download_then_offline_run(tmp_path, hub, monkeypatch):
    ready = download("vision8", MODEL, tmp_path)
    assert ready == list(SUITES["vision8"]) and len(hub) == 16
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets, "load_dataset", None)  # any hub access would now fail
    bench = VisionBenchmark(MODEL, tmp_path, torch.device("cpu"), suite="vision8")
    assert bench.head("sun397").weight.shape == (397, 16)
    image, label = bench.dataset("cars", "test")[5]
    assert image.shape == (3, 32, 32) and label == 5


def test_zero_shot_head_is_the_template_average(tmp_path, hub):
    bench = VisionBenchmark(MODEL, tmp_path, torch.device("cpu"), suite="vision8", tasks=["gtsrb"])
    torch.manual_seed(0)  # the same random-init CLIP the benchmark built
    clip, _, _ = open_clip.create_model_and_transforms(TINY)
    tokenizer = open_clip.get_tokenizer(TINY)
    name = CLASSNAMES["gtsrb"][14]
    assert name == "stop"
    prompts = [
        'a zoomed in photo of a "stop" traffic sign.',
        'a centered photo of a "stop" traffic sign.',
        'a close up photo of a "stop" traffic sign.',
    ]
    with torch.no_grad():
        emb = torch.nn.functional.normalize(clip.encode_text(tokenizer(prompts)), dim=-1)
    expected = torch.nn.functional.normalize(emb.mean(0), dim=-1)
    head = bench.head("gtsrb")
    torch.testing.assert_close(head.weight[14], expected, atol=1e-5, rtol=1e-5)
    # The head is cached under the activation the text tower ran with (the tiny config's).
    assert bench.activation == "QuickGELU"
    cache = EntryCache(tmp_path / "heads")
    key = head_key(MODEL, "gtsrb", CLASSNAMES["gtsrb"], "QuickGELU")
    assert cache.lookup(key) is not None
    assert cache.lookup(dict(key, activation="GELU")) is None
    assert head.scale == pytest.approx(float(clip.logit_scale.detach().exp()))  # 1 / 0.07
    base = bench.base_state()
    assert set(base) == set(clip.visual.state_dict())
    assert all(torch.equal(base[k], v) for k, v in clip.visual.state_dict().items())


def test_class_name_sets_fusionbench_and_tall(tmp_path, hub):
    differ = {"pets", "food101", "kmnist", "fer2013", "flowers102"}
    for task in SUITES["vision20"]:
        same = classnames(task, "tall") == classnames(task, "fusionbench") == CLASSNAMES[task]
        assert same == (task not in differ), task
        assert len(classnames(task, "tall")) == len(CLASSNAMES[task])
    assert classnames("pets", "tall")[2] == "American Pit Bull Terrier"
    assert classnames("pets", "fusionbench")[2] == "american_pit_bull_terrier"
    assert classnames("food101", "tall")[0] == "apple_pie"
    assert classnames("kmnist", "tall")[:3] == ("o", "ki", "su")
    assert classnames("flowers102", "tall")[59] == "pink and yellow dahlia"
    # FER2013: the hub's label order (neutral 5th), TALL's synonyms as its prompts render them.
    assert classnames("fer2013", "tall")[3:5] == ("['happy', 'smiling']", "['neutral', 'bored']")
    with pytest.raises(ValueError, match="unknown class-name set 'x' .*fusionbench, tall"):
        classnames("pets", "x")
    # The choice is the suite: part of every cell's config and of the expert cache key.
    assert SUITES["vision20_tall"] == SUITES["vision20"]
    cells = runner.plan("vision14_tall", "ViT-B-32", ["ta"], [0])
    assert {c.config()["suite"] for c in cells} == {"vision14_tall"}
    assert runner.plan("vision14", "ViT-B-32", ["ta"], [0])[0].key != cells[0].key
    tall = VisionBenchmark(
        MODEL, tmp_path, torch.device("cpu"), suite="vision14_tall", tasks=["pets"]
    )
    plain = VisionBenchmark(MODEL, tmp_path, torch.device("cpu"), suite="vision14", tasks=["pets"])
    assert (tall.naming, plain.naming) == ("tall", "fusionbench")
    assert tall.fingerprint != plain.fingerprint
    cache = EntryCache(tmp_path / "heads")
    for names in (classnames("pets", "tall"), CLASSNAMES["pets"]):
        assert cache.lookup(head_key(MODEL, "pets", names, "QuickGELU")) is not None
    assert not torch.equal(tall.head("pets").weight, plain.head("pets").weight)


def test_whole_path_through_the_runner(tmp_path, hub, register, monkeypatch):
    monkeypatch.setenv("ATMBENCH_HOME", str(tmp_path))
    tasks = ("eurosat", "pcam")
    load = functools.partial(
        VisionBenchmark, suite="vision8", tasks=tasks, recipes=dict.fromkeys(tasks, TWO_STEPS)
    )

    class Plugin:
        @hookimpl
        def register_suites(self, register):
            register(Suite("vision_tiny", tasks, (MODEL,), load, any_model=True))

    store = ResultStore(tmp_path / "results.sqlite")
    ws = runner.Workspace(tmp_path, torch.device("cpu"), progress=False)
    with register(Plugin(), "vision_tiny"):
        cells = [
            c for c in runner.plan("vision_tiny", MODEL, ["ta:lam=0.5"], [0]) if c.method != "mtl"
        ]
        summary = run_local(cells, store, ws)
    assert summary.failed == [] and summary.ran == 3
    bench = ws.benchmark("vision_tiny", MODEL)
    experts = ws.experts(bench, 0)
    assert [experts.stats[t].steps for t in tasks] == [2, 2]
    assert [experts.stats[t].examples for t in tasks] == [36, 36]
    rows = store.frame("test")
    assert len(rows) == 3 * len(tasks)
    # The stored TA row is θ0 + 0.5 Σ τ evaluated under the frozen zero-shot heads.
    vectors = experts.vectors()
    base = bench.base_state()
    merged = {k: v + 0.5 * vectors.stacked(k).sum(0) for k, v in base.items()}
    expected = runner.evaluate_state(bench, merged, "test")
    ta = rows[rows.method == "ta:lam=0.5"].set_index("task").accuracy.to_dict()
    assert ta == pytest.approx(expected)
    assert all(acc in {100 * k / 12 for k in range(13)} for acc in rows.accuracy)
