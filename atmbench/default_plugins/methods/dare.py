"""DARE (Yu et al., ICML 2024): drop each task-vector entry with probability p, rescale the
survivors by 1/(1 − p), then Task Arithmetic (``dare_ta``) or TIES (``dare_ties``).

Decisions:

- Every floating-point parameter is dropped, 1-D ones included (FusionBench's
  ``only_on_linear_weights=False``).
- Masks: ``uniform > p`` keeps an entry (FusionBench's ``rand > p``; official MergeLM draws
  ``bernoulli(p)`` instead, same law, different stream). Each (seed, parameter, task) has
  its own random stream (``TensorContext.uniform``, a counter-based SplitMix64), so masks
  don't depend on task order or on how the loop splits a parameter into row blocks, and the
  same cell seed always gives the same masks. Neither upstream seeds this way, so the golden
  masks are injected in the tests and the sampling is tested on its own. (Version 2: masks
  were drawn from torch's generator, several times slower.)
- The survivors are divided by float32(1 − p) (``kernels.dare_denominator``), in ``dare_ta``
  and ``dare_ties`` alike. (``dare_ties`` version 3: its kernels divided by float32(1) −
  float32(p), one ulp off for 414 of the 999 values p = 0.001 … 0.999, 0.9 among them.)
- ``dare_ties`` trims the *dropped and rescaled* vectors with the global TIES threshold, as
  FusionBench's DARE-TIES does; ``prepare`` redraws the same masks while streaming.
  Its k is fixed at 0.2 (not searched) to keep the grid small; its merge and λ are those of
  ``ties`` (FusionBench: ``merge=sum``, λ = 0.5).
- p defaults to 0.5 (FusionBench) and is searched over {0.1, 0.3, 0.5, 0.7, 0.9} (the
  paper's range); p = 1 is refused (nothing would survive the rescale).
"""

from __future__ import annotations

import torch
from torch import Tensor

from atmbench.default_plugins.methods import ta, ties
from atmbench.default_plugins.methods.masking import (
    MERGE,
    Drop,
    dare,
    ties_finish,
    ties_k,
    ties_merge,
    ties_prepare,
)
from atmbench.hookspecs import hookimpl
from atmbench.hparams import HParam
from atmbench.method import MergeMethod, TaskVectors, TensorContext

P = HParam(
    "p",
    default=0.5,
    search=(0.1, 0.3, 0.5, 0.7, 0.9),
    low=0.0,
    high=1.0,
    open_high=True,
    help="drop probability of each task-vector entry",
)


def dare_ta(base: Tensor, task_vectors: Tensor, ctx: TensorContext, p: float) -> Tensor:
    dropped = dare(task_vectors, ctx, p)
    return torch.sum(dropped, 0, out=ctx.result("sum", dropped.shape[1:]))


def prepare_ties(vectors: TaskVectors, seed: int, p: float, k: float, **_: object):
    return ties_prepare(vectors, seed, k, transform=Drop(p))


def dare_ties(
    base: Tensor, task_vectors: Tensor, ctx: TensorContext, p: float, k: float, merge: str
) -> Tensor:
    return ties_merge(task_vectors, ctx, merge, drop=Drop(p))


@hookimpl
def register_methods(register):
    register(
        MergeMethod(
            name="dare_ta",
            merge=dare_ta,
            data="none",
            rowwise=True,
            stacked=False,
            version="2",
            hparams=(P,),
            scale=ta.LAMBDA,
            aliases=("dare",),
            description="DARE drop-and-rescale, then Task Arithmetic",
        )
    )
    register(
        MergeMethod(
            name="dare_ties",
            merge=dare_ties,
            data="none",
            rowwise=True,
            stacked=False,
            version="3",
            hparams=(P, ties_k(search=()), MERGE),
            scale=ties.LAMBDA,
            prepare=prepare_ties,
            finish=ties_finish,
            description="DARE drop-and-rescale, then TIES-Merging",
        )
    )
