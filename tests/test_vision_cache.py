"""The decoded-image cache and the device-side batches of the vision suites.

Tiny hub-format datasets (``test_vision_suite``'s fake hub, the real ``save_to_disk``
layout) and a tiny open_clip config; decodes are counted at the cache's one decode call.
"""

from __future__ import annotations

import functools
import json
import logging

import numpy as np
import pytest
import torch

datasets = pytest.importorskip("datasets")
open_clip = pytest.importorskip("open_clip")

from test_vision_suite import MODEL, ROWS, TWO_STEPS, fake_hub, tiny_config  # noqa: E402, F401
from torchvision import transforms as T  # noqa: E402

from atmbench import runner  # noqa: E402
from atmbench.default_plugins.suites.vision import batches, data, imagecache  # noqa: E402
from atmbench.default_plugins.suites.vision.benchmark import VisionBenchmark  # noqa: E402
from atmbench.evaluate import score  # noqa: E402
from atmbench.executors.local import run_local  # noqa: E402
from atmbench.finetune import finetune  # noqa: E402
from atmbench.hookspecs import hookimpl  # noqa: E402
from atmbench.store import ResultStore  # noqa: E402
from atmbench.suite import Suite  # noqa: E402

TASKS = ("eurosat", "pcam")


@pytest.fixture
def hub(monkeypatch):
    """The hub's datasets, served offline by ``test_vision_suite``'s fake."""
    monkeypatch.setattr(datasets, "load_dataset", fake_hub([]))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.fixture
def decodes(monkeypatch):
    """Every image the cache decodes, as (task-independent) one call each."""
    calls = []
    real = imagecache.decode

    def counted(value, feature):
        calls.append(1)
        return real(value, feature)

    monkeypatch.setattr(imagecache, "decode", counted)
    monkeypatch.setattr(imagecache, "_verified", set())
    return calls


def _bench(home, tasks=TASKS) -> VisionBenchmark:
    recipes = dict.fromkeys(tasks, TWO_STEPS)
    return VisionBenchmark(
        MODEL, home, torch.device("cpu"), suite="vision8", tasks=tasks, recipes=recipes
    )


def _per_image(bench: VisionBenchmark, task: str, split: str) -> data.ImageDataset:
    """The split as the per-image path serves it (PIL resize, ToTensor, Normalize)."""
    rows = bench._rows[task]
    train_idx, val_idx = bench._split[task]
    if split == "test":
        return data.ImageDataset(rows["test"], None, bench._preprocess["eval"])
    return data.ImageDataset(rows["train"], val_idx, bench._preprocess["eval"])


def test_cache_is_built_once_and_reused(tmp_path, hub, decodes, register, monkeypatch):
    """Cells, seeds, methods and a second run (a fresh process's benchmark) decode nothing again."""
    monkeypatch.setenv("ATMBENCH_HOME", str(tmp_path))
    load = functools.partial(
        VisionBenchmark, suite="vision8", tasks=TASKS, recipes=dict.fromkeys(TASKS, TWO_STEPS)
    )

    class Plugin:
        @hookimpl
        def register_suites(self, register):
            register(Suite("vision_tiny", TASKS, (MODEL,), load, any_model=True))

    store = ResultStore(tmp_path / "results.sqlite")
    every = len(TASKS) * (ROWS["train"] + ROWS["test"])
    with register(Plugin(), "vision_tiny"):
        ws = runner.Workspace(tmp_path, torch.device("cpu"), progress=False)
        cells = runner.plan("vision_tiny", MODEL, ["ta:lam=0.5", "average"], [0, 1])
        summary = run_local([c for c in cells if c.method != "mtl"], store, ws)
        assert summary.failed == [] and summary.ran == 8
        assert len(decodes) == every  # train (serving train and val) and test, once each
        imagecache._verified.clear()  # a later run in a new process
        ws = runner.Workspace(tmp_path, torch.device("cpu"), progress=False)
        cells = runner.plan("vision_tiny", MODEL, ["ta:lam=0.3", "atm:iterations=1"], [2])
        summary = run_local([c for c in cells if c.method != "mtl"], store, ws)
        assert summary.failed == [] and summary.ran == 4
    assert len(decodes) == every
    cached = [p for p in (tmp_path / "image-cache").glob("*/*") if p.is_dir()]
    entries = sorted(p.name.split("-")[0] for p in cached)
    assert entries == ["test", "test", "train", "train"]
    assert not list((tmp_path / "image-cache").glob("*/.*"))  # no scratch left behind


