"""CART, Centered Arithmetic with Rank-reduced Task vectors (Choi et al., arXiv 2412.12153).

θ = θavg + λ Σ_t LR_k(θ_t − θavg), θavg = θ0 + mean_t τ_t the weight average: the experts'
task vectors re-centred on their average, each cut to its top-k singular triplets
(k = max(1, int(r·min(m, n)))), summed and scaled. The merged task vector is therefore
mean_t τ_t + λ Σ_t LR_k(τ_t − mean τ), and λ is a hyperparameter of the merge, not a
final coefficient.

Follows the official code (JH-GEECS/CART @964cfd7, ``src/merging.py``:
``StaticMergeModule._merge_weights("CART")``, ``_get_origin``,
``_get_truncated_task_vectors``), checked in ``tests/data/golden/cart.safetensors``:

- The low-rank step applies to the keys the code selects by name: containing ``attn`` or
  ``mlp`` and neither ``ln`` nor ``bias`` (open_clip's ``attn.in_proj_weight``,
  ``attn.out_proj.weight``, ``mlp.c_fc.weight``, ``mlp.c_proj.weight``). Every other key
  keeps its full centred vector, and those sum to zero: it ends at the plain average.
  atmbench returns the average exactly there (the official sum leaves a float residue).
- Defaults λ = 2.0, r = 0.12: the official 8-task config (``configs/CART/
  ViT-b-32_8_CART.yaml``; 14 tasks use λ 1.5, r 0.16; 20 tasks λ 1.9, r 0.32).
- The official code also has an energy-threshold and a discrete-rank mode, which no
  config uses; they are not offered.

Departures: a selected key that is not a matrix (none in open_clip or HF CLIP) keeps its
full centred vector instead of failing in the SVD. The search grid is ours: the paper
reports r ≈ 8% as the best rank across settings, so r ∈ {0.04, 0.08, 0.12, 0.16} and
λ ∈ {1.0, 1.5, 2.0} around the released values (the paper's own grid is not in its code).
"""

from __future__ import annotations

import torch
from torch import Tensor

from atmbench.hookspecs import hookimpl
from atmbench.hparams import HParam
from atmbench.method import MergeMethod, TensorContext

RANK = HParam(
    "rank",
    default=0.12,
    search=(0.04, 0.08, 0.12, 0.16),
    low=0.0,
    high=1.0,
    open_low=True,
    help="fraction of each matrix's rank kept of every centred task vector",
)
LAMBDA = HParam(
    "lam",
    default=2.0,
    search=(1.0, 1.5, 2.0),
    low=0.0,
    help="scaling coefficient of the summed low-rank centred task vectors",
)


def low_rank_key(key: str) -> bool:
    """The official selection of the keys that get the low-rank step."""
    return ("attn" in key or "mlp" in key) and not ("ln" in key or "bias" in key)


def cart(base: Tensor, task_vectors: Tensor, ctx: TensorContext, rank: float, lam: float) -> Tensor:
    mean = task_vectors.mean(0)
    if base.dim() != 2 or not low_rank_key(ctx.key):
        return mean  # the centred vectors sum to zero: the weight average
    k = max(1, int(rank * min(base.shape)))
    u, s, vh = torch.linalg.svd(task_vectors - mean, full_matrices=False)
    low_rank = (u[..., :k] * s[:, None, :k]) @ vh[:, :k]
    return mean + lam * low_rank.sum(0)


@hookimpl
def register_methods(register):
    register(
        MergeMethod(
            name="cart",
            merge=cart,
            data="none",
            hparams=(RANK, LAMBDA),
            description="CART: experts' average plus low-rank centred task vectors",
        )
    )
