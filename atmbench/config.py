"""Where atmbench keeps its caches and results, and which device it runs on."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from platformdirs import user_cache_dir

HOME_ENV = "ATMBENCH_HOME"
QUIET_ENV = "ATMBENCH_QUIET"


class HomeError(RuntimeError):
    """The home directory (or a store's folder) cannot hold atmbench's files."""


def home() -> Path:
    """``$ATMBENCH_HOME`` or the per-user cache directory: experts, backbones, results."""
    return Path(os.environ.get(HOME_ENV) or user_cache_dir("atmbench"))


def show_progress() -> bool:
    """Progress bars unless ``$ATMBENCH_QUIET`` is 1 (``--quiet`` sets it for workers too)."""
    return os.environ.get(QUIET_ENV) != "1"


def _describe(path: Path) -> str:
    if HOME_ENV in os.environ and Path(os.environ[HOME_ENV]) == path:
        return f"{HOME_ENV}={path}"
    return str(path)


def _check_not_under_a_file(path: Path) -> None:
    """A :class:`HomeError` if ``path`` or the nearest of its folders that exists is a file."""
    for existing in (path, *path.parents):
        if existing.exists():
            if existing.is_dir():
                return
            where = "it is a file" if existing == path else f"{existing} is a file"
            raise HomeError(f"{_describe(path)} is not a directory ({where}): point it elsewhere")


def usable_dir(path: Path) -> Path:
    """``path``, created if missing; a :class:`HomeError` naming it if that cannot be.

    Checked before any work starts, so a home that is a regular file, sits under one, or is
    not writable fails in one line instead of a traceback from deep inside a run.
    """
    path = Path(path)
    _check_not_under_a_file(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HomeError(
            f"{_describe(path)} cannot be created ({exc.strerror or exc}): point it "
            "at a writable directory"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise HomeError(f"{_describe(path)} is not writable: point it at a writable directory")
    return path


def usable_home() -> Path:
    """:func:`home`, created if missing and checked writable (see :func:`usable_dir`)."""
    return usable_dir(home())


def default_store() -> Path:
    return home() / "results.sqlite"


def existing_store(path: Path | None = None) -> Path | None:
    """The store file (default: the home's) if it exists, ``None`` if it does not.

    Readers such as ``atmbench leaderboard`` use it so that looking creates nothing; a
    store whose folder is (or sits under) a file is a :class:`HomeError`.
    """
    path = Path(path) if path is not None else default_store()
    _check_not_under_a_file(path.parent)
    if path.is_dir():
        raise HomeError(f"result store {path} is a directory, not a SQLite file")
    return path if path.exists() else None


def pick_device(name: str | None = None) -> torch.device:
    """``name`` if given, else CUDA when available, else the CPU."""
    if name:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available (valid: cpu)")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
