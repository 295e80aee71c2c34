"""Every registered merge method and refiner runs on text8 (a guarantee of issue 17).

The grid comes from the registry, so a method or refiner added later is covered without
editing this file. Searched hyperparameters are pinned to their defaults and the data are
shrunk, so that the whole catalogue runs in the default test run; the default-size suite
and the validation search run in ``test_text8.py``.
"""

from __future__ import annotations

import pytest
import torch

from atmbench import registry, runner
from atmbench.default_plugins.suites import text8
from atmbench.executors.local import run_local
from atmbench.store import ResultStore

KNOWN_GAPS: set[str] = set()
"""Methods that do not run on a language model yet (none today: every method and refiner
runs on text8)."""


def _pinned(name: str, hparams, extra: dict | None = None) -> str:
    """``name:k=v,...`` with every searched hyperparameter at its default."""
    fixed = {h.name: h.default for h in hparams if len(h.search) > 1}
    fixed.update(extra or {})
    args = ",".join(f"{k}={v}" for k, v in sorted(fixed.items()))
    return f"{name}:{args}" if args else name


def _specs() -> list[str]:
    specs = [_pinned(n, m.all_hparams()) for n, m in sorted(registry.methods().items())]
    ta = _pinned("ta", registry.methods()["ta"].all_hparams())
    for name, refiner in sorted(registry.refiners().items()):
        # one round of tuning where the refiner has rounds: the catalogue, not ATM's quality
        extra = {"iterations": 1} if any(h.name == "iterations" for h in refiner.hparams) else {}
        pinned = _pinned(name, refiner.hparams, extra)
        specs.append(f"{ta}+{pinned}")
        if refiner.data_from_base is not None:  # it can also be the whole method (atm)
            specs.append(pinned)
    return specs


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    patch = pytest.MonkeyPatch()
    patch.setattr(text8, "SIZES", {"test": 16, "val": 8, "train": 32})
    patch.setattr(text8, "PRETRAIN_COPY", 64)
    patch.setattr(text8, "PRETRAIN_PER_TASK", 8)
    try:
        home = tmp_path_factory.mktemp("text8-tiny")
        yield text8.TextBenchmark("llama-micro", home, torch.device("cpu"))
    finally:
        patch.undo()


def test_every_method_and_refiner_runs_on_text8(tiny_bench, tmp_path):
    specs = _specs()
    assert {"ta", "ties", "tsv", "atm"} <= {s.split(":")[0].split("+")[-1] for s in specs}
    cells = runner.plan("text8", "llama-micro", specs, [0])
    store = ResultStore(tmp_path / "results.sqlite")
    ws = runner.Workspace(tiny_bench._home, torch.device("cpu"), progress=False)
    ws._benchmarks["text8", "llama-micro"] = tiny_bench
    summary = run_local(cells, store, ws)
    failed = {r.method.split(":")[0]: r.error for r in summary.failed}
    # Known gaps, reported to their authors: these methods refuse a causal LM with a clear
    # one-line error today. Remove a name here when it runs (the test then insists).
    assert set(failed) == KNOWN_GAPS, failed
    assert all("ValueError" in error for error in failed.values())
    rows = store.frame("test")
    assert set(rows.method) >= {s for s in specs if s.split(":")[0] not in KNOWN_GAPS}
    counts = rows.groupby("method").task.nunique()
    assert (counts == len(text8.TASKS)).all()
    # exact-match percentages of 16 test prompts: multiples of 6.25
    assert all(abs(a / 6.25 - round(a / 6.25)) < 1e-9 for a in rows.accuracy)
