"""Per-task goldens from FusionBench 0.2.33 (EMR-Merging, TALL masks): part of
``tox -e goldens-fusionbench``.

Each file holds, for every task t, the task's own merged vector θ_t − θ0 as ``<t>.<param>``
(RECIPE.md says how each was made).
"""

from __future__ import annotations

import torch
from common import GOLDEN, TASKS, inputs, module, save
from fusion_bench.method.emr_merging.utils import emr_merge
from fusion_bench.method.tall_mask.task_arithmetic import TallMaskTaskArithmeticAlgorithm
from safetensors.torch import load_file


def task_vectors() -> list[dict[str, torch.Tensor]]:
    """The stored float32 τ_t themselves: on the 0.01 grid, sums like 0.01 + 0.02 − 0.03
    elect a sign by rounding, and only the same float32 values summed in the same task
    order (FusionBench's ``state_dict_sum`` folds them as atmbench does) elect the same."""
    raw = load_file(GOLDEN / "inputs_clip.safetensors")
    base, _ = inputs()
    return [{k: raw[f"tv.{t}.{k}"] for k in base} for t in TASKS]


def emr() -> dict[str, torch.Tensor]:
    base, _ = inputs()
    vectors = task_vectors()
    unified, masks, rescalers = emr_merge(vectors)
    return {  # EMRTaskModulator.apply: θ0 + τ_uni ⊙ M_t · γ_t
        f"{t}.{k}": unified[k] * masks[k][i] * rescalers[i]
        for i, t in enumerate(TASKS)
        for k in base
    }


def tall_masks(lam: float) -> dict[str, torch.Tensor]:
    """FusionBench compares |θ0 − τ_t| where the official code has |τ_t|: with θ0 = 0 (and
    θ_t = τ_t) the two agree, and its per-task models are the task vectors themselves.
    In float32: its state-dict arithmetic refuses the float64 × float32-mask product."""
    base, experts = inputs()
    zero = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in base.items()}
    pool = {"_pretrained_": module(zero, buffers=True)}
    vectors = {t: {k: (experts[t][k] - base[k]).float() for k in base} for t in TASKS}
    pool |= {t: module(v, buffers=True) for t, v in vectors.items()}
    models = TallMaskTaskArithmeticAlgorithm(tall_mask_lambda=lam).run(pool)["models"]
    return {f"{t}.{k}": v.detach() for t in TASKS for k, v in models[t].state_dict().items()}


def main() -> None:
    with torch.no_grad():
        save("emr", emr())
        save("tall_masks_l03", tall_masks(0.3))
        save("tall_masks_l06", tall_masks(0.6))


if __name__ == "__main__":
    main()
