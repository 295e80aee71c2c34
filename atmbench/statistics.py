"""Data statistics that data-using merge methods declare in ``MergeMethod.needs``.

The runner computes them per task on that task's expert and hands them to the method,
stacked over tasks, parameter by parameter: methods stay pure tensor functions.
A statistic is ``fn(bench, model, task, seed) -> {parameter name: tensor}`` for a task
model; its names are those of the shared parameters (``model.backbone``): private ones
are never merged.

All statistics read the same ``EXAMPLES`` training examples of the task, picked by a
generator seeded from (cell seed, task), so they are reproducible and never touch
validation or test data.

- ``fisher``: the diagonal of the model's Fisher information under the task's logits,
  F = E_x E_{y~p(y|x)} (∂ log p(y|x)/∂θ)², the model ("true") Fisher of Matena & Raffel,
  not the empirical one with the data's labels. The inner expectation is estimated with one
  label per example drawn from p(y|x) by a seeded generator (their code's ``y_samples``
  option): the exact sum over classes costs one backward pass per class and example,
  measured at 200 s per task for vit-micro on a busy 2-core machine, against a few
  seconds for the vectorised one-label estimate. Squared gradients
  are per example (FusionBench instead squares the gradient of a batch sum of √p·log p,
  which adds cross terms between examples and classes). For a language model every scored
  position (answer token) draws its own label and an example's log-likelihood sums them.
- ``gram``: for every weight applied as y = x Pᵀ (``nn.Linear``; the packed
  ``in_proj_weight`` of ``nn.MultiheadAttention``, whose q, k and v rows all see the same
  input in self-attention; its ``out_proj``, fed the attention context), the Gram of its
  inputs XᵀX / rows, every token a row, as RegMean's official code and FusionBench
  normalise it. ``nn.MultiheadAttention`` applies ``out_proj`` without calling the
  submodule, so its input is recomputed from the attention inputs.
- ``gram_rows``: the same for weights applied as y = x P, whose rows meet the input: open_clip
  ``VisionTransformer.proj``, applied to the pooled features, and GPT-2's ``Conv1D`` maps
  (``transformers``: weight [in, out], y = x P + b; FusionBench's ``RegMeanAlgorithmForGPT2``
  takes their Grams with ``weight_transpose: false``). Kept separate from ``gram`` because a
  square Gram cannot say on which side it belongs.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, Subset

from atmbench.seeds import derive
from atmbench.suite import IGNORE, Benchmark, TaskModel

if TYPE_CHECKING:  # open_clip and torchvision take seconds to import: only where Grams are
    from open_clip.transformer import VisionTransformer

Statistic = Callable[[Benchmark, TaskModel, str, int], dict[str, Tensor]]

EXAMPLES = 256
"""Training examples per task for every statistic (FusionBench's default for both methods)."""
GRAM_BATCH = 64
FISHER_BATCH = 64
FISHER_FLOATS = 1 << 28
"""Per-example gradients held at once (1 GiB of float32): bounds the Fisher batch size."""


def examples(bench: Benchmark, task: str, seed: int, batch_size: int) -> DataLoader:
    """The task's ``EXAMPLES`` statistic examples (fewer if its train split is smaller)."""
    dataset = bench.dataset(task, "train")
    generator = torch.Generator().manual_seed(derive(seed, "statistics", task))
    order = torch.randperm(len(dataset), generator=generator)[:EXAMPLES]
    collate = getattr(dataset, "collate", None)
    subset = Subset(dataset, order.tolist())
    return DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=collate)


