"""Images/s of the vision pipeline on one GPU versus the bare model: the pipeline's overhead.

Builds a two-task suite of synthetic 224 px JPEGs in the exact on-disk layout the vision
suites read, loads it with ``ViT-B-32:random`` through :class:`VisionBenchmark`, then
times, on the same device in one process:

* model only: ``model.visual`` forward (no grad) and forward+backward+AdamW step on
  batches already on the GPU (bf16 autocast, batch 128), the ceiling;
* pipeline: ``finetune`` (JPEG decode + open_clip preprocessing in the recipe's
  data-loader workers, frozen zero-shot head, AMP, clipping, schedule), the TA merge, and
  ``atmbench.evaluate.accuracy`` on the test split.

Usage (GPU machine): ``python benchmarks/gpu_throughput.py [--train 2048 --test 2048]``.
Prints one Markdown table. Not a pytest benchmark: it needs CUDA and takes a minute.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

BATCH = 128
TASKS = ("eurosat", "gtsrb")


def synthetic_suite(home: Path, n_train: int, n_test: int) -> None:
    """Smooth random 224 px JPEGs (upsampled 14 px noise) in the vision suites' layout."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
    from PIL import Image as PILImage

    from atmbench.default_plugins.suites.vision import data
    from atmbench.default_plugins.suites.vision.classnames import CLASSNAMES

    rng = np.random.default_rng(0)
    for task in TASKS:
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


def timed(fn, sync: bool = True) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if sync:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def model_only(encoder: torch.nn.Module, head: torch.nn.Module, steps: int) -> dict[str, float]:
    """Forward and training step images/s with the batch already on the GPU."""
    device = next(encoder.parameters()).device
    images = torch.randn(BATCH, 3, 224, 224, device=device)
    labels = torch.randint(0, 10, (BATCH,), device=device)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-5, weight_decay=0.1)

    def forward():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            for _ in range(steps):
                head(encoder(images))

    def train():
        for _ in range(steps):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(head(encoder(images)).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
            optimizer.step()

    encoder.eval()
    forward()  # warm-up: kernels, autotuning
    fwd = steps * BATCH / timed(forward)
    encoder.train()
    train()
    step = steps * BATCH / timed(train)
    return {"forward": fwd, "train_step": step}


@torch.no_grad()
def _accuracy_with_workers(encoder, head, dataset, workers: int) -> float:
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=512, num_workers=workers, pin_memory=True
    )
    correct = 0
    for images, labels in loader:
        images, labels = images.cuda(non_blocking=True), labels.cuda(non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            correct += (head(encoder(images)).argmax(-1) == labels).sum().item()
    return 100.0 * correct / len(dataset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=2048, help="train images per task")
    parser.add_argument("--test", type=int, default=2048, help="test images per task")
    parser.add_argument("--workers", type=int, default=8, help="fine-tuning loader workers")
    args = parser.parse_args()

    import atmbench
    from atmbench.default_plugins.suites.vision.benchmark import VisionBenchmark
    from atmbench.evaluate import score
    from atmbench.finetune import Recipe, finetune, state_on_cpu, task_vector
    from atmbench.metrics import ACCURACY

    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    home = Path(tempfile.mkdtemp(prefix="atmb-gpu-"))
    started = time.perf_counter()
    synthetic_suite(home, args.train, args.test)
    made = time.perf_counter() - started
    recipe = Recipe(epochs=1, lr=1e-5, batch_size=BATCH, warmup_steps=500, num_workers=args.workers)
    bench = VisionBenchmark(
        "ViT-B-32:random",
        home,
        device,
        suite="vision8",
        tasks=TASKS,
        recipes=dict.fromkeys(TASKS, recipe),
    )
    ceiling = model_only(bench.backbone(), bench.head(TASKS[0]), steps=20)

    base = bench.base_state()
    experts, train_s, train_n = {}, 0.0, 0
    finetune(
        bench.task_model(TASKS[0], bench.backbone()),
        bench.dataset(TASKS[0], "train"),
        recipe,
        0,
        0.25,
        progress=False,
    )
    for task in TASKS:
        encoder = bench.backbone()
        stats = None

        def run(encoder=encoder, task=task):
            nonlocal stats
            model = bench.task_model(task, encoder)
            stats = finetune(model, bench.dataset(task, "train"), recipe, 0, progress=False)

        train_s += timed(run)
        train_n += stats.examples
        experts[task] = state_on_cpu(encoder)
    merge_s = timed(lambda: atmbench.merge("ta:lam=0.3", base, experts), sync=False)
    merged = atmbench.merge("ta:lam=0.3", base, experts)
    eval_s, eval_n = 0.0, 0
    encoder = bench.backbone(merged)
    models = {t: bench.task_model(t, encoder) for t in TASKS}
    score(models[TASKS[0]], bench.dataset(TASKS[0], "test"), [ACCURACY])  # warm-up
    for task in TASKS:
        dataset = bench.dataset(task, "test")
        eval_s += timed(lambda d=dataset, t=task: score(models[t], d, [ACCURACY]))
        eval_n += len(dataset)
    loader_s = 0.0
    for task in TASKS:  # the same evaluation fed by loader workers: what workers would buy
        dataset = bench.dataset(task, "test")
        loader_s += timed(
            lambda d=dataset, t=task: _accuracy_with_workers(
                encoder, bench.head(t), d, args.workers
            )
        )
    vectors = [task_vector(e, base) for e in experts.values()]
    assert all(v["proj"].abs().sum() > 0 for v in vectors), "fine-tuning changed nothing"

    train_ips, eval_ips = train_n / train_s, eval_n / eval_s
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__}")
    print(
        f"synthetic data: {len(TASKS)} tasks x ({args.train} train + {args.test} test) "
        f"JPEGs written in {made:.1f} s; loader workers for fine-tuning: {args.workers}"
    )
    print("| stage | images/s | vs model only |")
    print("| --- | ---: | ---: |")
    print(
        f"| model only: forward, no grad (bf16, batch {BATCH}) | {ceiling['forward']:,.0f} | 1.00 |"
    )
    print(f"| model only: train step (fwd+bwd+AdamW, bf16) | {ceiling['train_step']:,.0f} | 1.00 |")
    print(
        f"| pipeline: fine-tune (`finetune`, {args.workers} workers) | {train_ips:,.0f} "
        f"| {train_ips / ceiling['train_step']:.2f} of train step |"
    )
    print(
        f"| pipeline: evaluate (`atmbench.evaluate.accuracy`) | {eval_ips:,.0f} "
        f"| {eval_ips / ceiling['forward']:.2f} of forward |"
    )
    print(
        f"| evaluate, {args.workers} loader workers (not in core) | {eval_n / loader_s:,.0f} "
        f"| {eval_n / loader_s / ceiling['forward']:.2f} of forward |"
    )
    print(f"| TA merge of {len(TASKS)} ViT-B-32 experts (CPU) | {merge_s:.2f} s | - |")


if __name__ == "__main__":
    main()
