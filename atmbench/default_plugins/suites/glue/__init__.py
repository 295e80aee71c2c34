"""``glue8`` (and ``glue7``, FusionBench's GPT-2 set): GLUE with Flan-T5, RoBERTa, GPT-2.

CoLA, MNLI, MRPC, QNLI, QQP, RTE, SST-2, STS-B from the hub's ``nyu-mll/glue``; GLUE's
validation sets are the test sets (FusionBench's protocol), validation is carved from
train with a fixed seed. Flan-T5 answers text-to-text with FusionBench's prompts and
label words; RoBERTa and GPT-2 classify with task-private heads. ``datasets``,
``transformers`` and ``huggingface_hub`` (the ``glue`` extra, with ``peft`` for LoRA
experts) are imported only when the suite is loaded.
"""

from __future__ import annotations

import functools

from atmbench.default_plugins.suites.glue.benchmark import VERSION, GlueBenchmark
from atmbench.default_plugins.suites.glue.download import download
from atmbench.default_plugins.suites.glue.models import MODELS
from atmbench.default_plugins.suites.glue.tasks import SUITES
from atmbench.hookspecs import hookimpl
from atmbench.suite import Suite

DESCRIPTIONS = {
    "glue8": "CoLA, MNLI, MRPC, QNLI, QQP, RTE, SST-2, STS-B; Flan-T5, RoBERTa, GPT-2; HF hub",
    "glue7": "glue8 without STS-B: FusionBench's GPT-2 GLUE set",
}


def suite(name: str) -> Suite:
    return Suite(
        name=name,
        tasks=SUITES[name],
        models=tuple(MODELS),
        load=functools.partial(GlueBenchmark, suite=name),
        description=DESCRIPTIONS[name],
        version=VERSION,
        any_model=True,
        download=functools.partial(download, name),
    )


@hookimpl
def register_suites(register):
    for name in SUITES:
        register(suite(name))