def fisher_diagonal(model: TaskModel, batch: list[Tensor], targets: Tensor) -> dict[str, Tensor]:
    """Σ over examples of (∂ log p(y|x)/∂θ)², per trainable shared parameter.

    ``targets`` are one-hot labels of the scored positions ([B, classes], or [B, positions,
    classes] with zero rows where nothing is scored). Per-example gradients come from one
    vectorised ``torch.func`` pass, not a Python loop.
    """
    params = {n: p.detach() for n, p in model.backbone.named_parameters() if p.requires_grad}

    def log_likelihood(values: dict[str, Tensor], items: list[Tensor], target: Tensor) -> Tensor:
        named = {f"backbone.{n}": v for n, v in values.items()}
        logits, _ = functional_call(model, named, ([t[None] for t in items],))
        return (torch.log_softmax(logits.float(), -1)[0] * target).sum()

    with warnings.catch_warnings():  # "no batching rule for attention": slower, still exact
        warnings.filterwarnings("ignore", message=".*batching rule.*", category=UserWarning)
        grads = vmap(grad(log_likelihood), in_dims=(None, 0, 0))(params, batch, targets)
    return {n: g.float().square().sum(0) for n, g in grads.items()}


def sampled_targets(logits: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor:
    """One-hot labels drawn from the model's own p(y|x) at every scored position."""
    probs = torch.softmax(logits.float(), -1).cpu()
    if probs.dim() == 2:
        drawn = torch.multinomial(probs, 1, generator=generator)[:, 0]
        return nn.functional.one_hot(drawn, probs.shape[-1]).float()
    flat = probs.reshape(-1, probs.shape[-1])
    drawn = torch.multinomial(flat, 1, generator=generator)[:, 0].reshape(probs.shape[:-1])
    scored = (labels.cpu() != IGNORE).unsqueeze(-1)
    return nn.functional.one_hot(drawn, probs.shape[-1]).float() * scored


def fisher(bench: Benchmark, model: TaskModel, task: str, seed: int) -> dict[str, Tensor]:
    """Mean over the examples, each with one label drawn from the model's own p(y|x)."""
    model.eval()
    size = sum(p.numel() for p in model.backbone.parameters())
    batch_size = max(1, min(FISHER_BATCH, FISHER_FLOATS // size))
    generator = torch.Generator().manual_seed(derive(seed, "fisher", task))
    total: dict[str, Tensor] = {}
    count = 0
    for batch in examples(bench, task, seed, batch_size=batch_size):
        batch = [t.to(bench.device) for t in batch]
        with torch.no_grad():
            logits, labels = model(batch)
        targets = sampled_targets(logits, labels, generator).to(bench.device)
        for name, value in fisher_diagonal(model, batch, targets).items():
            total[name] = total[name] + value if name in total else value
        count += len(batch[0])
    return {name: (value / count).cpu() for name, value in total.items()}


class _GramRecorder:
    """Running Σ XᵀX and row counts per parameter name."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.rows: dict[str, int] = {}

    def add(self, key: str, inputs: Tensor) -> None:
        x = inputs.detach().float().reshape(-1, inputs.shape[-1])
        self.sums[key] = self.sums.get(key, 0) + x.T @ x
        self.rows[key] = self.rows.get(key, 0) + len(x)

    def grams(self) -> dict[str, Tensor]:
        return {key: (s / self.rows[key]).cpu() for key, s in self.sums.items()}


def attention_context(module: nn.MultiheadAttention, x: Tensor) -> Tensor:
    """What ``module`` feeds its ``out_proj`` for self-attention on ``x`` (no mask, eval)."""
    batched = x if x.dim() == 3 else x.unsqueeze(1 if not module.batch_first else 0)
    if not module.batch_first:
        batched = batched.transpose(0, 1)
    n, length, width = batched.shape
    heads = module.num_heads
    q, k, v = nn.functional.linear(batched, module.in_proj_weight, module.in_proj_bias).chunk(3, -1)

    def split(t: Tensor) -> Tensor:
        return t.reshape(n, length, heads, width // heads).transpose(1, 2)

    context = nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
    return context.transpose(1, 2).reshape(n, length, width)


def _attention_hook(prefix: str, recorder: _GramRecorder):
    def hook(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> None:
        names = ("query", "key", "value")
        query, key, value = [*args, *(kwargs.get(n) for n in names[len(args) :])][:3]
        masked = any(kwargs.get(m) is not None for m in ("attn_mask", "key_padding_mask"))
        if key is not query or value is not query or masked:
            raise ValueError(
                f"Gram statistics support unmasked self-attention only; {prefix!r} got "
                "different query/key/value or a mask"
            )
        recorder.add(prefix + "in_proj_weight", query)
        recorder.add(prefix + "out_proj.weight", attention_context(module, query))

    return hook


@contextmanager
def _recording_pool(vit: VisionTransformer, recorder: _GramRecorder, key: str) -> Iterator[None]:
    """Record the pooled features that ``vit`` multiplies by ``proj`` (x @ proj)."""
    pool = vit._pool

    def recording(x: Tensor) -> tuple[Tensor, Tensor]:
        pooled, tokens = pool(x)
        recorder.add(key, pooled)
        return pooled, tokens

    vit._pool = recording
    try:
        yield
    finally:
        del vit._pool


@contextmanager
def recording_grams(
    root: nn.Module, prefix: str = ""
) -> Iterator[tuple[_GramRecorder, _GramRecorder]]:
    """Hooks on ``root``'s weights that record their input Grams while forwards run:
    ``(columns, rows)`` recorders for ``gram`` and ``gram_rows``, keyed ``prefix`` + the
    parameter's name in ``root``; read them with ``.grams()``."""
    from open_clip.transformer import VisionTransformer

    columns, rows = _GramRecorder(), _GramRecorder()
    # a model holding GPT-2's Conv1D has imported it; importing transformers here costs seconds
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    modules = dict(root.named_modules())
    attention = {n: m for n, m in modules.items() if isinstance(m, nn.MultiheadAttention)}
    for name, module in attention.items():
        if module.in_proj_weight is None or module.bias_k is not None or module.add_zero_attn:
            raise ValueError(f"Gram statistics: unsupported attention layout in {name!r}")
    inside_attention = {id(m.out_proj) for m in attention.values()}
    with ExitStack() as stack:
        for name, module in modules.items():
            path = prefix + (f"{name}." if name else "")
            if isinstance(module, nn.MultiheadAttention):
                hook = _attention_hook(path, columns)
                stack.enter_context(module.register_forward_pre_hook(hook, with_kwargs=True))
            elif isinstance(module, nn.Linear) and id(module) not in inside_attention:
                key = path + "weight"
                hook = lambda _m, args, key=key: columns.add(key, args[0])  # noqa: E731
                stack.enter_context(module.register_forward_pre_hook(hook))
            elif conv1d is not None and isinstance(module, conv1d):
                key = path + "weight"
                hook = lambda _m, args, key=key: rows.add(key, args[0])  # noqa: E731
                stack.enter_context(module.register_forward_pre_hook(hook))
            elif isinstance(module, VisionTransformer) and module.proj is not None:
                stack.enter_context(_recording_pool(module, rows, path + "proj"))
        yield columns, rows


@torch.no_grad()
def _grams(
    bench: Benchmark, model: TaskModel, task: str, seed: int
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(``gram``, ``gram_rows``) of the shared weights on the task's statistic examples."""
    with recording_grams(model.backbone) as (columns, rows):
        model.eval()
        for batch in examples(bench, task, seed, batch_size=GRAM_BATCH):
            model([t.to(bench.device) for t in batch])
    return columns.grams(), rows.grams()


def gram(bench: Benchmark, model: TaskModel, task: str, seed: int) -> dict[str, Tensor]:
    return _grams(bench, model, task, seed)[0]


def gram_rows(bench: Benchmark, model: TaskModel, task: str, seed: int) -> dict[str, Tensor]:
    return _grams(bench, model, task, seed)[1]


STATISTICS: dict[str, Statistic] = {"fisher": fisher, "gram": gram, "gram_rows": gram_rows}


def compute(
    name: str, bench: Benchmark, model: TaskModel, task: str, seed: int
) -> dict[str, Tensor]:
    if name not in STATISTICS:
        valid = ", ".join(sorted(STATISTICS)) or "none"
        raise ValueError(f"unknown data statistic {name!r} (valid: {valid})")
    return STATISTICS[name](bench, model, task, seed)
