"""Write ``inputs_clip.safetensors``: a miniature open_clip image tower and four task vectors.

Non-degenerate on purpose (RECIPE.md, "inputs_clip"): three residual blocks with every
open_clip parameter kind (so per-block and per-key rules are exercised), matrices wide
enough that low-rank truncations and row-wise ranks keep and drop entries, and task-vector
entries on a grid of 0.01 so that equal magnitudes (ties at thresholds, +x against -x) are
frequent. Run with any Python that has torch and safetensors: ``python make_inputs_clip.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

WIDTH, HIDDEN, OUT, BLOCKS, TASKS = 8, 16, 4, 3, ("t0", "t1", "t2", "t3")


def shapes() -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes, in open_clip's registration order."""
    out: dict[str, tuple[int, ...]] = {
        "class_embedding": (WIDTH,),
        "positional_embedding": (5, WIDTH),
        "proj": (WIDTH, OUT),
        "conv1.weight": (WIDTH, 3, 2, 2),
        "ln_pre.weight": (WIDTH,),
        "ln_pre.bias": (WIDTH,),
    }
    for b in range(BLOCKS):
        p = f"transformer.resblocks.{b}."
        out |= {
            p + "ln_1.weight": (WIDTH,),
            p + "ln_1.bias": (WIDTH,),
            p + "attn.in_proj_weight": (3 * WIDTH, WIDTH),
            p + "attn.in_proj_bias": (3 * WIDTH,),
            p + "attn.out_proj.weight": (WIDTH, WIDTH),
            p + "attn.out_proj.bias": (WIDTH,),
            p + "ln_2.weight": (WIDTH,),
            p + "ln_2.bias": (WIDTH,),
            p + "mlp.c_fc.weight": (HIDDEN, WIDTH),
            p + "mlp.c_fc.bias": (HIDDEN,),
            p + "mlp.c_proj.weight": (WIDTH, HIDDEN),
            p + "mlp.c_proj.bias": (WIDTH,),
        }
    out |= {"ln_post.weight": (WIDTH,), "ln_post.bias": (WIDTH,)}
    return out


def main() -> None:
    gen = torch.Generator().manual_seed(18)
    tensors = {f"base.{k}": torch.randn(s, generator=gen) for k, s in shapes().items()}
    for t in TASKS:
        for k, s in shapes().items():
            # N(0, 0.1²) rounded to 0.01: many equal magnitudes across tasks and within rows
            tensors[f"tv.{t}.{k}"] = torch.round(0.1 * torch.randn(s, generator=gen), decimals=2)
    save_file(tensors, Path(__file__).parents[1] / "inputs_clip.safetensors")


if __name__ == "__main__":
    main()
