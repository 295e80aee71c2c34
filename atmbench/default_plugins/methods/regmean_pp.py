"""RegMean++ (Nguyen et al., arXiv 2508.03121): RegMean whose Gram matrices see the merged model.

RegMean (``regmean``) solves W = (Σ_t G̃_t)⁻¹ Σ_t G̃_t W_t per linear map with each expert's
Gram of inputs on its own data. RegMean++ merges block by block instead: task t's training
examples pass through the **already merged** layers below block ℓ, then through task t's
fine-tuned block ℓ, whose linear maps record the Grams (so ``in_proj`` and ``c_fc`` see the
merged residual stream, ``out_proj`` and ``c_proj`` task t's own internals); block ℓ is
merged with them and produces the next block's inputs. It is learned with ``adapt``: the
Grams depend on the merged blocks below, hence on α.

Follows FusionBench 0.2.33 (``fusion_bench/method/regmean_plusplus/{regmean_plusplus.py,
clip_regmean_plusplus.py}``, ``config/method/regmean_plusplus/clip_regmean_plusplus.yaml``):
``statistics.EXAMPLES`` = 256 training examples per task, labels unused; Grams XᵀX / rows
over every token; the embeddings and the pre-LayerNorm are the mean of the experts; inside
each block the linear weights are RegMean's and every bias and LayerNorm the experts' mean;
α (``reduce_non_diagonal_ratio``) scales the Grams' off-diagonal entries, default 0.95,
searched on validation over the authors' grid {1.0, 0.95, ..., 0.1} thinned to
{0.1, 0.3, 0.5, 0.7, 0.9, 0.95} (each candidate is a pass of its own). A golden of
FusionBench's ``RegMeanAlgorithmPlusPlus.run`` on a tiny CLIP checks it
(``tests/data/golden/scripts/fusionbench_goldens.py``).

Departures: the system is solved with a float64 pseudo-inverse as in ``regmean`` (FusionBench
calls ``torch.inverse``; they agree when Σ G̃_t is invertible). FusionBench never writes
``post_layernorm``, which stays at θ0, and does not merge the visual projection (its experts
never trained it); here both (``ln_post``, ``proj``) are the experts' mean, like every
parameter outside the blocks.

Backbones: any whose suite names its residual blocks (``Benchmark.residual_blocks``: open_clip's
``transformer.resblocks``, a Llama's ``model.layers``, T5's encoder then decoder blocks,
RoBERTa's ``encoder.layer``). FusionBench's generic ``RegMeanAlgorithmPlusPlus`` asks a
subclass for the layers, the first layer's input and a way to run one layer, and only its
CLIP subclass exists (the authors' repository is CLIP-only too), which runs a layer on the
hidden states alone. Language-model blocks also need what their model passes them: rotary
position embeddings and the causal mask (Llama), the relative position bias and the
encoder's output (T5), the padding mask (RoBERTa). So instead of carrying hidden states from
block to block, task t's copy of block i is fed the very call the merged model makes to its
block i, captured with a forward pre-hook that then stops the forward. The inputs are the
same as the stream's (on digits8 the Grams are bitwise those of the stream version); the
price is a forward through the merged blocks below i for each block, L(L+1)/2 block passes
per example instead of 2L. For language models every token position is a Gram row (prompt,
answer and trailing padding alike, as in ``regmean``'s ``gram`` statistic), and the parts
outside the blocks (embeddings, final norm, a language-model head) are the experts' mean,
as FusionBench does outside CLIP's blocks: only the blocks' linear maps get Grams (GPT-2's
``Conv1D`` too, whose rows meet the input, as ``regmean``'s ``gram_rows``).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from atmbench import statistics
from atmbench.adapt import AdaptRequest, AdaptResult
from atmbench.default_plugins.methods.regmean import regmean
from atmbench.hookspecs import hookimpl
from atmbench.hparams import HParam
from atmbench.method import MergeMethod, TensorContext
from atmbench.suite import residual_blocks

ALPHA = HParam(
    "alpha",
    default=0.95,
    search=(0.1, 0.3, 0.5, 0.7, 0.9, 0.95),
    low=0.0,
    high=1.0,
    help="scale of the Gram matrices' off-diagonal entries (reduce_non_diagonal_ratio)",
)


class _Captured(Exception):
    """Stops the merged model's forward once the block under merge has been fed."""


def merged_block(
    prefix: str,
    base: Mapping[str, Tensor],
    experts: Sequence[Mapping[str, Tensor]],
    grams: Mapping[str, Mapping[str, Tensor]],
    alpha: float,
) -> dict[str, Tensor]:
    """The merged parameters (θ0 + Δ) of the keys under ``prefix``: RegMean where a Gram
    stack [T, in, in] is known (``grams[key]``: ``{"gram": ...}`` or ``{"gram_rows": ...}``,
    as ``regmean`` reads them), the experts' mean elsewhere."""
    out = {}
    for key in (k for k in base if k.startswith(prefix)):
        vectors = torch.stack([e[key].float() - base[key].float() for e in experts])
        stats = dict(grams.get(key, {}))
        delta = regmean(base[key].float(), vectors, TensorContext(key, (), stats=stats), alpha)
        out[key] = base[key].float() + delta
    return out


