"""AdaMerging goldens from FusionBench 0.2.33's own test-time adaptation loop (run by
``fusionbench_goldens.py``): task-wise and layer-wise coefficients after 1 and 10 steps.

A tiny model, written to ``adamerging_inputs.safetensors``: an MLP encoder Linear(6, 8),
Tanh, Linear(8, 5) (``0.weight``, ``0.bias``, ``2.weight``, ``2.bias``), three tasks with
fixed linear heads [4, 5] (logits = features @ headᵀ) and, per step and task, a batch of 4
inputs [4, 6]. FusionBench's ``TaskWiseAdaMergingAlgorithm`` / ``LayerWiseAdaMergingAlgorithm``
run their ``test_time_adaptation`` on their ``TaskWiseMergedModel`` / ``LayerWiseMergedModel``
(init 0.3, ``clamp_weights=False``, Adam lr 0.05) with those batches, in float32.
"""

from __future__ import annotations

import lightning as L
import torch
from common import GOLDEN
from fusion_bench.method.adamerging.layer_wise_adamerging import (
    LayerWiseAdaMergingAlgorithm,
)
from fusion_bench.method.adamerging.task_wise_adamerging import (
    TaskWiseAdaMergingAlgorithm,
)
from fusion_bench.models.wrappers.layer_wise_fusion import (
    LayerWiseMergedModel,
    get_layer_wise_weights,
)
from fusion_bench.models.wrappers.task_wise_fusion import (
    TaskWiseMergedModel,
    get_task_wise_weights,
)
from omegaconf import DictConfig
from safetensors.torch import save_file
from torch import nn

TASKS = ("t0", "t1", "t2")
STEPS = 10
LR = 0.05
INIT = 0.3


def make_inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = {"0.weight": (8, 6), "0.bias": (8,), "2.weight": (5, 8), "2.bias": (5,)}
    raw = {f"base.{k}": 0.5 * torch.randn(s, generator=gen) for k, s in shapes.items()}
    for t in TASKS:
        raw |= {f"tv.{t}.{k}": 0.3 * torch.randn(s, generator=gen) for k, s in shapes.items()}
        raw[f"head.{t}"] = torch.randn(4, 5, generator=gen)
    for step in range(STEPS):
        for t in TASKS:
            raw[f"x.{step}.{t}"] = torch.randn(4, 6, generator=gen)
    return raw


def encoder(state: dict[str, torch.Tensor]) -> nn.Module:
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))
    model.load_state_dict(state)
    return model


class _Fixed:
    """What both FusionBench loops need besides the wrapper: batches and logits."""

    def setup(self, raw: dict[str, torch.Tensor]) -> None:
        self.raw = raw
        self.calls = {t: 0 for t in TASKS}
        self.modelpool = type("Pool", (), {"model_names": list(TASKS)})()
        self._fabric_instance = L.Fabric(accelerator="cpu", devices=1)

    def get_shuffled_test_loader_iter(self, task: str):
        step = self.calls[task]
        self.calls[task] += 1
        return iter([(self.raw[f"x.{step}.{task}"], None)])

    def compute_logits(self, module, batch, task: str) -> torch.Tensor:
        return module(batch[0] if isinstance(batch, tuple) else batch) @ self.raw[f"head.{task}"].T

    def on_test_time_adaptation_start(self) -> None:
        pass


class TaskWise(_Fixed, TaskWiseAdaMergingAlgorithm):
    pass


class LayerWise(_Fixed, LayerWiseAdaMergingAlgorithm):
    pass


def run(raw: dict[str, torch.Tensor], layerwise: bool, steps: int) -> torch.Tensor:
    base = {k[5:]: v for k, v in raw.items() if k.startswith("base.")}
    pretrained = encoder(base)
    tuned = [encoder({k: base[k] + raw[f"tv.{t}.{k}"] for k in base}) for t in TASKS]
    config = DictConfig(
        {
            "optimizer": "adam",
            "lr": LR,
            "max_steps": steps,
            "init_values": INIT,
            "clamp_weights": False,
            "tie_weights": False,
            "strict": True,
            "weights": None,
        }
    )
    algorithm = (LayerWise if layerwise else TaskWise)(config)
    algorithm.setup(raw)
    algorithm._fabric = algorithm._fabric_instance
    if layerwise:
        weights = get_layer_wise_weights(len(TASKS), len(base), INIT)
        module = LayerWiseMergedModel(weights, pretrained, tuned, clamp_weights=False)
    else:
        weights = get_task_wise_weights(len(TASKS), INIT)
        module = TaskWiseMergedModel(weights, pretrained, tuned, clamp_weights=False)
    module = algorithm.test_time_adaptation(module)
    return module.merge_weight.detach().clone()


def main() -> None:
    raw = make_inputs()
    save_file(raw, GOLDEN / "adamerging_inputs.safetensors")
    out = {}
    for layerwise, name in ((False, "task_wise"), (True, "layer_wise")):
        for steps in (1, STEPS):
            out[f"{name}.{steps}"] = run(raw, layerwise, steps).float().contiguous()
    save_file(out, GOLDEN / "adamerging.safetensors")
    print(f"wrote adamerging_inputs.safetensors and adamerging.safetensors ({len(out)} tensors)")


if __name__ == "__main__":
    main()
