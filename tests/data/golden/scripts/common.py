"""Shared by the golden generators: read ``inputs_clip.safetensors``, build modules, save.

The generators run in throw-away environments that install the official code (tox
``goldens-*`` environments); nothing here imports atmbench.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

GOLDEN = Path(__file__).parents[1]
TASKS = ("t0", "t1", "t2", "t3")


def inputs() -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """θ0 and the fine-tuned weights θ_t = θ0 + τ_t, in float64 (RECIPE.md)."""
    raw = load_file(GOLDEN / "inputs_clip.safetensors")
    base = {k[5:]: v.double() for k, v in raw.items() if k.startswith("base.")}
    experts = {t: {k: base[k] + raw[f"tv.{t}.{k}"].double() for k in base} for t in TASKS}
    return base, experts


def module(state: dict[str, torch.Tensor], buffers: bool = False) -> nn.Module:
    """An nn.Module whose ``state_dict()`` is ``state`` (dotted names become submodules).

    ``buffers``: registered as buffers, not parameters: FusionBench 0.2.33's
    ``state_dict_add`` refuses to add a plain tensor (a retrieved task vector) to an
    ``nn.Parameter`` (RECIPE.md, surprise 8); buffers come back as plain tensors.
    """
    root = nn.Module()
    for name, value in state.items():
        *path, leaf = name.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        if buffers:
            node.register_buffer(leaf, value.clone())
        else:
            node.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
    return root


def save(name: str, delta: dict[str, torch.Tensor]) -> None:
    """The merged task vector θ − θ0, stored as float32 like every golden."""
    save_file({k: v.float().contiguous() for k, v in delta.items()}, GOLDEN / f"{name}.safetensors")
    print(f"wrote {name}.safetensors ({len(delta)} tensors)")
