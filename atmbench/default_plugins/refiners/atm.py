"""ATM, Alternating Tuning and Merging (Zhou et al., arXiv 2411.03055), as one refiner.

Each iteration fine-tunes a copy of the current model on every task for ``budget /
iterations`` epochs (a fresh AdamW, no schedule, as in the official code), takes each task
vector relative to the current model, and moves the current model by ``alpha`` times their
mean (``alpha = 1`` is the paper's α = 1/T on the sum). With one iteration this is task
arithmetic with λ = 1/T over experts fine-tuned for the whole budget; with one epoch per
iteration and full batches it is multi-task gradient descent.

The default number of iterations is ⌈the largest task budget in epochs⌉: the task with the
most epochs gets about one epoch per round, every other task the same number of rounds and
so less than an epoch per round (vision8 at the experts' budgets: 76 rounds, from SUN397's
76 epochs; SVHN, budgeted 4 epochs, tunes 4/76 of an epoch per round). The resolved value
is stored with the cell's hyperparameters as ``atm.iterations``.

Data: ``atm`` alone reads each task's train split as the suite serves it (augmented where
the suite augments, as the experts were); ``METHOD+atm`` reads the validation split as the
suite serves it, which is with evaluation preprocessing (no augmentation), because the
suite contract gives a split one preprocessing and the validation split also selects
hyperparameters. On digits8 the two are the same (no augmentation); on the vision suites
refinement tunes without open_clip's train-time augmentation, unlike the experts and unlike
the official code, which fine-tunes with it whatever the split: a known deviation until the
suite contract can serve a split for training.

* ``atm`` alone starts from the base θ0 and tunes on each task's train split; the default
  budget is the experts' recipe epochs, so it spends the compute one-shot merging spends.
* ``METHOD+atm`` starts from METHOD's merged model and tunes on each task's validation
  split only. Its default budget is the same number of epochs, over a split that is much
  smaller (a tenth of train on the standard protocol), so refinement costs a fraction of
  the experts' compute.

The tuning of one task reads that task's data alone (the federated reading: only task
vectors travel). The current model and one iteration's task vectors are kept in float32 on
the CPU (T + 1 copies of the encoder), which the cosine analysis needs anyway.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from atmbench.evaluate import task_score
from atmbench.finetune import Recipe, TrainStats, finetune, state_on_cpu
from atmbench.hookspecs import hookimpl
from atmbench.hparams import HParam
from atmbench.refiner import TRACE, Refiner, RefineRequest, RefineResult
from atmbench.seeds import derive
from atmbench.suite import Benchmark

Private = dict[str, dict[str, Tensor]]

HPARAMS = (
    HParam(
        "iterations",
        default=0,
        low=0,
        type=int,
        help="tune/merge rounds; 0: ⌈the largest task budget in epochs⌉ (about one epoch per "
        "round for that task, less for the others)",
    ),
    HParam(
        "budget",
        default=0.0,
        low=0.0,
        help="epochs per task over all iterations; 0: the experts' recipe epochs",
    ),
    HParam("lr", default=0.0, low=0.0, help="AdamW learning rate; 0: the experts' recipe lr"),
    HParam("batch_size", default=0, low=0, type=int, help="0: the experts' recipe batch size"),
    HParam(
        "alpha",
        default=1.0,
        low=0.0,
        open_low=True,
        help="merge step: θ += alpha · mean of the task vectors (1: the paper's 1/T on the sum)",
    ),
)


@dataclass(frozen=True)
class Plan:
    """The resolved schedule: how many rounds, and per task its recipe and epochs per round."""

    iterations: int
    recipes: dict[str, Recipe]
    epochs: dict[str, float]


def make_plan(recipes: Mapping[str, Recipe], hparams: Mapping[str, Any]) -> Plan:
    """Resolve the ``0 = default`` hyperparameters against each task's expert recipe.

    The paper's optimizer is AdamW with no schedule, so the recipe's schedule and warm-up
    are replaced by a constant learning rate; weight decay and clipping stay the experts'.
    """
    budgets = {t: hparams["budget"] or r.epochs for t, r in recipes.items()}
    iterations = hparams["iterations"] or max(1, math.ceil(max(budgets.values())))
    tuned = {
        t: dataclasses.replace(
            r,
            lr=hparams["lr"] or r.lr,
            batch_size=hparams["batch_size"] or r.batch_size,
            schedule="constant",
            warmup_steps=0,
        )
        for t, r in recipes.items()
    }
    return Plan(iterations, tuned, {t: b / iterations for t, b in budgets.items()})


def merge_step(
    current: Mapping[str, Tensor], vectors: Sequence[Mapping[str, Tensor]], alpha: float
) -> dict[str, Tensor]:
    """θ + alpha · mean_t τ_t for the keys the task vectors have; other entries are kept."""
    return {
        k: v + alpha * torch.stack([tv[k] for tv in vectors]).mean(0) if k in vectors[0] else v
        for k, v in current.items()
    }


def gram(vectors: Sequence[Mapping[str, Tensor]]) -> Tensor:
    """Inner products of the task vectors flattened over all their tensors, in float64."""
    out = torch.zeros(len(vectors), len(vectors), dtype=torch.float64)
    for key in vectors[0]:
        stacked = torch.stack([tv[key].reshape(-1) for tv in vectors]).double()
        out += stacked @ stacked.T
    return out


def cosines(inner: Tensor) -> Tensor:
    """Cosine similarities from a Gram matrix; a zero vector is orthogonal to everything."""
    norms = inner.diagonal().sqrt()
    out = inner / torch.outer(norms, norms).clamp_min(torch.finfo(inner.dtype).tiny)
    return out.fill_diagonal_(1.0).clamp(-1.0, 1.0)


def _floats(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.float() if v.is_floating_point() else v.clone() for k, v in state.items()}


def _scores(
    bench: Benchmark, state: dict[str, Tensor], private: Private, splits: Sequence[str]
) -> dict[str, dict[str, float]]:
    """split -> task -> score of ``state``: the trace's accuracy record."""
    backbone = bench.backbone(state)
    models = {t: bench.task_model(t, backbone, private.get(t) or None) for t in bench.tasks}
    return {
        split: {t: task_score(bench, models[t], t, split) for t in bench.tasks} for split in splits
    }


