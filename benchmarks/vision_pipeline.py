"""The vision pipeline's throughput against the bare model, before and after the image cache.

Shared by ``gpu_throughput.py`` (ViT-B-32 on CUDA) and ``test_vision_throughput.py`` (a
small ViT on the CPU). Both write synthetic 224 px JPEGs in the vision suites' on-disk
layout, load them through :class:`VisionBenchmark` and time, in one process and on one
device:

* the bare model: the image tower and head on a batch already on the device, forward
  (no grad) and a training step (forward, backward, clipping, AdamW);
* **before**: the per-image path, the suite's code until the image cache: JPEG decode and
  open_clip's transforms per image in ``DataLoader`` workers, for evaluation
  (``evaluate``) and fine-tuning (``finetune``);
* **after**: the cached path: the one-time cache build, then evaluation (a first pass and a
  second one, as a validation search repeats it) and fine-tuning from the memory-mapped
  ``uint8`` cache with preprocessing on the device.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

TASKS = ("eurosat", "gtsrb")
TRAIN_BATCH, EVAL_BATCH = 128, 512


def synthetic_suite(home: Path, n_train: int, n_test: int, tasks=TASKS) -> None:
    """Smooth random 224 px JPEGs (upsampled 14 px noise) in the vision suites' layout."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
    from PIL import Image as PILImage

    from atmbench.default_plugins.suites.vision import data
    from atmbench.default_plugins.suites.vision.classnames import CLASSNAMES

    rng = np.random.default_rng(0)
    for task in tasks:
        names = list(CLASSNAMES[task])
        splits = {}
        for split, n in (("train", n_train), ("test", n_test)):
            images = []
            for _ in range(n):
                small = PILImage.fromarray(rng.integers(0, 255, (14, 14, 3), dtype=np.uint8))
                buffer = io.BytesIO()
                small.resize((224, 224), PILImage.BICUBIC).save(buffer, "JPEG", quality=90)
                images.append({"bytes": buffer.getvalue(), "path": None})
            labels = rng.integers(0, len(names), n).tolist()
            features = Features({"image": Image(), "label": ClassLabel(names=names)})
            splits[split] = Dataset.from_dict({"image": images, "label": labels}, features)
        target = data.task_dir(home, task)
        DatasetDict(splits).save_to_disk(str(target))
        source = {"path": "synthetic", "rows": {"train": n_train, "test": n_test}}
        (target / data.SOURCE).write_text(json.dumps(source))


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds ``fn`` takes, the device's queued work included."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def bare_model(bench, task: str, steps: int) -> dict[str, float]:
    """Forward and training-step images/s with the batch already on the device."""
    device = bench.device
    amp = device.type == "cuda"
    model = bench.task_model(task, bench.backbone())
    size = bench._plan[0].size
    images = torch.randn(EVAL_BATCH, 3, size, size, device=device)
    labels = torch.randint(0, 10, (EVAL_BATCH,), device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1)

    def forward():
        model.eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            for _ in range(steps):
                model([images, labels])

    def train():
        model.train()
        for _ in range(steps):
            batch = [images[:TRAIN_BATCH], labels[:TRAIN_BATCH]]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                loss = model.loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()

    forward(), train()  # warm-up: kernels, autotuning, allocator
    return {
        "forward": steps * EVAL_BATCH / timed(forward, device),
        "train_step": steps * TRAIN_BATCH / timed(train, device),
    }


def per_image(bench, task: str, split: str):
    """The split as the per-image path serves it (the suite's code before the image cache)."""
    from atmbench.default_plugins.suites.vision import data

    rows = bench._rows[task]
    train_idx, _ = bench._split[task]
    if split == "train":
        return data.ImageDataset(rows["train"], train_idx, bench._preprocess["train"])
    return data.ImageDataset(rows["test"], None, bench._preprocess["eval"])


def measure(bench, workers: int, steps: int = 10) -> dict[str, float]:
    """images/s of every stage (and the cache build's seconds), in one process."""
    from dataclasses import replace

    from atmbench.evaluate import score
    from atmbench.finetune import finetune

    device, tasks = bench.device, bench.tasks
    out = bare_model(bench, tasks[0], steps)
    recipe = replace(bench.recipe(tasks[0]), epochs=1, warmup_steps=10, num_workers=workers)
    metrics = bench.metrics(tasks[0])
    encoder = bench.backbone()
    models = {t: bench.task_model(t, encoder) for t in tasks}

    def evaluate(datasets: dict, **kwargs) -> float:
        seconds = sum(
            timed(lambda t=t: score(models[t], datasets[t], metrics, **kwargs), device)
            for t in tasks
        )
        return sum(len(d) for d in datasets.values()) / seconds

    def train(datasets: dict, recipe) -> float:
        seconds, examples = 0.0, 0
        for t in tasks:
            model = bench.task_model(t, bench.backbone())
            done = []

            def run(t=t, model=model, done=done):
                done.append(finetune(model, datasets[t], recipe, 0, progress=False))

            seconds += timed(run, device)
            examples += done[0].examples
        return examples / seconds

    before_test = {t: per_image(bench, t, "test") for t in tasks}
    before_train = {t: per_image(bench, t, "train") for t in tasks}
    score(models[tasks[0]], before_test[tasks[0]], metrics, num_workers=workers)  # warm-up
    out["eval_before"] = evaluate(before_test, num_workers=workers)
    out["train_before"] = train(before_train, recipe)
    out["cache_s"] = timed(
        lambda: [bench.dataset(t, s) for t in tasks for s in ("train", "test")], device
    )
    after_test = {t: bench.dataset(t, "test") for t in tasks}
    out["eval_after"] = evaluate(after_test)
    out["eval_after_again"] = evaluate(after_test)
    out["train_after"] = train({t: bench.dataset(t, "train") for t in tasks}, recipe)
    out["images"] = sum(len(bench._rows[t][s]) for t in tasks for s in ("train", "test"))
    return out


def table(results: dict[str, float], workers: int) -> list[str]:
    """The Markdown table of one run."""
    fwd, step = results["forward"], results["train_step"]
    rows = [
        ("bare model: forward, no grad", fwd, "1.00"),
        ("bare model: train step (forward, backward, AdamW)", step, "1.00"),
        (
            f"before: evaluate, per-image, {workers} loader workers",
            results["eval_before"],
            f"{results['eval_before'] / fwd:.2f} of forward",
        ),
        (
            "after: evaluate, image cache (first pass)",
            results["eval_after"],
            f"{results['eval_after'] / fwd:.2f} of forward",
        ),
        (
            "after: evaluate again (a validation search's next pass)",
            results["eval_after_again"],
            f"{results['eval_after_again'] / fwd:.2f} of forward",
        ),
        (
            f"before: fine-tune, per-image, {workers} loader workers",
            results["train_before"],
            f"{results['train_before'] / step:.2f} of the train step",
        ),
        (
            "after: fine-tune, image cache",
            results["train_after"],
            f"{results['train_after'] / step:.2f} of the train step",
        ),
    ]
    lines = ["| stage | images/s | ratio to the bare model |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {value:,.0f} | {ratio} |" for name, value, ratio in rows]
    lines.append(
        f"| image cache build, once ({results['images']:,} images) | "
        f"{results['images'] / results['cache_s']:,.0f} | {results['cache_s']:.1f} s |"
    )
    return lines
