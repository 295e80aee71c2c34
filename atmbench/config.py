"""Where atmbench keeps its caches and results, and which device it runs on."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from platformdirs import user_cache_dir

HOME_ENV = "ATMBENCH_HOME"
QUIET_ENV = "ATMBENCH_QUIET"


def home() -> Path:
    """``$ATMBENCH_HOME`` or the per-user cache directory: experts, backbones, results."""
    return Path(os.environ.get(HOME_ENV) or user_cache_dir("atmbench"))


def show_progress() -> bool:
    """Progress bars unless ``$ATMBENCH_QUIET`` is 1 (``--quiet`` sets it for workers too)."""
    return os.environ.get(QUIET_ENV) != "1"


def default_store() -> Path:
    return home() / "results.sqlite"


def pick_device(name: str | None = None) -> torch.device:
    """``name`` if given, else CUDA when available, else the CPU."""
    if name:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available (valid: cpu)")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
