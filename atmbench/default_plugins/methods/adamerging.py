"""AdaMerging (Yang et al., ICLR 2024): merging coefficients learned at test time.

θ = θ0 + Σ_t λ_t τ_t (``adamerging``, task-wise: T coefficients) or θ[p] = θ0[p] +
Σ_t λ_{t,p} τ_t[p] (``adamerging_layer``, layer-wise: one coefficient per task and
parameter tensor; a "layer" is every tensor of the state dict, weight, bias and LayerNorm
alike, as in the official code and FusionBench). The coefficients are the only trainable
parameters: they minimise the Shannon entropy of each task's predictions on that task's
**unlabeled test inputs** (mean over the batch, summed over tasks), the data class
``test-unlabeled``. Labels are never read: the batches come from
:func:`atmbench.adapt.unlabeled_test_batches`, which blanks them.

Follows FusionBench 0.2.33 (``fusion_bench/method/adamerging/{layer,task}_wise_adamerging.py``,
``models/wrappers/{layer,task}_wise_fusion.py``, ``entropy_loss.py``, ``config/method/
adamerging/clip.yaml``): every λ starts at 0.3; Adam (lr 1e-3, betas (0.9, 0.999), no
weight decay); each step draws one shuffled batch of 16 test inputs per task (an endless
loader reshuffled every pass), back-propagates each task's entropy -Σ p log(p + 1e-8) and
takes one step on the summed gradients; the coefficients are not clamped
(``clamp_weights: false``). A golden of FusionBench's own wrappers and loss on a tiny model
checks this (``tests/data/golden/scripts/fusionbench_goldens.py``).

Departures, each a hyperparameter:

- ``steps`` defaults to 500, the official code's count (FusionBench's YAML runs 1000). On
  digits8's CPU suite 500 steps took 2-4 minutes per cell on a loaded 2-core machine (one
  backbone pass a step over the 8 tasks' 16 images each), so the default is kept there too.
- The official code also clamps λ to [0, 1] and takes 2 batches per task per step; neither
  is done here, as in FusionBench.

Language models (text8, Flan-T5, any causal LM): a prediction is a generated answer, and
the suite contract says which distribution stands for it (``TaskModel.prediction_logits``,
read from ``unlabeled_features``): the **first answer token's** next-token distribution,
computed from the prompt alone as greedy generation's first step computes it. That is the
position FusionBench's AdaMerging for Flan-T5 reads (``flan_t5_layer_wise_adamerging.py``:
the decoder's first step), it is the one token every later one conditions on, and it costs
one forward pass of the prompt; the entropy of a whole answer has no closed form, and the
later positions would need the model's own greedy answer regenerated under every new
merge. Tried once on text8 (llama-tiny, seed 0, a loaded 2-core machine): the mean entropy
of every answer token, teacher-forced on that greedy answer, scored 38.2 / 38.3 exact match
(task- / layer-wise) against 37.6 / 38.1 here, within the seeds' spread, at 3x the time
(99 s against 31 s). The unlabeled batches hold the prompt only (the datasets'
``inputs``), so neither the answer nor its tokens in a teacher-forced input reach the
method. Departure from FusionBench's Flan-T5 code: it averages the logits over the batch
before taking the entropy (one entropy per batch, which pushes every prompt towards the
same first token); here, as in its CLIP and GPT-2 code and the paper, each example's
entropy is taken, then averaged.
Classification suites read their class logits exactly as before; a regression head
(RoBERTa's or GPT-2's STS-B) has no distribution and is refused with a one-line error.

Other decisions: the task models run in eval mode (FusionBench calls ``train()``; CLIP's
and digits8's encoders have no dropout, so nothing differs); frozen heads and task-private
parameters are the experts' and never adapted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from atmbench.adapt import AdaptRequest, AdaptResult, unlabeled_test_batches
from atmbench.finetune import TrainStats
from atmbench.hookspecs import hookimpl
from atmbench.hparams import HParam
from atmbench.method import MergeMethod, TensorContext
from atmbench.suite import Batch, TaskModel

EPS = 1e-8
"""Inside FusionBench's log(p + eps)."""

HPARAMS = (
    HParam("steps", default=500, low=0, type=int, help="Adam steps of test-time adaptation"),
    HParam("lr", default=1e-3, low=0.0, open_low=True, help="Adam learning rate"),
    HParam("init", default=0.3, help="initial value of every coefficient"),
    HParam("batch_size", default=16, low=1, type=int, help="test inputs per task and step"),
)

Forward = Callable[[dict[str, Tensor], Mapping[str, Batch]], dict[str, Tensor]]
"""``forward(shared parameters, {task: batch}) -> {task: logits [batch, classes]}``: each
example's ``prediction_logits``."""


def entropy(logits: Tensor) -> Tensor:
    """Mean over the batch of the Shannon entropy of softmax(logits), as FusionBench."""
    probs = torch.softmax(logits, dim=-1)
    return -(probs * torch.log(probs + EPS)).sum(-1).mean()


def merged_parameters(
    base: Mapping[str, Tensor], vectors: Mapping[str, Tensor], weights: Tensor
) -> dict[str, Tensor]:
    """θ0[p] + Σ_t w[t, p] τ_t[p], the terms added in task order; ``weights`` [T] (task-wise)
    or [T, P] (layer-wise, P = the parameters in ``base``'s order)."""
    merged = {}
    for index, (key, b) in enumerate(base.items()):
        w = weights if weights.dim() == 1 else weights[:, index]
        value = b
        for t, tau in enumerate(vectors[key]):
            value = value + tau * w[t]
        merged[key] = value
    return merged