def _tune(
    bench: Benchmark,
    task: str,
    current: dict[str, Tensor],
    private: dict[str, Tensor] | None,
    split: str,
    plan: Plan,
    seed: int,
    desc: str,
    progress: bool,
) -> tuple[dict[str, Tensor], dict[str, Tensor], TrainStats]:
    """Fine-tune a copy of ``current`` on one task's ``split``.

    Returns (τ, the task's tuned private parameters, compute spent): private parameters
    are not merged, each task carries its own from round to round.
    """
    model = bench.task_model(task, bench.backbone(current), private or None)
    spent = finetune(
        model,
        bench.dataset(task, split),
        plan.recipes[task],
        seed=seed,
        epochs=plan.epochs[task],
        desc=desc,
        progress=progress,
    )
    tuned = state_on_cpu(model.backbone)
    vector = {k: tuned[k].float() - v for k, v in current.items() if v.is_floating_point()}
    return vector, model.private_state(), spent


def alternate(
    bench: Benchmark,
    start: Mapping[str, Tensor],
    split: str,
    hparams: Mapping[str, Any],
    seed: int,
    progress: bool = True,
    private: Mapping[str, Mapping[str, Tensor]] | None = None,
    trace_splits: Sequence[str] = TRACE,
) -> RefineResult:
    """The ATM loop from ``start``, tuning on ``split``; the trace's record 0 is the start.

    Every record scores ``trace_splits`` (validation by default: what a user would select
    a round on; the runner scores the final model on test once the loop is done).
    """
    plan = make_plan({t: bench.recipe(t) for t in bench.tasks}, hparams)
    dtypes = {k: v.dtype for k, v in start.items()}
    current = _floats(start)
    privates: Private = {t: dict(v) for t, v in (private or {}).items() if v}
    stats = {t: TrainStats() for t in bench.tasks}
    accuracy = _scores(bench, current, privates, trace_splits)
    trace: list[dict[str, Any]] = [{"iteration": 0, "accuracy": accuracy}]
    for iteration in range(1, plan.iterations + 1):
        vectors, steps = [], {}
        for task in bench.tasks:
            vector, tuned_private, spent = _tune(
                bench,
                task,
                current,
                privates.get(task),
                split,
                plan,
                derive(seed, "atm", iteration, task),
                f"atm {iteration}/{plan.iterations} {task}",
                progress,
            )
            vectors.append(vector)
            if tuned_private:
                privates[task] = tuned_private
            stats[task] += spent
            steps[task] = spent.steps
        inner = gram(vectors)
        current = merge_step(current, vectors, hparams["alpha"])
        trace.append(
            {
                "iteration": iteration,
                "tasks": list(bench.tasks),
                "epochs": plan.epochs,
                "steps": steps,
                "accuracy": _scores(bench, current, privates, trace_splits),
                "norms": dict(zip(bench.tasks, inner.diagonal().sqrt().tolist(), strict=True)),
                "cosine": cosines(inner).tolist(),
            }
        )
    state = {k: v.to(dtypes[k]) for k, v in current.items()}
    return RefineResult(
        state, stats, trace, privates or None, resolved={"iterations": plan.iterations}
    )


def refine(request: RefineRequest) -> RefineResult:
    """``atm`` tunes θ0 on train; ``METHOD+atm`` tunes METHOD's merge on validation only."""
    from_base = request.from_base
    return alternate(
        request.benchmark,
        request.base if from_base else request.start,
        "train" if from_base else "val",
        request.hparams,
        request.seed,
        request.progress,
        None if from_base else request.private,
        request.trace,
    )


REFINER = Refiner(
    name="atm",
    refine=refine,
    data="validation",
    data_from_base="train",
    hparams=HPARAMS,
    description="ATM: alternate fine-tuning on each task and merging the task vectors",
)


@hookimpl
def register_refiners(register):
    register(REFINER)