def test_cached_inputs_equal_the_per_image_path(tmp_path, hub, decodes):
    bench = _bench(tmp_path)
    for task in TASKS:
        for split in ("val", "test"):
            cached = bench.dataset(task, split)
            assert isinstance(cached, batches.CachedImages)
            plain = _per_image(bench, task, split)
            expected = torch.stack([plain[i][0] for i in range(len(plain))])
            labels = torch.tensor([plain[i][1] for i in range(len(plain))])
            got = list(cached.device_batches(5, torch.device("cpu")))
            assert torch.equal(torch.cat([b[0] for b in got]), expected)  # bit for bit
            assert torch.equal(torch.cat([b[1] for b in got]), labels)
            image, label = cached[3]
            assert torch.equal(image, expected[3]) and int(label) == int(labels[3])
    model = bench.task_model("eurosat", bench.backbone())
    metrics = bench.metrics("eurosat")
    test = bench.dataset("eurosat", "test")
    assert score(model, test, metrics) == score(
        model, _per_image(bench, "eurosat", "test"), metrics
    )
    assert bench.dataset("eurosat", "test") is test  # one dataset object per split
    with pytest.raises(ValueError, match="unknown split 'dev' \\(valid: train, val, test\\)"):
        bench.dataset("eurosat", "dev")


def _rows(n=12, seed=0):
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 255, (20, 28, 3), dtype=np.uint8) for _ in range(n)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    return datasets.Dataset.from_dict({"image": images, "label": list(range(n))}, features)


RESIZE = imagecache.Resize(16, (T.Resize(16), T.CenterCrop(16)))


def test_a_killed_build_is_never_trusted(tmp_path, decodes, monkeypatch):
    rows = _rows()
    real, removed = imagecache.decode, []

    def dies(value, feature):
        if len(decodes) == 8:
            raise KeyboardInterrupt("killed")
        return real(value, feature)  # counted

    monkeypatch.setattr(imagecache, "decode", dies)
    # a kill -9 runs no clean-up: keep the scratch directory the build was writing
    monkeypatch.setattr(imagecache.shutil, "rmtree", lambda path, **kw: removed.append(path))
    with pytest.raises(KeyboardInterrupt):
        imagecache.ensure(tmp_path, "t", "train", rows, RESIZE)
    assert not [p for p in (tmp_path / "t").glob("train-*") if p.is_dir()]
    assert [p for p in (tmp_path / "t").iterdir() if p.name.startswith(".train-")]  # half a cache
    monkeypatch.undo()
    monkeypatch.setattr(imagecache, "_verified", set())
    entry = imagecache.ensure(tmp_path, "t", "train", rows, RESIZE)
    assert not [p for p in (tmp_path / "t").iterdir() if p.name.startswith(".")]  # cleaned
    expected = np.stack([RESIZE(rows[i]["image"].convert("RGB")) for i in range(len(rows))])
    assert np.array_equal(entry.array(), expected)


def test_a_corrupt_cache_is_rebuilt(tmp_path, decodes, caplog):
    rows = _rows()
    entry = imagecache.ensure(tmp_path, "t", "train", rows, RESIZE)
    good = np.array(entry.array())
    assert len(decodes) == 12
    imagecache.ensure(tmp_path, "t", "train", rows, RESIZE)
    assert len(decodes) == 12  # reused
    path = entry.directory / imagecache.IMAGES
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    path.write_bytes(bytes(raw))
    imagecache._verified.clear()  # a new process: the checksum is read again
    with caplog.at_level(logging.WARNING):
        again = imagecache.ensure(tmp_path, "t", "train", rows, RESIZE)
    assert "corrupt image cache, rebuilding" in caplog.text and "checksum" in caplog.text
    assert len(decodes) == 24 and np.array_equal(again.array(), good)
    (entry.directory / imagecache.META).write_text("{not json")
    imagecache._verified.clear()
    imagecache.ensure(tmp_path, "t", "train", rows, RESIZE)
    assert len(decodes) == 36
    meta = json.loads((entry.directory / imagecache.META).read_text())
    assert meta["shape"] == [12, 3, 16, 16] and len(meta["sha256"]) == 1
    other = imagecache.ensure(
        tmp_path, "t", "train", rows, imagecache.Resize(8, (T.Resize(8), T.CenterCrop(8)))
    )
    assert other.directory != entry.directory and other.shape == (12, 3, 8, 8)


