"""The vision pipeline's throughput on the CPU, before and after the image cache.

The CPU counterpart of ``gpu_throughput.py``: ``pytest benchmarks/test_vision_throughput.py
--benchmark-enable -s``. A small ViT at 224 px (width 64, 2 layers, patch 32: cheap enough
per image that decoding JPEGs, not the model, bounds the per-image path, as it does on a
GPU) over two tasks of synthetic 224 px JPEGs; every figure is a ratio to the bare model's
forward or training step measured in the same run (``vision_pipeline.measure``).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from vision_pipeline import TASKS, TRAIN_BATCH, measure, synthetic_suite, table

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("datasets")

SMALL = "atmb-bench-vit"
SMALL_CONFIG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
IMAGES = {"train": 512, "test": 512}
WORKERS = min(2, os.cpu_count() or 1)
RESULTS: dict[str, float] = {}


def test_vision_pipeline_throughput_cpu(benchmark, tmp_path):
    from atmbench.default_plugins.suites.vision.benchmark import VisionBenchmark
    from atmbench.finetune import Recipe

    config = tmp_path / f"{SMALL}.json"
    config.write_text(json.dumps(SMALL_CONFIG))
    open_clip.add_model_config(config)
    synthetic_suite(tmp_path, IMAGES["train"], IMAGES["test"])
    recipe = Recipe(epochs=1, lr=1e-5, batch_size=TRAIN_BATCH, warmup_steps=10)
    bench = VisionBenchmark(
        f"{SMALL}:random",
        tmp_path,
        torch.device("cpu"),
        suite="vision8",
        tasks=TASKS,
        recipes=dict.fromkeys(TASKS, recipe),
    )
    bench.num_workers = WORKERS
    results = benchmark.pedantic(measure, args=(bench, WORKERS, 3), rounds=1, iterations=1)
    RESULTS.update(results)
    benchmark.extra_info.update(results)
    assert results["eval_after"] > 0 and results["train_after"] > 0


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    """Print the table after the benchmark (benchmarks/README.md quotes it)."""
    yield
    if not RESULTS:
        return
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        reporter.section(f"vision pipeline on the CPU ({torch.get_num_threads()} threads)")
        for line in table(RESULTS, WORKERS):
            reporter.write_line(line)