@torch.no_grad()
def layerwise_grams(
    model: nn.Module,
    blocks: Sequence[str],
    base: Mapping[str, Tensor],
    experts: Sequence[Mapping[str, Tensor]],
    batches: Sequence[Iterable[Any]],
    run: Callable[[nn.Module, Any], None],
    alpha: float,
) -> dict[str, dict[str, Tensor]]:
    """The Grams [T, in, in] of every block's linear weights, RegMean++'s way: per
    parameter, ``{"gram": ...}`` (y = x Pᵀ) or ``{"gram_rows": ...}`` (y = x P, GPT-2).

    ``model`` holds the experts' mean (the merged embeddings); its ``blocks`` (module
    names, in forward order) are replaced by the merged ones as they are decided.
    ``batches[t]`` are task t's inputs, which ``run(model, batch)`` feeds through the model.
    Task t's copy of block i is fed exactly the call the merged model makes to its block i
    (a forward pre-hook hands it the same arguments, then stops the forward): the hidden
    states of the merged blocks below, and whatever else the model passes its blocks.
    """
    modules = dict(model.named_modules())
    grams: dict[str, dict[str, Tensor]] = {}
    for name in blocks:
        block, prefix = modules[name], f"{name}."
        per_task = []
        for expert, task_batches in zip(experts, batches, strict=True):
            tuned = copy.deepcopy(block)
            tuned.load_state_dict(
                {k[len(prefix) :]: v for k, v in expert.items() if k.startswith(prefix)}
            )

            def feed(_module, args, kwargs, tuned=tuned):
                tuned(*args, **kwargs)
                raise _Captured

            with statistics.recording_grams(tuned, prefix) as (columns, rows):
                handle = block.register_forward_pre_hook(feed, with_kwargs=True)
                try:
                    for batch in task_batches:
                        try:
                            run(model, batch)
                        except _Captured:
                            pass
                finally:
                    handle.remove()
            per_task.append({"gram": columns.grams(), "gram_rows": rows.grams()})
        for kind, first in per_task[0].items():
            for key in first:
                grams[key] = {kind: torch.stack([g[kind][key] for g in per_task])}
        merged = merged_block(prefix, base, experts, grams, alpha)
        block.load_state_dict({k[len(prefix) :]: v for k, v in merged.items()})
    return grams


def adapt(request: AdaptRequest, alpha: float) -> AdaptResult:
    bench, vectors = request.benchmark, request.vectors
    tasks = vectors.tasks
    if not tasks:
        return AdaptResult({})
    base = {k: v.float() for k, v in request.base.items() if v.is_floating_point()}
    experts = [{k: base[k] + vectors.get(t, k).float() for k in base} for t in tasks]
    mean = {k: torch.stack([e[k] for e in experts]).mean(0) for k in base}
    model = bench.backbone(
        {**request.base, **{k: v.to(request.base[k].dtype) for k, v in mean.items()}}
    )
    model.eval()
    blocks = residual_blocks(bench, model)
    heads = {t: bench.task_model(t, model) for t in tasks}
    batches = []
    for task in tasks:
        loader = statistics.examples(bench, task, request.seed, statistics.GRAM_BATCH)
        batches.append([(task, [x.to(bench.device) for x in batch]) for batch in loader])

    def run(_model: nn.Module, item: tuple[str, list[Tensor]]) -> None:
        task, batch = item
        heads[task].features(batch)

    device_base = {k: v.to(bench.device) for k, v in base.items()}
    device_experts = [{k: v.to(bench.device) for k, v in e.items()} for e in experts]
    grams = layerwise_grams(model, blocks, device_base, device_experts, batches, run, alpha)
    return AdaptResult({k: {kind: v.cpu() for kind, v in s.items()} for k, s in grams.items()})


def regmean_pp(base: Tensor, task_vectors: Tensor, ctx: TensorContext, alpha: float) -> Tensor:
    """RegMean with the Grams learned block by block, the experts' mean elsewhere."""
    stats = dict(ctx.state.get(ctx.key, {}))
    return regmean(base, task_vectors, dataclasses.replace(ctx, stats=stats), alpha)


@hookimpl
def register_methods(register):
    register(
        MergeMethod(
            name="regmean_pp",
            merge=regmean_pp,
            data="train",
            hparams=(ALPHA,),
            adapt=adapt,
            description="RegMean++: RegMean with each block's Grams taken on the merged "
            "layers below it",
        )
    )
