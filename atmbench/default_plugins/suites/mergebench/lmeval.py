"""Scores of an in-memory causal LM under lm-evaluation-harness tasks, in-process.

The merged model the runner built is wrapped in lm-eval's ``HFLM`` as it is (no copy on
disk, no reload); ``simple_evaluate`` runs the tasks with their harness defaults (shots,
decoding), as MergeBench's ``scripts/evaluate.sh`` does (no ``--num_fewshot``, no chat
template).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from atmbench.suite import SuiteDataError

INSTALL = "pip install 'atmbench[llm]'"


def _harness() -> Any:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise SuiteDataError(
            f"this suite evaluates with lm-evaluation-harness, which is not installed: {INSTALL}"
        ) from None
    return lm_eval, HFLM, TaskManager


def check_installed() -> None:
    """Fail early, in one line, when lm-evaluation-harness is missing."""
    _harness()


def primary(results: Mapping[str, Any], task: str, key: str | None) -> float:
    """The task's score in percent: ``key`` (``metric,filter``), or its first metric."""
    found = results.get(task)
    if found is None:
        raise KeyError(f"lm-eval returned no results for {task!r} (got {sorted(results)})")
    if key is None:
        numbers = [k for k, v in found.items() if "," in k and "_stderr" not in k]
        numbers = [k for k in numbers if isinstance(found[k], int | float)]
        if not numbers:
            raise KeyError(f"lm-eval returned no metric for {task!r} (got {sorted(found)})")
        key = numbers[0]
    if key not in found:
        raise KeyError(f"lm-eval result of {task!r} has no {key!r} (got {sorted(found)})")
    return 100.0 * float(found[key])


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[tuple[str, str | None]],
    fetch: str,
    include_path: Path | None = None,
    batch_size: int | str = "auto",
    limit: int | None = None,
    max_length: int | None = None,
) -> dict[str, float]:
    """lm-eval task -> score in percent of ``model`` (a ``*ForCausalLM`` on its device).

    ``include_path`` adds a folder of task YAMLs (custom tasks, local data); ``fetch`` is
    the command that downloads the tasks' data, named when it cannot be loaded.
    """
    lm_eval, HFLM, TaskManager = _harness()
    names = [name for name, _ in tasks]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    manager = TaskManager(
        include_path=str(include_path) if include_path else None,
        include_defaults=include_path is None,
    )
    os.environ.setdefault("HF_ALLOW_CODE_EVAL", "1")  # code_eval's own opt-in, as below
    try:
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            task_manager=manager,
            limit=limit,
            bootstrap_iters=0,
            log_samples=False,
            confirm_run_unsafe_code=True,  # MergeBench's coding tasks execute the generations
        )
    except (OSError, ConnectionError) as exc:  # datasets' offline and missing-file errors
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise SuiteDataError(
            f"lm-eval could not load the data of {', '.join(names)} ({type(exc).__name__}: "
            f"{first}); fetch it with: {fetch}"
        ) from None
    return {name: primary(out["results"], name, key) for name, key in tasks}


def fetch(names: Sequence[str]) -> None:
    """Load each task once, so that its data (and code_eval's metric) land in the caches."""
    _, _, TaskManager = _harness()
    from lm_eval.tasks import get_task_dict

    os.environ.setdefault("HF_ALLOW_CODE_EVAL", "1")
    get_task_dict(list(names), TaskManager())
