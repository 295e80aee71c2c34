"""TSV-M, Task Singular Vectors merge (Gargiulo et al., CVPR 2025): θ = θ0 + α Δ.

Per matrix (``dim() == 2``): each task keeps its top r_t = ⌊r/T⌋ singular triplets
(r = min(m, n)); the T blocks are concatenated into U, S, Vᵀ; U and Vᵀ are replaced by their
orthogonal polar factors (Procrustes decorrelation) and Δ = U⊥ diag(S) V⊥ᵀ.

Decisions, checked against ``tests/data/golden/tsv.safetensors`` (RECIPE.md;
official ``AntoAndGar/task_singular_vectors`` ``compute_and_sum_svd_mem_reduction``):

- "Other" tensors (every tensor that is not 2-D: biases, LayerNorm, class embedding, the
  4-D patch conv) get the **mean** of the task vectors, Σ/T, as the code does and as
  ALGORITHMS.md says. ``positional_embedding`` and ``proj`` are 2-D, so they take the SVD path.
- The official buffers are r wide and the T·⌊r/T⌋ filled slots are followed by zeros; the
  polar factor restricted to the filled slots is the polar factor of the filled block, and
  the zero singular values drop the rest, so computing on the filled block alone is exact.
  When T > r no triplet is kept and the tensor's Δ is zero, as in the official code.
- With one task, ⌊r/1⌋ = r triplets are kept and U, Vᵀ are already orthonormal: the merge
  gives the expert back at α = 1.
- α defaults to 1 (the paper and FusionBench) and is searched over 0.1 … 3.0 on validation,
  the sweep the official code offers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from atmbench.default_plugins.methods.spectral import alpha_scale, is_matrix, polars, top_triplets
from atmbench.hookspecs import hookimpl
from atmbench.method import MergeMethod, TensorContext


def tsv_merge(base: Tensor, task_vectors: Tensor, ctx: TensorContext) -> Tensor:
    if not is_matrix(base):
        return task_vectors.mean(0)
    k = min(base.shape) // len(task_vectors)
    if k == 0:
        return torch.zeros_like(base)
    u, s, vh = top_triplets(task_vectors, k)
    p_u, p_vh = polars(u, vh)
    return (p_u * s) @ p_vh


@hookimpl
def register_methods(register):
    register(
        MergeMethod(
            name="tsv",
            merge=tsv_merge,
            data="none",
            scale=alpha_scale(),
            description="TSV-M: per-task top-r/T singular triplets, decorrelated, recombined",
        )
    )
