"""Consensus-TIES golden from the official code: ``python consensus_ties_golden.py PATH``.

PATH is a checkout of nik-dim/tall_masks at d10af8b (RECIPE.md); ``tox -e goldens-consensus
-- PATH``. It runs the ``consensus`` path of ``src/eval/aggregation.py`` with
``use_ties=true``, on ``inputs_clip`` in float64: τ_MTL from ``src/utils/ties_utils.py::
ties_merging(reset_thresh=20, merge_func="dis-sum")``, the TALL masks of every task from
``src/utils/tallmask_utils.py::generate_task_masks(tv=τ_MTL, tall_mask_lambda=0.5)`` (what the
``tall_mask`` run with ``use_ties`` stores), then ``construct_consensus_mask(prun_thre_k=2)``
with ``load_tall_mask`` answering those masks instead of reading them from disk, and
τ_MTL ⊙ consensus. ``wandb`` is an empty stand-in (only logging calls it).
"""

from __future__ import annotations

import sys
import types
from unittest import mock

from common import TASKS, inputs, save


def main(repo: str) -> None:
    for name in ("wandb", "hydra"):  # imported for logging only, never called by the merge
        sys.modules.setdefault(name, mock.MagicMock())
    sys.path.insert(0, repo)
    from src.utils import tallmask_utils
    from src.utils.ties_utils import ties_merging
    from src.utils.utils import state_dict_to_vector, vector_to_state_dict

    base, experts = inputs()
    flat_ptm = state_dict_to_vector(base, [])
    flat_ft = __import__("torch").vstack([state_dict_to_vector(experts[t], []) for t in TASKS])
    tv_flat = flat_ft - flat_ptm
    merged = ties_merging(tv_flat, reset_thresh=20, merge_func="dis-sum")
    masks = tallmask_utils.generate_task_masks(
        tv_flat, flat_ft, flat_ptm, tv=merged, tall_mask_lambda=0.5
    )
    as_dicts = {
        t: vector_to_state_dict(m, base, remove_keys=[]) for t, m in zip(TASKS, masks, strict=True)
    }
    tallmask_utils.load_tall_mask = lambda remove_keys, ptm_check, config: as_dicts
    consensus = tallmask_utils.construct_consensus_mask(base, 2, types.SimpleNamespace(), [])
    out = vector_to_state_dict(merged * consensus, base, remove_keys=[])
    save("consensus_ties", out)


if __name__ == "__main__":
    main(sys.argv[1])
