"""LiNeS, Layer-increasing Network Scaling (Wang et al., ICLR 2025, arXiv 2410.17146).

A data-free edit of any merge (``METHOD+lines``): the merged task vector is scaled per layer,
linearly in depth, so shallow layers (general features) stay near θ0 and deep ones keep the
merge: residual block ℓ of B (ℓ = 0 … B − 1) gets α + β·ℓ/(B − 1), every other parameter α,
and θ = θ0 + scaled τ_m, with no further coefficient.

Follows the official code (wang-kee/LiNeS @43a7bdd), checked in
``tests/data/golden/lines_sum.safetensors``:

- ``src/eval/eval.py::LiNeS_scaling``: a key is in block i if its name contains ``.i.``,
  trying i = 0, 1, … in order (the first match wins); keys in no block (embeddings,
  ``ln_pre``, ``ln_post``, ``proj``) get α.
- Multi-task merging (``evaluate``): α = (‖Σ_t τ_t‖₁ / ‖τ_m‖₁) / T is fixed
  (``aggregation.py``'s ``norm_summed_tvs`` and ``norm_mtv``; 1/T for Task Arithmetic's
  sum), τ_m the method's merged task vector *before* its scaling coefficient (LiNeS
  replaces it); β is searched on validation: ``linspace(0, 1, 11)[1:]`` after TA and
  Consensus, ``arange(0.1, 1.6, 0.1)`` after TIES.

Departures:

- B is the number of residual blocks the parameter names show: 1 + the largest i in any
  ``.i.`` (the official code hard-codes 12 for ViT-B and 24 for ViT-L, which is what this
  gives on their open_clip towers). One block: every block key gets α + β.
- β is searched over 0.1 … 1.5 after every method (the union of the official grids).
- τ_m is read off the merge as (θ_merged − θ0)/λ, λ the method's chosen scaling coefficient
  (exact up to float rounding; the official code never scales it). Since α ∝ 1/‖τ_m‖₁, the
  α part does not depend on λ at all; the β part is relative to the unscaled merge, as
  in the official code. A merge with λ = 0 is left as it is (θ0).
- Scaling applies to every floating-point parameter (the official flattened vector covers
  the same); integer buffers keep θ0's values.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

from atmbench.hookspecs import hookimpl
from atmbench.hparams import HParam
from atmbench.method import TaskVectors
from atmbench.refiner import Refiner, RefineRequest, RefineResult

BETA = HParam(
    "beta",
    default=0.5,
    search=tuple(round(0.1 * i, 1) for i in range(1, 16)),
    low=0.0,
    help="scaling added across the depth: the last block gets α + β, the first α",
)

BLOCK = re.compile(r"\.(\d+)\.")


def block_count(keys: list[str]) -> int:
    """B: 1 + the largest block index any key shows (``.i.``), 0 if none does."""
    found = [int(i) for key in keys for i in BLOCK.findall(key)]
    return max(found) + 1 if found else 0


def depth_scales(keys: list[str], alpha: float, beta: float) -> dict[str, float]:
    """key -> α + β·ℓ/(B − 1) for a key of block ℓ (the official first-match rule), α outside."""
    blocks = block_count(keys)
    scales = {}
    for key in keys:
        scales[key] = alpha
        for layer in range(blocks):
            if f".{layer}." in key:
                scales[key] = alpha + beta * (layer / (blocks - 1) if blocks > 1 else 1.0)
                break
    return scales


def l1_of_sum(vectors: TaskVectors, keys: list[str]) -> float:
    """‖Σ_t τ_t‖₁ over ``keys``, one parameter at a time."""
    total = 0.0
    for key in keys:
        summed = torch.zeros(vectors.get(vectors.tasks[0], key).shape, dtype=torch.float64)
        for task in vectors.tasks:
            summed += vectors.get(task, key)
        total += float(summed.abs().sum())
    return total


def lines(
    base: Mapping[str, Tensor], merged: Mapping[str, Tensor], vectors: TaskVectors, beta: float
) -> dict[str, Tensor]:
    """θ0 + LiNeS-scaled ``merged`` (an unscaled merged task vector, float32 per key)."""
    keys = [k for k, b in base.items() if b.is_floating_point()]
    norm = sum(float(merged[k].double().abs().sum()) for k in keys)
    if norm == 0:
        return {k: b.clone() for k, b in base.items()}
    alpha = l1_of_sum(vectors, keys) / norm / len(vectors.tasks)
    scales = depth_scales(keys, alpha, beta)
    return {
        k: (b.float() + scales[k] * merged[k]).to(b.dtype) if k in scales else b.clone()
        for k, b in base.items()
    }


def refine(request: RefineRequest) -> RefineResult:
    if request.vectors is None:
        raise ValueError("lines refines a merge of task vectors: name a method before it")
    method, chosen = request.method, request.method_hparams
    scale = chosen.get(method.scale.name, 1.0) if method and method.scale else 1.0
    if scale == 0:
        return RefineResult({k: v.clone() for k, v in request.start.items()})
    merged = {
        k: (s.float() - request.base[k].float()) / scale
        for k, s in request.start.items()
        if s.is_floating_point()
    }
    state = lines(request.base, merged, request.vectors, request.hparams["beta"])
    return RefineResult({k: v.to(request.start[k].dtype) for k, v in state.items()})


REFINER = Refiner(
    name="lines",
    refine=refine,
    data="none",
    hparams=(BETA,),
    description="LiNeS: scale the merged task vector per block, linearly in depth",
)


@hookimpl
def register_refiners(register):
    register(REFINER)