def learn(
    forward: Forward,
    base: Mapping[str, Tensor],
    vectors: Mapping[str, Tensor],
    tasks: Sequence[str],
    batches: Iterator[Mapping[str, Batch]],
    steps: int,
    lr: float,
    init: float,
    layerwise: bool,
    progress: bool = False,
) -> tuple[Tensor, list[float]]:
    """Entropy-minimising coefficients [T] or [T, P] (detached), and the summed loss per step.

    ``vectors`` maps each key of ``base`` to the task vectors stacked [T, ...]; ``batches``
    yields one batch per task for every step.
    """
    shape = (len(tasks), len(base)) if layerwise else (len(tasks),)
    weights = torch.full(shape, float(init), device=next(iter(base.values())).device)
    weights.requires_grad_(True)
    optimizer = torch.optim.Adam([weights], lr=lr)
    losses = []
    bar = tqdm(range(steps), desc="adamerging", disable=not progress, leave=False)
    for _ in bar:
        logits = forward(merged_parameters(base, vectors, weights), next(batches))
        loss = sum(entropy(logits[task]) for task in tasks)
        loss.backward()
        total = loss.item()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total)
        bar.set_postfix(loss=f"{total:.4f}")
    return weights.detach(), losses


def _forward(request: AdaptRequest) -> Forward:
    """Each task's model, run with the given shared parameters."""
    bench = request.benchmark
    backbone = bench.backbone(dict(request.base))
    models = {}
    for task in bench.tasks:
        private = request.private.get(task)
        model = bench.task_model(task, backbone, dict(private) if private else None)
        models[task] = model.eval().requires_grad_(False)
    features_of = {task: _Features(model) for task, model in models.items()}

    def forward(params: dict[str, Tensor], step: Mapping[str, Batch]) -> dict[str, Tensor]:
        named = {f"model.backbone.{k}": v for k, v in params.items()}
        batches = [step[t] for t in bench.tasks]
        if _stackable(batches):  # one backbone pass for every task's inputs
            joint = [torch.cat(parts) for parts in zip(*batches, strict=True)]
            features = functional_call(features_of[bench.tasks[0]], named, (joint,))
            features = features.split([len(b[0]) for b in batches])
        else:
            features = [functional_call(features_of[t], named, (step[t],)) for t in bench.tasks]
        return {
            task: models[task].prediction_logits(feats, batch).float()
            for task, batch, feats in zip(bench.tasks, batches, features, strict=True)
        }

    return forward


class _Features(nn.Module):
    """A task model whose forward is its ``unlabeled_features`` (the part that reads the
    backbone)."""

    def __init__(self, model: TaskModel):
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> Any:
        return self.model.unlabeled_features(batch)


def _stackable(batches: Sequence[Batch]) -> bool:
    """Whether the tasks' batches concatenate: tensors of one shape past the batch dim."""
    if len({len(b) for b in batches}) != 1:
        return False
    return all(len({t.shape[1:] for t in parts}) == 1 for parts in zip(*batches, strict=True))


def adapt(
    request: AdaptRequest, steps: int, lr: float, init: float, batch_size: int, layerwise: bool
) -> AdaptResult:
    bench, vectors = request.benchmark, request.vectors
    tasks = vectors.tasks
    device = bench.device
    keys = [k for k in request.base if k in set(vectors.keys(tasks[0]))] if tasks else []
    base = {k: request.base[k].to(device, torch.float32) for k in keys}
    stacked = {k: vectors.stacked(k).to(device, torch.float32) for k in keys}
    loaders = {t: unlabeled_test_batches(bench, t, request.seed, batch_size) for t in tasks}
    seen = TrainStats()

    def batches() -> Iterator[dict[str, Batch]]:
        while True:
            step = {t: next(loaders[t]) for t in tasks}
            seen.steps += len(step)
            seen.examples += sum(len(b[0]) for b in step.values())
            yield step

    weights, _ = learn(
        _forward(request),
        base,
        stacked,
        tasks,
        batches(),
        steps,
        lr,
        init,
        layerwise,
        request.progress,
    )
    weights = weights.cpu()
    state = {k: weights if not layerwise else weights[:, i] for i, k in enumerate(keys)}
    return AdaptResult(state, seen)


def weighted_sum(
    base: Tensor, task_vectors: Sequence[Tensor], ctx: TensorContext, **learning: Any
) -> Tensor:
    """Σ_t λ_t τ_t with this parameter's learned coefficients, in task order (``learning``:
    the hyperparameters that ``adapt`` spent)."""
    weights = ctx.state[ctx.key].tolist()
    out = ctx.result("sum", task_vectors[0].shape)
    torch.mul(task_vectors[0], weights[0], out=out)
    for tau, w in zip(task_vectors[1:], weights[1:], strict=True):
        out.add_(tau, alpha=w)
    return out


def _task_wise(request: AdaptRequest, **hparams) -> AdaptResult:
    return adapt(request, layerwise=False, **hparams)


def _layer_wise(request: AdaptRequest, **hparams) -> AdaptResult:
    return adapt(request, layerwise=True, **hparams)


@hookimpl
def register_methods(register):
    for name, learner, what in (
        ("adamerging", _task_wise, "one coefficient per task"),
        ("adamerging_layer", _layer_wise, "one coefficient per task and parameter tensor"),
    ):
        register(
            MergeMethod(
                name=name,
                merge=weighted_sum,
                data="test-unlabeled",
                hparams=HPARAMS,
                adapt=learner,
                rowwise=True,
                stacked=False,
                description=f"AdaMerging: {what}, learned by entropy minimisation on "
                "unlabeled test inputs",
            )
        )