def _dataset(n=10, size=16, preprocess=None, resident=None):
    images = np.random.default_rng(0).integers(0, 255, (n, 3, size, size), dtype=np.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    preprocess = preprocess or batches.Preprocess(mean, std)
    ds = batches.CachedImages(
        lambda: images, torch.arange(n) * 7, torch.arange(1, n), preprocess, resident, "k"
    )
    return ds, images


def test_training_batches_shuffle_and_crop_per_seed(tmp_path):
    crop = batches.Preprocess((0.5,) * 3, (0.25,) * 3, scale=(0.9, 1.0))
    ds, images = _dataset(preprocess=crop)
    cpu = torch.device("cpu")

    def epoch(seed):
        return list(ds.device_batches(4, cpu, torch.Generator().manual_seed(seed), drop_last=True))

    first, again, other = epoch(0), epoch(0), epoch(1)
    assert [len(b[0]) for b in first] == [4, 4]  # 9 items, drop_last
    pairs = zip(first, again, strict=True)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in pairs)
    assert not torch.equal(first[0][0], other[0][0])
    labels = torch.cat([b[1] for b in first])
    assert set(labels.tolist()) <= {7 * i for i in range(1, 10)} and len(set(labels.tolist())) == 8
    # No crop (scale 1, aspect 1): the normalised cached image itself.
    whole = batches.Preprocess((0.5,) * 3, (0.25,) * 3, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    row = torch.from_numpy(images[3:4].copy())
    expected = batches.Preprocess((0.5,) * 3, (0.25,) * 3)(row)
    torch.testing.assert_close(whole(row, torch.Generator()), expected, atol=1e-5, rtol=0)


def test_crop_boxes_follow_random_resized_crop():
    boxes = batches.crop_boxes(
        4000, 24, 32, (0.9, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0)
    )
    top, left, h, w = boxes.T
    assert ((top >= 0) & (left >= 0) & (top + h <= 24) & (left + w <= 32)).all()
    area = h * w / (24 * 32)
    assert area.min() >= 0.85 and area.max() <= 1.0
    assert ((w / h >= 0.7) & (w / h <= 1.42)).all()
    # torchvision draws from the same law: compare the mean box
    torch.manual_seed(0)
    theirs = torch.tensor(
        [
            T.RandomResizedCrop.get_params(torch.zeros(3, 24, 32), [0.9, 1.0], [3 / 4, 4 / 3])
            for _ in range(4000)
        ],
        dtype=torch.float,
    )
    torch.testing.assert_close(boxes.mean(0), theirs.mean(0), atol=0.15, rtol=0)
    # the fallback when no try fits: the centre crop clamped to the ratio
    tall = batches.crop_boxes(3, 40, 10, (1.0, 1.0), (3 / 4, 4 / 3), torch.Generator())
    assert tall.tolist() == [[13.0, 0.0, 13.0, 10.0]] * 3  # h = round(10 / (3/4)), (40 - h) // 2


def test_resident_splits_serve_the_same_batches():
    cpu = torch.device("cpu")
    held = batches.Resident(budget=10_000)
    ds, _ = _dataset(resident=held)
    streamed, _ = _dataset()
    got = [b[0] for b in ds.device_batches(4, cpu)]
    assert list(held._held) == [("k", "cpu")]
    assert torch.equal(torch.cat(got), torch.cat([b[0] for b in streamed.device_batches(4, cpu)]))
    other = batches.CachedImages(
        lambda: np.zeros((9, 3, 16, 16), np.uint8), torch.zeros(9), None, ds.preprocess, held, "j"
    )
    list(other.device_batches(4, cpu))
    assert list(held._held) == [("j", "cpu")]  # least recently used out: 2 x 6912 > 10,000
    big = batches.Resident(budget=100)
    ds, _ = _dataset(resident=big)
    list(ds.device_batches(4, cpu))
    assert not big._held  # too large to hold: streamed


def test_finetune_trains_from_cached_batches(tmp_path, hub, decodes):
    bench = _bench(tmp_path, ("eurosat",))
    model = bench.task_model("eurosat", bench.backbone())
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    stats = finetune(model, bench.dataset("eurosat", "train"), TWO_STEPS, seed=0, progress=False)
    assert (stats.steps, stats.examples) == (2, 36)
    after = model.backbone.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    again = bench.task_model("eurosat", bench.backbone())
    finetune(again, bench.dataset("eurosat", "train"), TWO_STEPS, seed=0, progress=False)
    assert all(torch.equal(after[k], v) for k, v in again.backbone.state_dict().items())


def test_plain_datasets_load_in_process_inside_a_daemonic_worker(monkeypatch):
    """A multi-gpu worker is daemonic and may not start loader processes: it loads itself."""
    import multiprocessing

    from torch.utils.data import TensorDataset

    from atmbench.finetune import Recipe, loader_workers
    from atmbench.heads import Classifier
    from atmbench.metrics import ACCURACY

    torch.manual_seed(0)
    model = Classifier(torch.nn.Linear(4, 5), torch.nn.Linear(5, 3))
    data = TensorDataset(torch.randn(20, 4), torch.randint(0, 3, (20,)))
    assert loader_workers(4) == 4
    expected = score(model, data, [ACCURACY], batch_size=8)
    monkeypatch.setattr(multiprocessing.current_process(), "daemon", True)
    assert loader_workers(4) == 0
    assert score(model, data, [ACCURACY], batch_size=8, num_workers=2) == expected
    recipe = Recipe(epochs=1, lr=0.1, batch_size=8, num_workers=2)
    assert finetune(model, data, recipe, seed=0, progress=False).steps == 3
