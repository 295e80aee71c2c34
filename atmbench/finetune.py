"""Fine-tuning a task model under its task's loss: the one training loop of the project.

Experts, ATM's tuning steps and the multi-task reference all train through
:func:`finetune`, so "equal compute" comparisons count the same optimizer steps.
"""

from __future__ import annotations

import math
import multiprocessing
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

# Recipe belongs to the suite contract (a suite says how its experts are fine-tuned);
# ``from atmbench.finetune import Recipe`` keeps working.
from atmbench.suite import Recipe, TaskModel


@dataclass
class TrainStats:
    """Compute spent: optimizer steps and examples forwarded and back-propagated."""

    steps: int = 0
    examples: int = 0

    def __iadd__(self, other: TrainStats) -> TrainStats:
        self.steps += other.steps
        self.examples += other.examples
        return self


def _lr_lambda(recipe: Recipe, total: int):
    def factor(step: int) -> float:
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        if recipe.schedule == "constant":
            return 1.0
        progress = (step - recipe.warmup_steps) / max(1, total - recipe.warmup_steps)
        if recipe.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def loader_workers(requested: int) -> int:
    """``requested`` loader processes, or 0 inside a daemonic process (a multi-gpu worker),
    which may not start any."""
    return 0 if multiprocessing.current_process().daemon else requested


def _batches(dataset: Dataset, recipe: Recipe, seed: int, device: torch.device):
    """Endless shuffled batches moved to ``device``; the order is fixed by ``seed`` alone.

    A dataset with its own ``device_batches`` (the vision suites' cached images) makes
    whole batches on the device, drawing order and augmentation from the same generator.
    """
    generator = torch.Generator().manual_seed(seed)
    drop_last = len(dataset) > recipe.batch_size
    own = getattr(dataset, "device_batches", None)
    if own is not None:
        while True:
            yield from own(recipe.batch_size, device, generator=generator, drop_last=drop_last)
    loader = DataLoader(
        dataset,
        batch_size=recipe.batch_size,
        shuffle=True,
        generator=generator,
        num_workers=loader_workers(recipe.num_workers),
        pin_memory=device.type == "cuda",
        collate_fn=getattr(dataset, "collate", None),
        drop_last=drop_last,
    )
    while True:
        for batch in loader:
            yield [t.to(device, non_blocking=True) for t in batch]


LossFn = Callable[[nn.Module, list[Tensor]], Tensor]
"""``loss_fn(module, batch) -> mean loss``; ``len(batch[0])`` is the number of examples."""


def train(
    module: nn.Module,
    loss_fn: LossFn,
    dataset: Dataset,
    recipe: Recipe,
    seed: int,
    steps: int,
    desc: str = "train",
    progress: bool = True,
) -> TrainStats:
    """The optimisation loop every kind of training shares: AdamW, schedule, clipping, AMP.

    Trains every parameter of ``module`` that requires a gradient: a task model's shared
    backbone and its private modules, never its frozen heads.
    """
    device = next(module.parameters()).device
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(recipe, steps))
    stats = TrainStats()
    torch.manual_seed(seed)
    batches = _batches(dataset, recipe, seed, device)
    for _ in tqdm(range(steps), desc=desc, leave=False, disable=not progress):
        batch = next(batches)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(module, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip:
            nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        optimizer.step()
        scheduler.step()
        stats.steps += 1
        stats.examples += len(batch[0])
    module.eval()
    return stats


def finetune(
    model: TaskModel,
    dataset: Dataset,
    recipe: Recipe,
    seed: int,
    epochs: float | None = None,
    desc: str = "fine-tune",
    progress: bool = True,
) -> TrainStats:
    """Train ``model`` (backbone and private modules) in place under its task's loss.

    ``epochs`` overrides the recipe's (ATM spends the budget in slices). A fresh AdamW
    is made each call, as in ATM's official code.
    """

    def loss_fn(module: TaskModel, batch: list[Tensor]) -> Tensor:
        return module.loss(batch)

    steps = recipe.steps(len(dataset), epochs)
    return train(model, loss_fn, dataset, recipe, seed, steps, desc, progress)


def task_vector(tuned: dict, base: dict) -> dict:
    """τ = θ_t − θ0 in float32, tensor by tensor, for the floating-point parameters.

    Integer and bool buffers (position ids, ``num_batches_tracked``) are no task vector: they
    are passed through as the expert's values, never made floats (merges keep the base's
    value for them). Keys the base lacks are passed through unchanged too, so that the
    merge's key check can name them instead of failing here with a bare KeyError.
    """
    return {
        k: v.float() - base[k].float() if k in base and v.is_floating_point() else v
        for k, v in tuned.items()
    }


def state_on_cpu(module: nn.Module) -> dict:
    """The module's state on the CPU, each tied parameter once, under its first name.

    A parameter registered under several names (T5's ``shared`` embedding is also
    ``encoder.embed_tokens`` and ``decoder.embed_tokens``) is one tensor: stored, merged
    and counted once, or model-wide thresholds (TIES' top-k) would weigh it thrice.
    """
    every = dict(module.named_parameters(remove_duplicate=False))
    aliases = set(every) - set(dict(module.named_parameters()))
    return {
        k: v.detach().to("cpu", copy=True)
        for k, v in module.state_dict().items()
        if k not in aliases
    }
