"""``text8``: the offline language suite, eight generated text tasks for a tiny causal LM.

The language counterpart of ``digits8``: it runs anywhere in minutes and shows what the
field studies on LLMs — a pretrained model that knows the format but not the tasks,
experts that solve their own task, and a merging gap between.

* Text: strings over the letters ``a``-``l`` (12 letters, 3-7 long) and two-digit numbers.
  A prompt is ``<task> input =``, the answer follows and ends with an end token; one
  character is one token. Every example comes from Python's ``random`` seeded by the task's
  name (never the cell seed); test, validation and train prompts are disjoint.
* Tasks: ``reverse``, ``sort``, ``successor`` (each letter to the next, ``l`` to ``a``),
  ``cipher`` (a fixed substitution of the 12 letters), ``dedup`` (drop repeated letters),
  ``rotate`` (first letter to the end), ``count`` (occurrences of the first letter) and
  ``addition`` (two numbers below 100). Scored by exact match of the greedy generation.
* Backbone: a ``transformers`` Llama (untied embeddings, so that every shared tensor is
  merged once), pretrained in-process on a ninth task, ``copy`` (answer = input, letters
  and numbers), and cached under ATMBENCH_HOME. Pretraining teaches the format and the
  vocabulary; each task has its own task token, never seen in pretraining, so the
  pretrained model tends to copy and scores near zero while experts learn their task.
* Nothing is task-private: the language-model head is part of the shared model.
"""

from __future__ import annotations

import dataclasses
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from atmbench.cache import EntryCache, load_entry
from atmbench.config import show_progress
from atmbench.finetune import Recipe, finetune, state_on_cpu
from atmbench.generative import GenerativeTask, encode_example
from atmbench.hookspecs import hookimpl
from atmbench.metrics import EXACT_MATCH, Metric
from atmbench.suite import Suite

SUITE = "text8"
VERSION = "1"
"""Bump when the text, tasks, backbone recipe or vocabulary change: it invalidates caches."""
LETTERS = string.ascii_lowercase[:12]
DIGITS = string.digits
SIZES = {"train": 1000, "val": 100, "test": 200}
PRETRAIN_SIZE = 4000
PROMPT_LEN, ANSWER_LEN = 10, 8
"""Fixed lengths, in tokens, for every task: task token + 7 characters + ``=`` (+ 1 spare);
7 answer characters + the end token."""


def _cipher_table() -> dict[str, str]:
    shuffled = list(LETTERS)
    random.Random("cipher").shuffle(shuffled)
    return dict(zip(LETTERS, shuffled, strict=True))


CIPHER = _cipher_table()


def _letters(rng: random.Random, pool: str = LETTERS) -> str:
    return "".join(rng.choice(pool) for _ in range(rng.randint(3, 7)))


def _dedup_input(rng: random.Random) -> str:
    """Strings drawn from 4 letters, so that most have repeats to drop."""
    return _letters(rng, "".join(rng.sample(LETTERS, 4)))


def _numbers(rng: random.Random) -> str:
    return f"{rng.randint(0, 99)}+{rng.randint(0, 99)}"


def _sum(text: str) -> str:
    a, b = text.split("+")
    return str(int(a) + int(b))


Task = tuple[Callable[[random.Random], str], Callable[[str], str]]
TASKS: dict[str, Task] = {
    # name: (input generator, answer)
    "reverse": (_letters, lambda s: s[::-1]),
    "sort": (_letters, lambda s: "".join(sorted(s))),
    "successor": (_letters, lambda s: "".join(LETTERS[(LETTERS.index(c) + 1) % 12] for c in s)),
    "cipher": (_letters, lambda s: "".join(CIPHER[c] for c in s)),
    "dedup": (_dedup_input, lambda s: "".join(dict.fromkeys(s))),
    "rotate": (_letters, lambda s: s[1:] + s[0]),
    "count": (_dedup_input, lambda s: str(s.count(s[0]))),
    "addition": (_numbers, _sum),
}
PRETRAIN_TASK = "copy"

# Vocabulary: padding, end, "=", "+", digits, letters, then one token per task.
PAD, EOS = 0, 1
SYMBOLS = ["<pad>", "<eos>", "=", "+", *DIGITS, *LETTERS, PRETRAIN_TASK, *TASKS]
TOKEN = {s: i for i, s in enumerate(SYMBOLS)}


def encode(text: str) -> list[int]:
    return [TOKEN[c] for c in text]


def decode(ids) -> str:
    return "".join(SYMBOLS[i] if 2 <= i < TOKEN[PRETRAIN_TASK] else "?" for i in ids)


