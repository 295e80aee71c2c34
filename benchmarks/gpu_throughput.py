"""Images/s of the vision pipeline on one GPU versus the bare model, before and after the cache.

Usage (a CUDA machine): ``python benchmarks/gpu_throughput.py [--train 4096 --test 4096
--workers 8]``. Writes two tasks of synthetic 224 px JPEGs in the vision suites' on-disk
layout, loads them with ``ViT-B-32:random`` through :class:`VisionBenchmark` and times, in
one process on the same device (``vision_pipeline.measure``): the bare image tower and
head (forward; training step), then evaluation and fine-tuning through the per-image path
(JPEG decode and open_clip transforms in ``--workers`` loader processes: the code before
the image cache) and through the image cache (decoded once, preprocessed on the device).
Prints one Markdown table. Not a pytest benchmark: it needs CUDA and takes minutes; the
CPU counterpart is ``test_vision_throughput.py``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from vision_pipeline import TASKS, TRAIN_BATCH, measure, synthetic_suite, table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=4096, help="train images per task")
    parser.add_argument("--test", type=int, default=4096, help="test images per task")
    parser.add_argument("--workers", type=int, default=8, help="per-image loader workers")
    parser.add_argument("--model", default="ViT-B-32:random")
    args = parser.parse_args()

    from atmbench.default_plugins.suites.vision.benchmark import VisionBenchmark
    from atmbench.finetune import Recipe

    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    home = Path(tempfile.mkdtemp(prefix="atmb-gpu-"))
    started = time.perf_counter()
    synthetic_suite(home, args.train, args.test)
    made = time.perf_counter() - started
    recipe = Recipe(epochs=1, lr=1e-5, batch_size=TRAIN_BATCH, warmup_steps=10)
    bench = VisionBenchmark(
        args.model, home, device, suite="vision8", tasks=TASKS, recipes=dict.fromkeys(TASKS, recipe)
    )
    bench.num_workers = args.workers  # the cache build's decoding processes
    results = measure(bench, args.workers)
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | {args.model}")
    print(
        f"synthetic data: {len(TASKS)} tasks x ({args.train} train + {args.test} test) "
        f"JPEGs written in {made:.1f} s"
    )
    print("\n".join(table(results, args.workers)))


if __name__ == "__main__":
    main()
