"""``atmbench download`` for the GLUE suites: data, tokenizer and weights ahead of a run.

After it, a run of the same suite and model works with ``HF_HUB_OFFLINE=1``. Without a
network it fails within seconds in one line, as the vision suites' download does.
"""

from __future__ import annotations

from pathlib import Path

import torch

from atmbench.default_plugins.suites.glue.benchmark import GlueBenchmark
from atmbench.default_plugins.suites.glue.tasks import SUITES
from atmbench.default_plugins.suites.vision.download import fetch_ahead


def download(suite: str, model: str, home: Path) -> list[str]:
    """Fetch what ``suite`` needs for ``model`` into ``home``; returns the tasks now ready."""
    if suite not in SUITES:
        raise ValueError(f"unknown GLUE suite {suite!r} (valid: {', '.join(SUITES)})")
    return fetch_ahead(
        suite,
        model,
        home,
        lambda: GlueBenchmark(model, Path(home), torch.device("cpu"), suite=suite),
    )
