"""atmbench-doge: DOGE as an atmbench merge method, shipped as a third-party plugin.

DOGE, "Modeling Multi-Task Model Merging as Adaptive Projective Gradient Descent" (Wei et
al., 2025, arXiv 2501.01230): data-free; per 2-D weight it optimises a shared modification δ
of the task vectors so that the merge keeps each expert's own direction, with gradients kept
outside the subspace the tasks share, then merges Σ_i λ_i (τ_i + δ) ⊙ M_i with task-aware
coefficients λ_i = c/‖τ_i‖_F. The math is in :mod:`atmbench_doge.doge`.

Decisions, from FusionBench's ``doge_ta`` (tanganke/fusion_bench,
``fusion_bench/method/doge_ta/doge_ta.py``), the reference implementation:

- Which tensors: FusionBench optimises only keys containing "encoder" and "weight" but not
  "layer_norm" (the linear weights of Hugging Face CLIP's encoder) and leaves everything else
  at θ0, unmerged. Names are model-specific (with open_clip names nothing would match), so
  here every 2-D tensor gets DOGE (``tensor.dim() == 2``, the test every official merging
  code base uses: attention and MLP weights, ``proj``, ``positional_embedding``), and every
  other tensor (biases, LayerNorm, ``class_embedding``, the 4-D patch convolution) gets the
  mean of the task vectors, as TSV-M and Iso do. Leaving them at θ0 would throw away what
  the experts learnt there; DOGE's λ_i = c/‖τ_i‖ on a small bias would instead rescale it to
  norm c whatever its size.
- The top-k mask is taken on each task's τ_i alone (then applied to τ_i + δ), with one magnitude
  threshold per task over all 2-D tensors together, keeping |τ_i| ≥ the (d − ⌊k·d⌋)-th
  smallest magnitude (FusionBench's ``topk_values_mask``, as in TIES). ``prepare`` finds it
  by streaming, with atmbench's exact TIES threshold.
- FusionBench uses one Adam optimiser over all layers, but each step touches one layer
  only, so it is exactly a fresh Adam per layer, which is what runs here, tensor by tensor.
  Each gradient is projected out of span(B), but Adam's per-entry scaling means δ itself
  is not confined to the complement of B; that is the reference code's behaviour too.
- λ_i of a task whose τ_i is zero on a tensor is 0 (FusionBench would divide by zero).
- The result is not scaled further (no ``scale`` coefficient), as in the paper. c is the
  knob: FusionBench fixes c = 0.07 (``doge:lam=0.07`` reproduces it); like TA's λ it is
  searched on validation here, over 0.01 … 0.15. δ depends on c, so each value costs one
  merge (about 1 s for vit-micro on one CPU thread).
- There is no randomness: the seed does not change the result.
"""

from __future__ import annotations

from torch import Tensor

from atmbench.default_plugins.methods.masking import global_thresholds
from atmbench.hookspecs import hookimpl
from atmbench.hparams import HParam
from atmbench.method import MergeMethod, TaskVectors, TensorContext
from atmbench_doge import doge as math

HPARAMS = (
    HParam(
        "lam",
        default=0.07,
        search=(0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15),
        low=0.0,
        help="c of the task-aware coefficients λ_i = c / ‖τ_i‖_F (FusionBench: 0.07)",
    ),
    HParam(
        "k",
        default=0.3,
        low=0.0,
        high=1.0,
        open_low=True,
        help="fraction of each task vector's 2-D entries kept by magnitude, over the model",
    ),
    HParam(
        "subspace",
        default=6,
        low=1,
        type=int,
        help="the shared subspace keeps ⌊rank / subspace⌋ directions",
    ),
    HParam("steps", default=400, low=0, type=int, help="Adam steps per 2-D tensor"),
    HParam("lr", default=1e-4, low=0.0, help="Adam learning rate"),
)


def _matrices_only(task_vectors: Tensor, ctx: TensorContext) -> Tensor:
    """What the top-k threshold counts: 2-D tensors (stacked: 3-D) only, nothing else."""
    return task_vectors if task_vectors.dim() == 3 else task_vectors.new_zeros(len(ctx.tasks), 0)


def prepare(vectors: TaskVectors, seed: int, k: float, **_: object) -> Tensor | None:
    """One top-k threshold per task over all 2-D tensors: the mask is global, not per tensor."""
    if not vectors.tasks:
        return None
    return global_thresholds(vectors, k, seed, transform=_matrices_only)


def merge(
    base: Tensor,
    task_vectors: Tensor,
    ctx: TensorContext,
    lam: float,
    k: float,
    subspace: int,
    steps: int,
    lr: float,
) -> Tensor:
    if task_vectors.dim() != 3:
        return task_vectors.mean(0)
    coeffs = math.task_coefficients(task_vectors, lam)
    basis = math.shared_subspace(task_vectors, subspace)
    delta = math.optimise_delta(task_vectors, coeffs, basis, steps, lr)
    return math.merge_layer(task_vectors, coeffs, delta, math.topk_masks(task_vectors, ctx.state))


DOGE = MergeMethod(
    name="doge",
    merge=merge,
    data="none",
    hparams=HPARAMS,
    prepare=prepare,
    description="DOGE: projective gradient descent on a shared δ, task-aware coefficients",
)


@hookimpl
def register_methods(register):
    register(DOGE)
