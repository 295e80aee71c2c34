"""DELLA-Merging (Deep et al., 2024, arXiv 2406.11617): MagPrune, sign election, fuse.

Per parameter tensor and task (mergekit 0.1.5's ``della`` method, ``mergekit/sparsify.py::
della_magprune`` and ``merge_methods/generalized_task_arithmetic.py``, with every model
weight 1; checked against it in ``tests/data/golden/della.safetensors``):

1. Drop (MagPrune): the entries of each row are ranked by magnitude, the ranks min-max
   normalised to r ∈ [0, 1], and an entry is kept with probability
   p = (density − ε) + 2ε·r, so small entries are dropped more often.
2. Rescale: the kept entries are multiplied by ‖τ‖₁ / ‖kept τ‖₁ of the whole tensor
   (skipped if either norm is below 1e-7).
3. Elect and fuse: TIES' election on the pruned vectors (the majority sign is the sign of
   their sum, ≥ 0 counting as +), the mean of the entries that agree (zeros never agree),
   0 where none does; θ = θ0 + λ · that mean.

What "row" means is mergekit's: a 1-D tensor is one row, otherwise ranks run along
dimension 1 (for a 4-D convolution, over the input channels of each output channel and
kernel position). Equal magnitudes get consecutive ranks in index order.

Departures:

- The rescale is mergekit's L1 matching; the paper and the authors' fork
  (declare-lab/della ``sparsify.py::rank_magnitude``) divide each kept entry by its own
  keep probability instead.
- Randomness comes from atmbench's per-(seed, parameter, task) uniforms (an entry is kept
  when its uniform < p), not from torch's global generator, so a cell is reproducible and
  a task's mask does not depend on the others. The golden test injects the uniforms that
  were fed to mergekit's Bernoulli draws.
- A row of a single entry gets r = 1/2 (p = density); mergekit divides 0 by 0 there.
- mergekit requires density ± ε inside (0, 1); so does ``epsilon`` < min(density, 1 −
  density) here, checked when the merge starts.

Hyperparameters: the paper's grids are not in the official code. The defaults are the
authors' README example (drop 0.3, so density 0.7; window 0.14, so ε = 0.07; λ = 1.1);
density is searched over {0.3, 0.5, 0.7} and λ over TIES' 0.1 … 1.8 (the fuse is the same
disjoint mean).
"""

from __future__ import annotations

import torch
from torch import Tensor

from atmbench.hookspecs import hookimpl
from atmbench.hparams import HParam
from atmbench.method import MergeMethod, TaskVectors, TensorContext

DENSITY = HParam(
    "density",
    default=0.7,
    search=(0.3, 0.5, 0.7),
    low=0.0,
    high=1.0,
    open_low=True,
    open_high=True,
    help="mean fraction of each task vector's entries kept by MagPrune",
)
EPSILON = HParam(
    "epsilon",
    default=0.07,
    low=0.0,
    help="half-width of the keep probabilities: p runs from density−ε to density+ε",
)
LAMBDA = HParam(
    "lam",
    default=1.1,
    search=tuple(round(0.1 * i, 1) for i in range(1, 19)),
    low=0.0,
    help="scaling coefficient of the fused task vector",
)


def keep_probabilities(tau: Tensor, density: float, epsilon: float) -> Tensor:
    """MagPrune's p = (density − ε) + 2ε·r, r the min-max normalised rank along dim 1."""
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau
    width = rows.shape[1]
    if width == 1:
        return torch.full_like(tau, density)
    ranks = rows.abs().argsort(dim=1, stable=True).argsort(dim=1).float()  # 0 … width − 1
    rank_norm = ranks / (width - 1)
    return ((density - epsilon) + rank_norm * 2 * epsilon).reshape(tau.shape)


def magprune(tau: Tensor, uniform: Tensor, density: float, epsilon: float) -> Tensor:
    """τ's entries kept where ``uniform`` < p, the whole rescaled to τ's L1 norm."""
    kept = tau * (uniform < keep_probabilities(tau, density, epsilon))
    before, after = tau.abs().sum(), kept.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)


def prepare(vectors: TaskVectors, seed: int, density: float, epsilon: float, **_: object):
    if not epsilon < min(density, 1 - density):
        raise ValueError(
            f"epsilon={epsilon} is invalid for density={density}: density ± epsilon must "
            f"lie inside (0, 1), i.e. epsilon < {min(density, 1 - density):g}"
        )


def della(
    base: Tensor, task_vectors: Tensor, ctx: TensorContext, density: float, epsilon: float
) -> Tensor:
    pruned = torch.stack(
        [
            magprune(tau, ctx.uniform(i, tau.shape), density, epsilon)
            for i, tau in enumerate(task_vectors)
        ]
    )
    majority = torch.where(pruned.sum(0) >= 0, 1.0, -1.0)
    agree = pruned.sign() == majority
    count = agree.sum(0).clamp_(min=1)
    return (pruned * agree).sum(0) / count


@hookimpl
def register_methods(register):
    register(
        MergeMethod(
            name="della",
            merge=della,
            data="none",
            hparams=(DENSITY, EPSILON),
            scale=LAMBDA,
            prepare=prepare,
            description="DELLA: magnitude-ranked random drop (MagPrune), sign election, mean",
        )
    )
