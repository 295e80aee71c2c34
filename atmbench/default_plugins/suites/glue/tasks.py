"""The GLUE tasks: hub configs, text columns, label words and metrics.

Data: the hub's ``nyu-mll/glue`` (what ``load_dataset("glue", name)`` resolves to, the
copy FusionBench loads). Test sets are GLUE's validation splits (``validation_matched``
for MNLI), FusionBench's protocol (its ``config/taskpool/flan-t5_glue_text_generation.yaml``
and ``gpt-2_glue.yaml``); GLUE's own test labels are hidden.

Label words and prompts are FusionBench's text-to-text templates
(``fusion_bench/tasks/flan_t5_text_generation/glue_prompt_templates.py``, typos included,
since its published Flan-T5 experts were trained on them). STS-B's target is the score
formatted ``{:.1f}`` (one decimal, e.g. ``3.8``); a generated answer that is no number
scores 0.0, as FusionBench's ``glue_evaluation.evaluate_spearman_rho`` parses it.

Metrics are GLUE's: Matthews correlation for CoLA, Spearman for STS-B, accuracy for the
rest (exact match of the label word for text-to-text models). FusionBench reports CoLA
as accuracy: its CoLA figures are not comparable with ours.
"""

from __future__ import annotations

from dataclasses import dataclass

HUB_PATH = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueTask:
    name: str
    columns: tuple[str, ...]
    """Text columns, in the order a sentence-pair tokenizer takes them."""
    labels: int
    """Classes; 1 for STS-B (a regression score from 0 to 5)."""
    prompt: str
    words: tuple[str, ...]
    """Label word of class i (text-to-text); empty for STS-B, whose answer is the score."""
    metric: str
    test_split: str = "validation"

    @property
    def regression(self) -> bool:
        return self.labels == 1

    def answer(self, label: float) -> str:
        """The target text of a label: its word, or STS-B's score to one decimal."""
        return f"{label:.1f}" if self.regression else self.words[int(label)]


_TASKS = (
    GlueTask(
        "cola",
        ("sentence",),
        2,
        'Indicate if the following sentence is grammatically correct or not: "{sentence}". '
        "Answere 'acceptable' or 'unacceptable'.",
        ("unacceptable", "acceptable"),
        "matthews",
    ),
    GlueTask(
        "mnli",
        ("premise", "hypothesis"),
        3,
        "Does the premise: '{premise}' logically imply, contradict, or is neutral to the "
        "hypothesis: '{hypothesis}'? Answere with 'entailment', 'contradiction', or 'neutral'.",
        ("entailment", "neutral", "contradiction"),
        "accuracy",
        test_split="validation_matched",
    ),
    GlueTask(
        "mrpc",
        ("sentence1", "sentence2"),
        2,
        "Are the following sentences '{sentence1}' and '{sentence2}' conveying the same "
        "meaning? Answere with 'yes' or 'no'.",
        ("no", "yes"),
        "accuracy",
    ),
    GlueTask(
        "qnli",
        ("question", "sentence"),
        2,
        "Given the context: '{sentence}', does the question '{question}' have an answer "
        "based on the information provided? Answer with 'yes' or 'no'.",
        ("yes", "no"),
        "accuracy",
    ),
    GlueTask(
        "qqp",
        ("question1", "question2"),
        2,
        "Do the questions '{question1}' and '{question2}' have the same intent? Answere "
        "with 'yes' or 'no'.",
        ("no", "yes"),
        "accuracy",
    ),
    GlueTask(
        "rte",
        ("sentence1", "sentence2"),
        2,
        "Does the text: '{sentence1}' entail that '{sentence2}' is true? Provide 'yes' or 'no'.",
        ("yes", "no"),
        "accuracy",
    ),
    GlueTask(
        "sst2",
        ("sentence",),
        2,
        "Given the sentence '{sentence}', determine the sentiment. Is it positive or negative?",
        ("negative", "positive"),
        "accuracy",
    ),
    GlueTask(
        "stsb",
        ("sentence1", "sentence2"),
        1,
        "Consider the sentences '{sentence1}' and '{sentence2}'. On a scale from 1 "
        "(completely different) to 5 (completely similar), rate the similarity.",
        (),
        "spearman",
    ),
)

TASKS: dict[str, GlueTask] = {t.name: t for t in _TASKS}
SUITES: dict[str, tuple[str, ...]] = {
    "glue8": tuple(TASKS),
    "glue7": tuple(t for t in TASKS if t != "stsb"),
}
"""``glue7`` is FusionBench's GPT-2 set: its published GPT-2 experts omit STS-B."""
