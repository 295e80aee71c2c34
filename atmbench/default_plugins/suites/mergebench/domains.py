"""MergeBench's five domains: their experts' training data and their lm-eval test tasks.

Facts from uiuctml/MergeBench (``merging/taskloader.py``, ``scripts/evaluate.sh``); see the
package docstring for where our evaluation differs from MergeBench's.
"""

from __future__ import annotations

from dataclasses import dataclass

from atmbench.finetune import Recipe


@dataclass(frozen=True)
class Domain:
    name: str
    data: str
    """Hub dataset of the domain's instruction data (its ``train`` split)."""
    instruction: str
    response: str
    extra: str | None
    """Columns of an example: the instruction, the response, an optional extra input."""
    lr: float
    evals: tuple[tuple[str, str | None], ...]
    """lm-eval tasks and the result key scored (``None``: the task's first metric)."""


def _okapi(kind: str) -> tuple[tuple[str, str], ...]:
    return tuple((f"{kind}_{lang}", "acc,none") for lang in ("fr", "es", "de", "ru"))


DOMAINS: dict[str, Domain] = {
    "instruction": Domain(
        "instruction",
        "MergeBench/instruction_val",
        "instruction",
        "output",
        "input",
        1e-5,
        (("ifeval", "prompt_level_strict_acc,none"),),
    ),
    "math": Domain(
        "math",
        "MergeBench/math_val",
        "query",
        "response",
        None,
        1e-5,
        (("gsm8k_cot", "exact_match,strict-match"),),
    ),
    "coding": Domain(
        "coding",
        "MergeBench/coding_val",
        "instruction",
        "response",
        "input",
        1e-5,
        (("humaneval_plus", None), ("mbpp_plus", None)),
    ),
    "safety": Domain(
        "safety",
        "MergeBench/safety_val",
        "prompt",
        "response",
        None,
        1e-5,
        (("toxigen", "acc,none"),),
    ),
    "multilingual": Domain(
        "multilingual",
        "MergeBench/multilingual_val",
        "inputs",
        "targets",
        None,
        2e-5,
        _okapi("m_mmlu") + _okapi("arc") + _okapi("hellaswag"),
    ),
}


def recipe(domain: Domain) -> Recipe:
    """MergeBench's recipe for its data-dependent mergers on this data (``SFTConfig``):
    one epoch, AdamW, cosine decay, batch 1, bf16, gradient checkpointing; no weight
    decay and clipping at 1.0 are the ``transformers`` ``Trainer`` defaults it relies on."""
    return Recipe(
        epochs=1, lr=domain.lr, batch_size=1, weight_decay=0.0, schedule="cosine", grad_clip=1.0
    )


PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{extra}### Response:\n"
)
"""The Alpaca-style prompt MergeBench formats its data with (the same header with or
without an input; an input adds a ``### Input:`` section)."""


def prompt(domain: Domain, row: dict) -> str:
    extra = row.get(domain.extra) if domain.extra else None
    section = f"### Input:\n{extra}\n\n" if extra else ""
    return PROMPT.format(instruction=row[domain.instruction], extra=section)
