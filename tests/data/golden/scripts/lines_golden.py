"""LiNeS goldens from the official code: ``python lines_golden.py PATH/TO/LiNeS``.

PATH is a checkout of wang-kee/LiNeS at 43a7bdd (RECIPE.md); ``tox -e goldens-lines -- PATH``
installs what it needs. ``LiNeS_scaling`` is executed from ``src/eval/eval.py`` (read with
``ast``: the module's other imports load datasets, models and wandb, none of which the
function uses); TIES is the repository's own ``src/utils/ties_utils.py::ties_merging``, with
what its package ``__init__`` imports for logging (``wandb``, ``hydra``, ``omegaconf``)
replaced by empty stand-ins. α is the official multi-task rule of
``src/eval/eval.py::evaluate`` and ``src/eval/aggregation.py``: (‖Σ_t τ_t‖₁ / ‖τ_m‖₁) / T.
"""

from __future__ import annotations

import ast
import copy
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch
from common import TASKS, inputs, save

BLOCKS = 3  # transformer.resblocks.{0,1,2} in inputs_clip.safetensors
STUBS = ("wandb", "hydra", "hydra.core", "hydra.core.hydra_config", "omegaconf")


def lines_scaling(repo: str):
    """``LiNeS_scaling`` from the official ``src/eval/eval.py``, alone."""
    tree = ast.parse((Path(repo) / "src" / "eval" / "eval.py").read_text())
    tree.body = [n for n in tree.body if getattr(n, "name", None) == "LiNeS_scaling"]
    namespace = {"copy": copy}
    exec(compile(tree, "eval.py", "exec"), namespace)  # noqa: S102 - the official code
    return namespace["LiNeS_scaling"]


def main(repo: str) -> None:
    sys.path.insert(0, repo)
    sys.modules.update({name: mock.MagicMock() for name in STUBS})
    from src.utils.ties_utils import ties_merging

    scaling = lines_scaling(repo)
    base, experts = inputs()
    keys = list(base)
    flat = torch.stack(
        [torch.cat([(experts[t][k] - base[k]).reshape(-1) for k in keys]) for t in TASKS]
    )
    merges = {
        "lines_sum_b05": (flat.sum(0), 0.5),  # method "sum" (Task Arithmetic)
        "lines_ties_b12": (ties_merging(flat.clone(), 20, "dis-mean"), 1.2),  # k 20, mean
    }
    for name, (merged, beta) in merges.items():
        alpha = (flat.sum(0).abs().sum().item() / merged.abs().sum().item()) / len(TASKS)
        vector, start = {}, 0
        for k in keys:
            vector[k] = merged[start : start + base[k].numel()].reshape(base[k].shape)
            start += base[k].numel()
        scaled = scaling(SimpleNamespace(vector=vector), alpha=alpha, beta=beta, num_blocks=BLOCKS)
        save(name, scaled.vector)


if __name__ == "__main__":
    main(sys.argv[1])
