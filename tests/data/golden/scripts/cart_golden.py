"""CART golden from the official code: ``python cart_golden.py PATH/TO/CART``.

PATH is a checkout of JH-GEECS/CART at 964cfd7 (RECIPE.md); ``tox -e goldens-cart -- PATH``
installs what it needs. Only ``src/merging.py`` and
``src/models/task_vectors.py`` run: the modules they import for data loading, evaluation
and logging (open_clip, ray, wandb, datasets) are replaced by empty stand-ins, as nothing
of theirs is called by the merge.
"""

from __future__ import annotations

import sys
from unittest import mock

import torch
from common import TASKS, inputs, module, save
from omegaconf import OmegaConf

STUBS = (
    "ray",
    "wandb",
    "src.dataset.common",
    "src.dataset.registry",
    "src.eval",
    "src.models.heads",
    "src.models.modeling",
    "src.utils",
    "src.logger",
)


def main(repo: str) -> None:
    sys.path.insert(0, repo)
    sys.modules.update({name: mock.MagicMock() for name in STUBS})
    from src.merging import StaticMergeModule
    from src.models.task_vectors import TaskVector

    base, experts = inputs()
    vectors = [TaskVector(vector={k: experts[t][k] - base[k] for k in base}) for t in TASKS]
    for name, prior, ratio in (("cart", 2.0, 0.12), ("cart_r05", 1.5, 0.5)):
        config = OmegaConf.create(
            {"tasks": list(TASKS), "device": "cpu", "prior": prior, "initial_rank_ratio": ratio}
        )
        merger = StaticMergeModule(config, module(base), vectors)
        with torch.no_grad():
            merger._merge_weights("CART")
        save(name, {k: merger._merged_state_dict[k] - base[k] for k in base})


if __name__ == "__main__":
    main(sys.argv[1])
