"""``mergebench5``: MergeBench's five domains on its LLMs, scored by lm-evaluation-harness.

MergeBench (uiuctml/MergeBench, NeurIPS 2025 Datasets and Benchmarks) merges experts of
Llama-3.2-3B, Llama-3.1-8B, gemma-2-2b and gemma-2-9b (and their instruct variants)
fine-tuned on five domains; this suite's tasks are those domains: ``instruction``,
``math``, ``coding``, ``safety``, ``multilingual``.

* Models: the eight bases, bf16 throughout; or a local ``transformers`` causal-LM folder.
* Experts: ``--experts hub:MergeBench`` imports its published ones
  (``MergeBench/<base>_<domain>``, :mod:`.experts`); a folder of ``<domain>/`` checkpoints
  works too. Fine-tuning our own (no ``--experts``) uses the domain data below and is a
  one-epoch study, not MergeBench's expert training (full fine-tunes on the domains'
  large training sets, e.g. Magicoder-Evol-Instruct-110K for 2 epochs).
* Train and validation data: ``MergeBench/<domain>_val`` (the data its data-dependent
  mergers read), in its Alpaca-style prompt, 10% held out with a fixed seed to validate
  on. Validation scores are teacher-forced next-token accuracy on the responses (cheap
  enough to select hyperparameters on); ATM and the other refiners tune with the
  causal-LM loss on the response tokens, batch 1, MergeBench's learning rates, float32
  master weights under bf16 autocast, gradient checkpointing; so do our own experts and
  the ``mtl`` row (full fine-tunes: on 8B and 9B models these need more memory than one
  80 GB GPU has; import the experts and use ``--no-mtl``). No LoRA.
* Test scores: lm-evaluation-harness in-process (``lm_eval.simple_evaluate`` on an
  ``HFLM`` wrapping the merged model as it is in memory), each task with its harness
  defaults like MergeBench's ``scripts/evaluate.sh``; a domain's score is the mean of its
  tasks', in percent (stored as ``score``, each task's score beside it):

  - instruction: ``ifeval``, prompt-level strict accuracy (as MergeBench);
  - math: ``gsm8k_cot``, 8-shot exact match, strict match (as MergeBench);
  - multilingual: ``m_mmlu``, ``arc`` and ``hellaswag`` in fr, es, de, ru, accuracy
    (as MergeBench; it does not say whether it reports ``acc`` or ``acc_norm``);
  - coding: **differs**. MergeBench runs bigcode-evaluation-harness on HumanEval+ and
    MBPP+ with 10 samples at temperature 0.2 (pass@1 and pass@10); lm-eval's
    ``humaneval_plus`` (0-shot) and ``mbpp_plus`` (3-shot) decode greedily, pass@1. Both
    execute the generated code (``confirm_run_unsafe_code``, ``HF_ALLOW_CODE_EVAL=1``).
  - safety: **differs**. MergeBench's safety-eval judges the model's answers to
    WildGuardTest, HarmBench, XSTest and Do-Anything-Now prompts with classifier models
    (harm and attack-success rates, refusal accuracy); lm-eval has none of these. The
    closest lm-eval task is ``toxigen`` (accuracy at telling hateful statements from
    benign ones, 0-shot): it measures recognising harm, not refusing it.

  MergeBench does not publish how it aggregates (raw or normalised by each expert);
  we rank the raw mean over domains like every other suite.

Needs ``pip install -e .[llm]``, the hub (the Llama and Gemma weights are gated: log in
with ``hf auth login``) and GPUs; ``atmbench download --suite mergebench5 --model
M`` fetches weights, domain data and the lm-eval tasks' data ahead of a run.
"""

from __future__ import annotations

from pathlib import Path

import torch

from atmbench.default_plugins.suites.mergebench.benchmark import (
    MODELS,
    SUITE,
    VERSION,
    MergeBenchmark,
)
from atmbench.default_plugins.suites.mergebench.domains import DOMAINS
from atmbench.hookspecs import hookimpl
from atmbench.suite import Suite


def download(model: str, home: Path) -> list[str]:
    """Weights, tokenizer and domain data (loading the benchmark once), then every
    lm-eval task's data (loading each task once)."""
    from atmbench.default_plugins.suites.mergebench import lmeval
    from atmbench.default_plugins.suites.vision.download import fetch_ahead

    tasks = fetch_ahead(
        SUITE, model, home, lambda: MergeBenchmark(model, home, torch.device("cpu"))
    )
    lmeval.fetch([name for d in DOMAINS.values() for name, _ in d.evals])
    return tasks


@hookimpl
def register_suites(register):
    register(
        Suite(
            name=SUITE,
            tasks=tuple(DOMAINS),
            models=tuple(MODELS),
            load=MergeBenchmark,
            description="MergeBench: instruction, math, coding, safety, multilingual; "
            "Llama-3, Gemma-2; lm-eval; HF hub, GPUs",
            version=VERSION,
            any_model=True,
            download=download,
            metric="lm-eval score",
        )
    )
