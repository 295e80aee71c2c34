"""Model Stock (Jang et al., ECCV 2024, arXiv 2403.19522): θ = θ0 + t · mean_t τ_t.

Per parameter tensor, with k experts and cos φ the mean pairwise cosine of their flattened
task vectors, the interpolation ratio t = k cos φ / ((k − 1) cos φ + 1) pulls the experts'
average towards the pretrained anchor θ0 (θ = t · mean θ_t + (1 − t) θ0).

The official naver-ai/model-stock repository holds no code, so this follows the two
implementations in use, checked against both in ``tests/data/golden/model_stock_*``:

- ``average=cosine`` (default): mergekit 0.1.5 ``merge_methods/model_stock.py``, which
  averages the pairwise **cosines**, dividing each dot product by max(‖a‖‖b‖, 1e-6) and
  clamping to [−1, 1], and keeps θ0 (t = 0) where |(k − 1) cos φ + 1| < 1e-6: the rule for
  LLM checkpoints.
- ``average=angle``: FusionBench 0.2.33 ``method/model_stock/model_stock.py``, which averages
  the pairwise **angles** (in degrees) and takes their cosine, with eps 1e-8 added to both
  denominators: the rule of its CLIP results.

Neither clamps t: a negative cosine extrapolates away from the average, as both do. The
method has no hyperparameter to tune (nothing is searched).

Departures: where |(k − 1) cos φ + 1| < 1e-6 (e.g. two opposite task vectors) both
variants keep θ0, mergekit's rule; FusionBench's eps would give t ≈ −2·10⁸ there.

One expert gives the expert back (t = 1, the cosine of a vector with itself),
where mergekit and FusionBench refuse to merge fewer than two; a zero task vector gives
cos = 0, so t = 0 and that parameter stays at θ0 (FusionBench's eps does the same).
mergekit's ``filter_wise`` option (one t per row) is not offered.
"""

from __future__ import annotations

import math

from torch import Tensor

from atmbench.hookspecs import hookimpl
from atmbench.hparams import HParam
from atmbench.method import MergeMethod, TensorContext

AVERAGE = HParam(
    "average",
    default="cosine",
    choices=("cosine", "angle"),
    type=str,
    help="average the pairwise cosines (mergekit) or the pairwise angles (FusionBench)",
)


def stock_ratio(task_vectors: Tensor, average: str) -> float:
    """t = k cos φ / ((k − 1) cos φ + 1) for the [k, ...] task vectors of one tensor."""
    k = len(task_vectors)
    if k == 1:
        return 1.0
    flat = task_vectors.reshape(k, -1).double()
    norms = flat.norm(dim=1)
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    dots = [float(flat[i] @ flat[j]) for i, j in pairs]
    products = [float(norms[i] * norms[j]) for i, j in pairs]
    if average == "cosine":
        cos = sum(_clamp(d / max(n, 1e-6)) for d, n in zip(dots, products, strict=True))
        cos /= len(pairs)
        denominator = (k - 1) * cos + 1
    else:
        angles = [math.acos(_clamp(d / (n + 1e-8))) for d, n in zip(dots, products, strict=True)]
        cos = math.cos(sum(angles) / len(pairs))
        denominator = (k - 1) * cos + 1 + 1e-8
    return 0.0 if abs(denominator) < 1e-6 else k * cos / denominator


def _clamp(cos: float) -> float:
    return max(-1.0, min(1.0, cos))


def model_stock(base: Tensor, task_vectors: Tensor, ctx: TensorContext, average: str) -> Tensor:
    return task_vectors.mean(0) * stock_ratio(task_vectors, average)


@hookimpl
def register_methods(register):
    register(
        MergeMethod(
            name="model_stock",
            merge=model_stock,
            data="none",
            hparams=(AVERAGE,),
            description="Model Stock: per tensor, the experts' mean pulled to θ0 by their angle",
        )
    )
