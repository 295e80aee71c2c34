"""``atmbench download``: weights, datasets and zero-shot heads fetched ahead of a run.

After it, a run of the same suite and model works with ``HF_HUB_OFFLINE=1``. Without a
network it fails within seconds in one line: the hub is probed first (the hub clients
would otherwise retry each file for minutes), and what is already cached is checked
offline.
"""

from __future__ import annotations

import contextlib
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from atmbench.default_plugins.suites.vision import data
from atmbench.default_plugins.suites.vision.benchmark import VisionBenchmark
from atmbench.default_plugins.suites.vision.tasks import SUITES
from atmbench.suite import SuiteDataError

PROBE_TIMEOUT_S = 5.0
DEFAULT_ENDPOINT = "https://huggingface.co"
OFFLINE = "HF_HUB_OFFLINE is set"
_FETCH_ADVICE = re.compile(r"; fetch (?:them|it) with: atmbench download --suite \S+ --model \S+")


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def hub_unreachable(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the Hugging Face hub cannot be reached, or ``None`` when it answers.

    Any HTTP answer counts as reachable; a DNS failure, refused connection or timeout does
    not. ``urllib`` honours the usual ``HTTPS_PROXY`` variables.
    """
    if data.hub_offline():
        return OFFLINE
    try:
        request = urllib.request.Request(hub_endpoint(), method="HEAD")
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return str(getattr(reason, "strerror", None) or reason)
    return None


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """``HF_HUB_OFFLINE=1`` for the block: caches are read, nothing is requested.

    ``huggingface_hub`` reads the variable once at import, so its constant is set too.
    """
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants
    except ImportError:  # not installed: nothing of it to switch
        constants = None
    previous = getattr(constants, "HF_HUB_OFFLINE", None)
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if constants is not None:
            constants.HF_HUB_OFFLINE = previous
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved


def download(suite: str, model: str, home: Path) -> list[str]:
    """Fetch what ``suite`` needs for ``model`` into ``home``; returns the tasks now ready.

    Loading the benchmark once does it all: missing datasets are fetched, open_clip weights
    land in ``home/open_clip`` and the zero-shot heads are built and cached (on the CPU, so
    the command needs no GPU).
    """
    if suite not in SUITES:
        raise ValueError(f"unknown vision suite {suite!r} (valid: {', '.join(SUITES)})")
    return fetch_ahead(
        suite,
        model,
        home,
        lambda: VisionBenchmark(model, Path(home), torch.device("cpu"), suite=suite),
    )


def fetch_ahead(suite: str, model: str, home: Path, load: Callable[[], Any]) -> list[str]:
    """Load a hub-backed benchmark once (``load()``), which fetches what it lacks.

    When the hub cannot be reached, the load runs offline and succeeds only if everything
    is cached already; failures become one line saying what to do.
    """
    unreachable = hub_unreachable()
    try:
        if unreachable is None:
            bench = load()
        else:
            with _hub_offline():
                bench = load()
    except SuiteDataError as exc:
        missing = f"{suite} / {model} is not all cached under {home}"
        if unreachable == OFFLINE:
            raise SuiteDataError(f"HF_HUB_OFFLINE is set and {missing}: unset it") from None
        if unreachable is not None:
            raise SuiteDataError(
                f"cannot reach the Hugging Face hub at {hub_endpoint()} ({unreachable}) and "
                f"{missing}: run this again with network access"
            ) from None
        # the advice to run 'atmbench download' is no help from 'atmbench download'
        raise SuiteDataError(_FETCH_ADVICE.sub("", str(exc))) from None
    return list(bench.tasks)
