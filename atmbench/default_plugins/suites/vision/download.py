"""``atmbench download``: weights, datasets and zero-shot heads fetched ahead of a run.

After it, a run of the same suite and model works with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from atmbench.default_plugins.suites.vision.benchmark import VisionBenchmark
from atmbench.default_plugins.suites.vision.tasks import SUITES


def download(suite: str, model: str, home: Path) -> list[str]:
    """Fetch what ``suite`` needs for ``model`` into ``home``; returns the tasks now ready.

    Loading the benchmark once does it all: missing datasets are fetched, open_clip weights
    land in ``home/open_clip`` and the zero-shot heads are built and cached (on the CPU, so
    the command needs no GPU).
    """
    if suite not in SUITES:
        raise ValueError(f"unknown vision suite {suite!r} (valid: {', '.join(SUITES)})")
    bench = VisionBenchmark(model, Path(home), torch.device("cpu"), suite=suite)
    return list(bench.tasks)
