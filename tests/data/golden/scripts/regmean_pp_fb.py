"""RegMean++ golden from FusionBench 0.2.33's own ``RegMeanAlgorithmForCLIPPlusPlus.run``
(run by ``fusionbench_goldens.py``) on a tiny random transformers CLIP vision tower.

Writes ``regmean_pp_inputs.safetensors``: the tower θ0 (``base.<name>``: CLIPVisionConfig
hidden 8, intermediate 32, 2 layers, 2 heads, 8x8 images, patch 4, quick_gelu; seed 0, every
float tensor perturbed by 0.05·N(0, 1) so no bias or LayerNorm is trivial), the task vectors
``tv.<t>.<name>`` (0.05·N(0, 1)) of tasks t0, t1, t2 and per task two batches of 3 images
``x.<t>.<b>`` [3, 3, 8, 8]. ``regmean_pp.safetensors``: the merged tower minus θ0 (float64,
stored float32) at reduce_non_diagonal_ratio 0.5 (``a05``) and 0.95 (``a095``, the default).
Only the data loading is replaced (the fixed batches instead of a CLIP processor over a
dataset) and the zero-shot heads are skipped (the merge never uses them).
"""

from __future__ import annotations

import lightning as L
import torch
import transformers
from bidict import bidict
from common import GOLDEN
from fusion_bench.method.regmean_plusplus import (
    RegMeanAlgorithmForCLIPPlusPlus,
    RegMeanAlgorithmPlusPlus,
)
from fusion_bench.modelpool import BaseModelPool
from safetensors.torch import save_file

TASKS = ("t0", "t1", "t2")


def tower() -> transformers.CLIPVisionModel:
    config = transformers.CLIPVisionConfig(
        hidden_size=8,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=8,
        patch_size=4,
        hidden_act="quick_gelu",
    )
    return transformers.CLIPVisionModel(config).eval()


def make_inputs() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = tower()
    gen = torch.Generator().manual_seed(1)
    raw = {}
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            raw[f"base.{key}"] = value + 0.05 * torch.randn(value.shape, generator=gen)
    for t in TASKS:
        for key in [k[5:] for k in list(raw) if k.startswith("base.")]:
            raw[f"tv.{t}.{key}"] = 0.05 * torch.randn(raw[f"base.{key}"].shape, generator=gen)
        for b in range(2):
            raw[f"x.{t}.{b}"] = torch.randn(3, 3, 8, 8, generator=gen)
    return raw


class Fixed(RegMeanAlgorithmForCLIPPlusPlus):
    # 0.2.33's CLIP class maps only dataloader_kwargs, so building it directly fails on the
    # base class's arguments (KeyError 'num_regmean_examples'): map them all.
    _config_mapping = bidict(
        dict(RegMeanAlgorithmPlusPlus._config_mapping) | {"_dataloader_kwargs": "dataloader_kwargs"}
    )

    def on_regmean_start(self):
        pass

    def get_input_for_first_layer(self, model, train_dataset):
        # the library's compute_input, on the fixed batches of task ``train_dataset``
        out = []
        for b in range(2):
            images = self.raw[f"x.{train_dataset}.{b}"].double()
            embeds = model.vision_model.embeddings(images)
            out.append(model.vision_model.pre_layrnorm(embeds).detach().cpu())
        return out


def run(raw: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    base = {k[5:]: v.double() for k, v in raw.items() if k.startswith("base.")}

    def model(state):
        m = tower().double()
        m.load_state_dict(state, strict=False)
        return m

    pool = {"_pretrained_": model(base)}
    for t in TASKS:
        pool[t] = model({k: v + raw[f"tv.{t}.{k}"].double() for k, v in base.items()})
    modelpool = BaseModelPool(pool)
    modelpool.load_train_dataset = lambda name: name
    algorithm = Fixed(
        num_regmean_examples=6,
        exclude_param_names_regex=[],
        reduce_non_diagonal_ratio=alpha,
        weight_transpose=True,
        dataloader_kwargs={"batch_size": 3},
    )
    algorithm.raw = raw
    algorithm.fabric = L.Fabric(accelerator="cpu", devices=1)
    merged = algorithm.run(modelpool)
    return {k: v - base[k] for k, v in merged.state_dict().items() if k in base}


def main() -> None:
    raw = make_inputs()
    save_file({k: v.contiguous() for k, v in raw.items()}, GOLDEN / "regmean_pp_inputs.safetensors")
    out = {}
    for alpha, tag in ((0.5, "a05"), (0.95, "a095")):
        out |= {f"{tag}.{k}": v.float().contiguous() for k, v in run(raw, alpha).items()}
    save_file(out, GOLDEN / "regmean_pp.safetensors")
    print(f"wrote regmean_pp_inputs.safetensors and regmean_pp.safetensors ({len(out)} tensors)")


if __name__ == "__main__":
    main()
