"""A GLUE suite loaded for one model: θ0, tokenized datasets, task models, recipes."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from atmbench.cache import key_hash
from atmbench.default_plugins.suites.glue import data
from atmbench.default_plugins.suites.glue import models as m
from atmbench.default_plugins.suites.glue.tasks import SUITES, TASKS
from atmbench.default_plugins.suites.vision.data import validation_split
from atmbench.finetune import Recipe
from atmbench.metrics import Metric
from atmbench.suite import IGNORE, TaskModel, blocks_of

VERSION = "1"
"""Bump when data handling, prompts, heads or recipes change: it invalidates caches."""


def fetch_command(suite: str, model: str) -> str:
    return f"atmbench download --suite {suite} --model {model}"


class GlueBenchmark:
    """One GLUE suite for one model on one device.

    ``tasks``, ``recipes`` and ``max_length`` exist for tests and smaller studies.
    """

    def __init__(
        self,
        model: str,
        home: Path,
        device: torch.device,
        *,
        suite: str,
        tasks: Sequence[str] | None = None,
        recipes: Mapping[str, Recipe] | None = None,
        max_length: int = m.MAX_LENGTH,
    ):
        self.suite, self.model, self.device, self.home = suite, model, device, Path(home)
        self.num_workers = 0
        self.spec = m.parse_model(model)
        self.tasks = tuple(tasks or SUITES[suite])
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown GLUE tasks {unknown} (valid: {', '.join(TASKS)})")
        self._recipes = {t: m.RECIPE for t in self.tasks} | dict(recipes or {})
        self.max_length = max_length
        command = fetch_command(suite, model)
        data.ensure(suite, self.home, self.tasks, command)
        pretrained = m.load_pretrained(self.spec, self.home, command)
        self._template, self.tokenizer, self.config = (
            pretrained.backbone,
            pretrained.tokenizer,
            pretrained.config,
        )
        self._base = m.canonical_state(self._template)
        self._rows = {t: data.load(self.home, t) for t in self.tasks}
        self._split = {t: validation_split(len(self._rows[t]["train"])) for t in self.tasks}
        pad = self.tokenizer.pad_token_id
        self._collate = data.PadCollate((pad, 0, IGNORE))
        identity = {
            "sources": {t: data.read_source(self.home, t) for t in self.tasks},
            "max_length": max_length,
            "source": self.spec.source,
        }
        self.fingerprint = f"{suite}-v{VERSION}-{self.spec.family}-{key_hash(identity)}"

    # -- the suite contract -------------------------------------------------------------

    def base_state(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self._base.items()}

    def backbone(self, state: dict[str, Tensor] | None = None) -> nn.Module:
        module = copy.deepcopy(self._template)
        if state is not None:
            m.load_canonical(module, state)
        return module.to(self.device)

    def task_model(
        self, task: str, backbone: nn.Module, private: dict[str, Tensor] | None = None
    ) -> TaskModel:
        if self.spec.family == "t5":
            return m.TextToText(backbone, self.tokenizer)
        spec = TASKS[task]
        head = m.new_head(self.spec.family, self.config, spec.labels, task)
        model = m.SequenceClassifier(backbone, head, self.spec.family, spec.regression)
        if private is not None:
            model.private.load_state_dict(private)
        return model.to(self.device)

    def dataset(self, task: str, split: str) -> data.GlueItems:
        rows = self._rows[task]
        train_idx, val_idx = self._split[task]
        chosen = {"train": (rows["train"], train_idx), "val": (rows["train"], val_idx)}
        chosen["test"] = (rows["test"], None)
        if split not in chosen:
            raise ValueError(f"unknown split {split!r} (valid: train, val, test)")
        table, indices = chosen[split]
        return data.GlueItems(table, indices, self._encoder(task), self._collate)

    def recipe(self, task: str) -> Recipe:
        """The task's recipe; any other name (the multi-task run's key) gets the default."""
        return self._recipes.get(task, m.RECIPE)

    def metrics(self, task: str) -> tuple[Metric, ...]:
        return m.metrics(TASKS[task], self.spec.family)

    def residual_blocks(self, backbone: nn.Module) -> list[str]:
        return blocks_of(backbone, *m.BLOCKS[self.spec.family])

    def import_experts(self, source: str) -> dict[str, dict[str, Tensor]]:
        """Published fine-tuned models per task (see :mod:`.experts`)."""
        from atmbench.default_plugins.suites.glue.experts import load_experts

        return load_experts(source, self.spec, self.tasks, self._template, self.home / "hub")

    # -- encoding -----------------------------------------------------------------------

    def _encoder(self, task: str):
        spec, tokenizer, limit = TASKS[task], self.tokenizer, self.max_length

        def ids(*texts: str) -> tuple[Tensor, Tensor]:
            encoded = tokenizer(*texts, truncation=True, max_length=limit)
            return (
                torch.tensor(encoded["input_ids"]),
                torch.tensor(encoded["attention_mask"]),
            )

        if self.spec.family == "t5":

            def text_to_text(row: dict) -> tuple[Tensor, Tensor, Tensor]:
                prompt = spec.prompt.format(**{c: row[c] for c in spec.columns})
                input_ids, mask = ids(prompt)
                answer = tokenizer(spec.answer(row["label"]), truncation=True, max_length=limit)
                return input_ids, mask, torch.tensor(answer["input_ids"])

            return text_to_text

        def classify(row: dict) -> tuple[Tensor, Tensor, Tensor]:
            input_ids, mask = ids(*(row[c] for c in spec.columns))
            # float for every task, so that mixed multi-task batches stack; classes are exact
            label = torch.tensor(row["label"], dtype=torch.float32)
            return input_ids, mask, label

        return classify
