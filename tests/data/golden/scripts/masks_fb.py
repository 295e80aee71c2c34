"""DARE-TIES and DOGE goldens from FusionBench 0.2.33 on ``inputs_clip`` (run by
``fusionbench_goldens.py``; RECIPE.md says what each file holds)."""

from __future__ import annotations

import lightning as L
import torch
from common import GOLDEN, TASKS, inputs, module, save
from fusion_bench.method.dare.ties_merging import DareTiesMerging
from fusion_bench.method.doge_ta.doge_ta import DOGE_TA_Algorithm
from fusion_bench.modelpool import BaseModelPool
from safetensors.torch import save_file


def dare_ties() -> None:
    """FusionBench's DareTiesMerging at p 0.5, threshold 20, merge sum, scale 1, on float32
    models (its RNG stream depends on the dtype), with every draw of ``torch.rand_like``
    recorded: they come task by task (pool order) and parameter by parameter."""
    base, experts = inputs()
    base32 = {k: v.float() for k, v in base.items()}
    # requires_grad: DARE's module_sub_ subtracts θ0 only from trainable parameters (common's
    # module() registers frozen ones, which would make the "task vectors" the raw weights)
    pool = {"_pretrained_": module(base32).requires_grad_(True)}
    pool |= {
        t: module({k: v.float() for k, v in experts[t].items()}).requires_grad_(True) for t in TASKS
    }
    draws = []
    rand_like = torch.rand_like

    def recording(tensor, *args, **kwargs):
        out = rand_like(tensor, *args, **kwargs)
        draws.append(out.clone())
        return out

    torch.rand_like = recording
    try:
        torch.manual_seed(0)
        merged = DareTiesMerging(
            sparsity_ratio=0.5,
            only_on_linear_weights=False,
            rescale=True,
            scaling_factor=1.0,
            threshold=20,
            remove_keys=[],
            merge_func="sum",
        ).run(BaseModelPool(pool))
    finally:
        torch.rand_like = rand_like
    order = [k for k, _ in module(base32).named_parameters()]  # the order tv.parameters() has
    names = [(t, k) for t in TASKS for k in order]
    masks = {
        f"{t}.{k}": (d > 0.5).float().contiguous() for (t, k), d in zip(names, draws, strict=True)
    }
    save_file(masks, GOLDEN / "dare_ties_p05_masks.safetensors")
    save(
        "dare_ties_p05",
        {k: v.detach().double() - base32[k].double() for k, v in merged.state_dict().items()},
    )


def doge() -> None:
    """FusionBench's DOGE_TA_Algorithm (subspace 6, K 30, lamda 0.07; 400 Adam steps at lr 1e-4
    per tensor, both fixed in its code) on the 2-D tensors of inputs_clip, in float32. It
    selects tensors by name ("encoder" and "weight" in it, "layer_norm" not), so each 2-D
    tensor is renamed ``encoder.<name with dots as _>.weight`` and renamed back."""
    base, experts = inputs()
    two_d = [k for k, v in base.items() if v.dim() == 2]
    rename = {k: f"encoder.{k.replace('.', '_')}.weight" for k in two_d}

    def tower(state):
        return module({rename[k]: state[k].float() for k in two_d})

    pool = {"_pretrained_": tower(base)} | {t: tower(experts[t]) for t in TASKS}
    algorithm = DOGE_TA_Algorithm(subspace=6, K=30, lamda=0.07)
    algorithm.fabric = L.Fabric(accelerator="cpu", devices=1)
    merged = algorithm.run(BaseModelPool(pool)).state_dict()
    save("doge", {k: merged[rename[k]].double() - base[k].float().double() for k in two_d})
