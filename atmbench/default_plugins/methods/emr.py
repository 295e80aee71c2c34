"""EMR-Merging, Elect, Mask and Rescale (Huang et al., NeurIPS 2024, arXiv 2405.17461).

One shared task vector plus, per task, a 1-bit mask and one scalar; task t is evaluated
with its own model θ_t = θ0 + γ_t·(M_t ⊙ τ_uni), so it needs the task id at inference:

1. Elect: σ = sign(Σ_t τ_t), a zero sum counting as −1; τ_uni = σ ⊙ max_t(|τ_t| where
   τ_t·σ > 0), 0 where no task agrees.
2. Mask: M_t = 1[τ_t ⊙ σ > 0].
3. Rescale: γ_t = Σ_p mean|τ_t[p]| / Σ_p mean|M_t[p] ⊙ τ_uni[p]| over the parameters p
   (every tensor counts alike whatever its size; not a global L1 ratio).

Follows FusionBench 0.2.33 (``fusion_bench/method/emr_merging/utils.py::emr_merge``,
``EMRTaskModulator.apply``), which the authors' ``merge_vit/src/main_emr_merging.py``
(harveyhuang18/EMR_Merging @cc225ec) agrees with, checked in
``tests/data/golden/emr.safetensors``. Every floating-point parameter takes part; there
are no hyperparameters, so nothing is searched and no data is read.

Where τ_uni ≠ 0 its sign is σ, so M_t ⊙ τ_uni = 1[τ_t·τ_uni > 0] ⊙ τ_uni: task t's model
is built from τ_uni and τ_t alone (:attr:`~atmbench.method.MergeMethod.per_task`), and the
mask costs one bit per entry of storage per task, plus γ_t.

Departure: where every masked entry of τ_uni is 0 (γ_t = x/0 upstream), γ_t is 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from atmbench.hookspecs import hookimpl
from atmbench.method import MergeMethod, TaskVectors, TensorContext
from atmbench.streaming import floating_keys


def unified(task_vectors: Tensor) -> Tensor:
    """τ_uni: the elected sign times the largest agreeing magnitude (0 where none agrees)."""
    sign = torch.where(task_vectors.sum(0) > 0, 1.0, -1.0)
    agreeing = (task_vectors * sign > 0) * task_vectors.abs()
    return sign * agreeing.amax(0)


def prepare(vectors: TaskVectors, seed: int, **_: object) -> Tensor:
    """γ ``[T]``: each task's summed per-tensor mean |τ_t| over that of its masked τ_uni."""
    tasks = len(vectors.tasks)
    own, masked = torch.zeros(tasks, dtype=torch.float64), torch.zeros(tasks, dtype=torch.float64)
    for key in floating_keys(vectors):
        stacked = vectors.stacked(key).float()
        shared = unified(stacked)
        for t, tau in enumerate(stacked):
            own[t] += float(tau.abs().mean())
            masked[t] += float(((tau * shared > 0) * shared).abs().mean())
    return torch.where(masked > 0, own / masked.clamp(min=1e-300), 1.0).float()


def emr(base: Tensor, task_vectors: Tensor, ctx: TensorContext) -> Tensor:
    return unified(task_vectors)


def emr_task(shared: Tensor, task_vector: Tensor, index: int, ctx: TensorContext) -> Tensor:
    """γ_t · (M_t ⊙ τ_uni) of one parameter."""
    return ctx.state[index] * ((task_vector * shared > 0) * shared)


@hookimpl
def register_methods(register):
    register(
        MergeMethod(
            name="emr",
            merge=emr,
            data="none",
            rowwise=True,
            prepare=prepare,
            per_task=emr_task,
            per_task_bytes=lambda entries: (entries + 7) // 8 + 4,  # a 1-bit mask and γ_t
            description="EMR-Merging: elected shared vector, per-task masks and rescalers",
        )
    )