@dataclass(frozen=True)
class ModelConfig:
    """A tiny Llama and its recipes. ``llama-micro`` exists for tests: seconds, not minutes."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    pretrain: Recipe
    expert: Recipe


MODELS = {
    "llama-tiny": ModelConfig(
        hidden=64,
        layers=2,
        heads=4,
        intermediate=192,
        pretrain=Recipe(epochs=6, lr=3e-3, batch_size=64, warmup_steps=30, weight_decay=0.01),
        expert=Recipe(epochs=4, lr=2e-3, batch_size=64, warmup_steps=10, weight_decay=0.01),
    ),
    "llama-micro": ModelConfig(
        hidden=32,
        layers=1,
        heads=2,
        intermediate=64,
        pretrain=Recipe(epochs=1, lr=3e-3, batch_size=64, warmup_steps=5, weight_decay=0.01),
        expert=Recipe(epochs=0.25, lr=2e-3, batch_size=64, warmup_steps=2, weight_decay=0.01),
    ),
}


def _build(config: ModelConfig) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaConfig(
        vocab_size=len(SYMBOLS),
        hidden_size=config.hidden,
        intermediate_size=config.intermediate,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        max_position_embeddings=PROMPT_LEN + ANSWER_LEN,
        tie_word_embeddings=False,
        pad_token_id=PAD,
        bos_token_id=None,
        eos_token_id=EOS,
    )
    return LlamaForCausalLM(llama)


def _examples(task: str, generate, answer, sizes: dict[str, int]) -> dict[str, TensorDataset]:
    """Disjoint splits of distinct prompts, drawn in the order test, val, train."""
    rng = random.Random(f"{SUITE}-{task}")
    seen: set[str] = set()
    out = {}
    for split, size in sizes.items():
        rows = []
        while len(rows) < size:
            text = generate(rng)
            if text in seen:
                continue
            seen.add(text)
            prompt = [TOKEN[task], *encode(text), TOKEN["="]]
            rows.append(
                encode_example(prompt, encode(answer(text)), (PROMPT_LEN, ANSWER_LEN), PAD, EOS)
            )
        out[split] = TensorDataset(*(torch.stack(column) for column in zip(*rows, strict=True)))
    return out


def _pretrain_input(rng: random.Random) -> str:
    return _numbers(rng) if rng.random() < 0.25 else _letters(rng)


class TextBenchmark:
    """text8 loaded for one tiny model; all data lives in memory."""

    def __init__(self, model: str, home: Path, device: torch.device):
        self.suite, self.model, self.device, self._home = SUITE, model, device, Path(home)
        self.num_workers = 0
        self.config = MODELS[model]
        self.tasks = tuple(TASKS)
        order = {"test": SIZES["test"], "val": SIZES["val"], "train": SIZES["train"]}
        self._data = {
            (task, split): data
            for task, (generate, answer) in TASKS.items()
            for split, data in _examples(task, generate, answer, order).items()
        }
        self._pretrain_data = _examples(
            PRETRAIN_TASK, _pretrain_input, lambda s: s, {"train": PRETRAIN_SIZE}
        )["train"]
        key = {
            "suite": SUITE,
            "model": model,
            "version": VERSION,
            "config": dataclasses.asdict(self.config),
        }
        self.fingerprint = f"{SUITE}-v{VERSION}-{model}"
        directory, _, _ = EntryCache(Path(home) / "backbones").get_or_create(key, self._pretrain)
        self._base = load_entry(directory)

    def _pretrain(self) -> tuple[dict[str, Tensor], dict]:
        torch.manual_seed(0)
        backbone = _build(self.config).to(self.device)
        stats = finetune(
            self.task_model(PRETRAIN_TASK, backbone),
            self._pretrain_data,
            self.config.pretrain,
            seed=0,
            desc=f"pretrain {SUITE}/{self.model}",
            progress=show_progress(),
        )
        return state_on_cpu(backbone), {"pretrain_steps": stats.steps}

    def base_state(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self._base.items()}

    def backbone(self, state: dict[str, Tensor] | None = None) -> nn.Module:
        model = _build(self.config)
        model.load_state_dict(self._base if state is None else state)
        return model.to(self.device)

    def task_model(
        self, task: str, backbone: nn.Module, private: dict[str, Tensor] | None = None
    ) -> GenerativeTask:
        return GenerativeTask(backbone, decode, PAD, EOS)

    def dataset(self, task: str, split: str) -> TensorDataset:
        return self._data[task, split]

    def recipe(self, task: str) -> Recipe:
        return self.config.expert

    def metrics(self, task: str) -> tuple[Metric, ...]:
        return (EXACT_MATCH,)


@hookimpl
def register_suites(register):
    register(
        Suite(
            name=SUITE,
            tasks=tuple(TASKS),
            models=tuple(MODELS),
            load=TextBenchmark,
            version=VERSION,
            description="8 generated text tasks; tiny transformers Llama; exact match; CPU",
        )
    )
