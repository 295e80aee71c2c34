"""Goldens from FusionBench 0.2.33's own implementations: ``tox -e goldens-fusionbench``.

Writes magmax, model_stock_angle and wudi_matrices .safetensors, and through
``adamerging_fb.py`` adamerging_inputs and adamerging, through ``regmean_pp_fb.py``
regmean_pp_inputs and regmean_pp, through ``masks_fb.py`` dare_ties_p05 (+ masks) and doge
(RECIPE.md says what each holds).
"""

from __future__ import annotations

import adamerging_fb
import masks_fb
import regmean_pp_fb
import torch
from common import TASKS, inputs, module, save
from fusion_bench.method.magmax.magmax import MagMaxAlgorithm
from fusion_bench.method.model_stock.model_stock import ModelStock
from fusion_bench.method.wudi.wudi import wudi_merging
from fusion_bench.modelpool import BaseModelPool


def pool() -> dict:
    base, experts = inputs()
    return {"_pretrained_": module(base)} | {t: module(experts[t]) for t in TASKS}


def delta_of(merged: torch.nn.Module) -> dict[str, torch.Tensor]:
    base, _ = inputs()
    return {k: v.detach() - base[k] for k, v in merged.state_dict().items()}


def main() -> None:
    with torch.no_grad():
        save("magmax", delta_of(MagMaxAlgorithm(scaling_factor=1.0).run(pool())))
        stock = ModelStock(ignore_keys=[]).run(BaseModelPool(pool()))
        save("model_stock_angle", delta_of(stock))
    base, experts = inputs()
    vectors = [{k: experts[t][k] - base[k] for k in base} for t in TASKS]
    merged = wudi_merging(vectors, accelerator="cpu", iter_num=300)  # the function's default
    save("wudi_matrices", {k: v.detach() for k, v in merged.items()})
    adamerging_fb.main()
    masks_fb.dare_ties()
    masks_fb.doge()
    regmean_pp_fb.main()


if __name__ == "__main__":
    main()
