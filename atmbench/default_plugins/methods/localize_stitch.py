"""Localize-and-Stitch (He et al., TMLR 2025, arXiv 2408.13656): sparse task regions, stitched.

**Localise**, per task: mask logits S start at +b where |τ_t| exceeds the k-th largest |τ_t|
over every tensor together (k = ``sparsity`` x the parameter count; strictly greater, so
the k-th itself and ties with it start outside) and at -b elsewhere. Each epoch the model
θ0 + σ(S) ⊙ τ_t is trained with the task's loss on a few labelled training shots: the
gradients of every batch, times τ_t, are **summed** into g = lr Σ ∂L/∂θ ⊙ τ_t, and then
S ← S - g σ'(S) + l1 sign(S) σ'(S) with sign(0) = -1. The mask is m_t = [σ(S) rounds to 1].
**Stitch**: θ = θ0 + Σ_t w_t ⊙ τ_t with w_t = m_t / (the number of masks covering the entry),
so overlapping regions are averaged and no scaling coefficient is used.

Follows the official code (uiuctml/Localize-and-Stitch @109d206: ``localize_utils.py``
``Localizer.create_basepatch``, ``train_graft``, ``interpolate_model``, ``Stitcher.
get_average_masks``, ``interpolate_models``; ``vision/src/main_localize_stitch.py`` and
``vision_datasets/registry.py::create_k_shot_dataset``): sparsity 1e-5, b = 5, lr 1e7,
l1 1, 10 epochs, batches of 128 from the first 64 training examples of each class in
dataset order, shuffled and capped at 1024 (the script's global ``random`` shuffle is a
seeded generator here, and so is the loader's). Every shared parameter is localised (the
script's trainable set is the whole image tower). A golden of the official ``Localizer`` and
``Stitcher`` on a tiny model checks it (``tests/data/golden/scripts/localize_stitch_golden.py``).

Departures: the official scripts evaluate the grafted model on the training shots every
5 epochs (printed only, it changes nothing) and are not run; ``sparsity`` is searchable
only by pinning it. With no batch in an epoch (``epochs=0``) the mask is the initial top-k,
the paper's dataless variant (its script's 10%: ``localize_stitch:epochs=0,sparsity=0.1``),
which reads no data (its row still says ``train``: the data class is the method's).

Language models (text8, any causal LM): the mask trains on the suite's own training loss
(``TaskModel.loss``: cross-entropy over the answer tokens, as the experts were tuned), as
for images. The shots are per class, and a generated answer is no class: a task whose
labels are token sequences counts as one class, so its shots are its first 64 training
examples, shuffled (the paper's few-shot budget per class, the official code's order).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call
from torch.utils.data import DataLoader, Subset

from atmbench.adapt import AdaptRequest, AdaptResult
from atmbench.finetune import TrainStats
from atmbench.hookspecs import hookimpl
from atmbench.hparams import HParam
from atmbench.method import MergeMethod, TensorContext
from atmbench.seeds import derive
from atmbench.suite import Batch

HPARAMS = (
    HParam("sparsity", default=1e-5, low=0.0, high=1.0, help="initial mask: top fraction of |τ|"),
    HParam("lr", default=1e7, low=0.0, help="step on the summed gradient ⊙ τ"),
    HParam("l1", default=1.0, low=0.0, help="l1_strength of the mask's sparsity term"),
    HParam("epochs", default=10, low=0, type=int, help="mask-training epochs"),
)
SIGMOID_BIAS = 5.0
SHOTS = 64
CAP = 1024
BATCH = 128

Loss = Callable[[dict[str, Tensor], Any], Tensor]
"""``loss(shared parameters, batch) -> scalar loss``."""


def initial_logits(vectors: Mapping[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """+b where |τ| > the k-th largest |τ| over all tensors (k = int(sparsity · count)), -b
    elsewhere; k = 0 starts every logit at -b."""
    magnitudes = torch.cat([v.abs().flatten() for v in vectors.values()])
    k = int(sparsity * magnitudes.numel())
    if k == 0:
        return {key: torch.full_like(v, -SIGMOID_BIAS) for key, v in vectors.items()}
    threshold = torch.topk(magnitudes, k).values.min()
    return {
        key: torch.where(v.abs() > threshold, SIGMOID_BIAS, -SIGMOID_BIAS).to(v.dtype)
        for key, v in vectors.items()
    }


def localize(
    loss: Loss,
    base: Mapping[str, Tensor],
    vectors: Mapping[str, Tensor],
    epochs: Iterable[Iterable[Any]],
    sparsity: float,
    lr: float,
    l1: float,
) -> dict[str, Tensor]:
    """One task's boolean mask per parameter; ``epochs`` yields each epoch's batches."""
    logits = initial_logits(vectors, sparsity)
    for batches in epochs:
        params = {
            k: (base[k] + torch.sigmoid(logits[k]) * vectors[k]).requires_grad_(True) for k in base
        }
        total = {k: torch.zeros_like(v) for k, v in base.items()}
        for batch in batches:
            grads = torch.autograd.grad(
                loss(params, batch), list(params.values()), allow_unused=True
            )
            for key, g in zip(params, grads, strict=True):
                if g is not None:  # a parameter the loss does not reach has no gradient
                    total[key] += lr * (g * vectors[key])
        with torch.no_grad():
            for key, s in logits.items():
                derivative = torch.sigmoid(s) * (1 - torch.sigmoid(s))
                s -= total[key] * derivative - l1 * torch.where(s > 0, derivative, -derivative)
    return {k: torch.round(torch.sigmoid(s)) > 0 for k, s in logits.items()}


def stitch_weights(masks: Tensor) -> Tensor:
    """w_t = m_t / (number of masks covering the entry), 0 outside m_t; ``masks`` [T, ...]."""
    covered = masks.sum(0, dtype=torch.float32)
    return masks.float() / covered.clamp_min(1)


def shots(dataset, seed: int, task: str) -> list[int]:
    """The first ``SHOTS`` indices of each class in dataset order, shuffled, capped at ``CAP``.

    An item's class is its label (``dataset.targets``, or the item's last tensor) when that
    is one value; a label of several values (a language model's answer tokens) is no class,
    and such a task counts as one class: its first ``SHOTS`` examples.
    """
    labels = getattr(dataset, "targets", None)
    if labels is None:
        labels = [_class_of(dataset[i][-1]) for i in range(len(dataset))]
    counts: dict[int | None, list[int]] = {}
    for index, label in enumerate(labels):
        picked = counts.setdefault(None if label is None else int(label), [])
        if len(picked) < SHOTS:
            picked.append(index)
    chosen = [i for picked in counts.values() for i in picked]
    generator = torch.Generator().manual_seed(derive(seed, "localize shots", task))
    order = torch.randperm(len(chosen), generator=generator).tolist()
    return [chosen[i] for i in order][:CAP]


def _class_of(label: Tensor) -> int | None:
    return int(label) if label.numel() == 1 else None


def adapt(request: AdaptRequest, sparsity: float, lr: float, l1: float, epochs: int) -> AdaptResult:
    bench, vectors = request.benchmark, request.vectors
    tasks = vectors.tasks
    device = bench.device
    keys = [k for k in request.base if k in set(vectors.keys(tasks[0]))] if tasks else []
    base = {k: request.base[k].to(device, torch.float32) for k in keys}
    backbone = bench.backbone(dict(request.base))
    spent = TrainStats()
    masks: dict[str, list[Tensor]] = {k: [] for k in keys}
    for task in tasks:
        private = request.private.get(task)
        model = bench.task_model(task, backbone, dict(private) if private else None)
        model.eval().requires_grad_(False)
        dataset = bench.dataset(task, "train") if epochs else []
        subset = Subset(dataset, shots(dataset, request.seed, task) if epochs else [])
        generator = torch.Generator().manual_seed(derive(request.seed, "localize batches", task))
        loader = DataLoader(
            subset,
            batch_size=BATCH,
            shuffle=True,
            generator=generator,
            collate_fn=getattr(dataset, "collate", None),
        )

        def loss(params: dict[str, Tensor], batch: Batch, model=model) -> Tensor:
            named = {f"model.backbone.{k}": v for k, v in params.items()}
            spent.steps += 1
            spent.examples += len(batch[0])
            return functional_call(_LossOf(model), named, ([t.to(device) for t in batch],))

        tau = {k: vectors.get(task, k).to(device, torch.float32) for k in keys}
        mask = localize(loss, base, tau, (loader for _ in range(epochs)), sparsity, lr, l1)
        for k in keys:
            masks[k].append(mask[k].cpu())
    return AdaptResult({k: torch.stack(v) for k, v in masks.items()}, spent)


class _LossOf(torch.nn.Module):
    """A task model whose forward is its training loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> Tensor:
        return self.model.loss(batch)


def stitch(
    base: Tensor, task_vectors: Sequence[Tensor], ctx: TensorContext, **hparams: Any
) -> Tensor:
    """Σ_t w_t ⊙ τ_t with this parameter's learned masks (``hparams``: spent by ``adapt``)."""
    weights = stitch_weights(ctx.state[ctx.key]).to(task_vectors.device)
    return (weights * task_vectors).sum(0)


@hookimpl
def register_methods(register):
    register(
        MergeMethod(
            name="localize_stitch",
            merge=stitch,
            data="train",
            hparams=HPARAMS,
            adapt=adapt,
            description="Localize-and-Stitch: per-task sparse masks trained on a few labelled "
            "shots, overlaps averaged",
        )
    )
