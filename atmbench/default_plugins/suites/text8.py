"""``text8``: the offline language suite, eight generated text tasks for a tiny causal LM.

The language counterpart of ``digits8``: it runs anywhere in minutes and shows what the
field studies on LLMs — a pretrained model that half knows the tasks, experts that know
their own, and merges that land between (measured numbers: the README).

* Text: letter strings, 3-6 long; one letter is one token. A prompt is
  ``<task token> input =``, the answer follows and ends with an end token. Each task works
  over its own alphabet, a window of 6 of the 24 letters ``a``-``x`` starting 3 letters
  after the previous task's (neighbours share half their letters), the way vision tasks
  each have their own kind of image. Every example comes from Python's ``random`` seeded by
  the task's name (never the cell seed); a task's test, validation, train and pretraining
  prompts are all distinct.
* Tasks: ``reverse``, ``sort`` (in alphabet order), ``successor`` (each letter to the next
  of the alphabet, cyclically), ``cipher`` (a fixed substitution within the alphabet),
  ``dedup`` (drop repeated letters; inputs drawn from 4 letters so most repeat), ``rotate``
  (first letter to the end), ``swap`` (swap neighbouring pairs), ``alternate`` (every
  other letter). Scored by exact match of the greedy generation, then character accuracy.
* Backbone: a ``transformers`` Llama (untied embeddings, so that every shared tensor is
  merged once), pretrained in-process on a mixture corpus and cached under ATMBENCH_HOME:
  ``copy`` (answer = input) over every letter and length, plus 250 examples of each task
  whose inputs leave out the last 2 letters of the task's alphabet. So the base knows the
  format and every task, but not every task on every letter — as CLIP is zero-shot
  competent but no expert — and scores about a third of the test prompts (those without a
  held-out letter, and a few more) where experts score three quarters or more. Why not
  task tokens pretraining never shows (version 1): the base then scored 0, and every merge
  collapsed to about 0 too.
* Experts: few steps at a low learning rate (2 epochs, lr 3e-4), so that task vectors stay
  small (a few percent of the weights' norm) and merges mean something.
* Nothing is task-private: the language-model head is part of the shared model.
"""

from __future__ import annotations

import functools
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, TensorDataset

from atmbench.default_plugins.suites.embedded import EmbeddedBenchmark
from atmbench.finetune import Recipe
from atmbench.generative import INPUTS, GenerativeTask, encode_example
from atmbench.hookspecs import hookimpl
from atmbench.metrics import CHAR_ACCURACY, EXACT_MATCH, Metric
from atmbench.suite import Suite, blocks_of

SUITE = "text8"
VERSION = "2"
"""Bump when the text, tasks, backbone recipe or vocabulary change: it invalidates caches."""
LETTERS = string.ascii_lowercase[:24]
WINDOW, STRIDE, HELD_OUT = 6, 3, 2
"""Task ``i``'s alphabet: ``WINDOW`` letters from ``STRIDE * i`` on (so neighbouring tasks
share half their letters); its pretraining examples leave out the last ``HELD_OUT``."""
SIZES = {"test": 200, "val": 100, "train": 1000}
LENGTHS = (3, 6)
"""Letters in an input (fewest, most)."""
PRETRAIN_COPY = 1000
"""Copy examples (of every letter and length) in the pretraining corpus."""
PRETRAIN_PER_TASK = 250
"""Examples of each task in the pretraining corpus: prompts no split of the task holds."""
PROMPT_LEN, ANSWER_LEN = 8, 7
"""Fixed lengths, in tokens, for every task: task token + 6 letters + ``=``; 6 answer
letters + the end token."""


def alphabet(i: int) -> str:
    return "".join(LETTERS[(STRIDE * i + j) % len(LETTERS)] for j in range(WINDOW))


CIPHER = random.Random("cipher").sample(range(WINDOW), WINDOW)
"""The substitution of ``cipher``: position in the alphabet -> position."""


def _letters(rng: random.Random, letters: str) -> str:
    return "".join(rng.choice(letters) for _ in range(rng.randint(*LENGTHS)))


def _repeating(rng: random.Random, letters: str) -> str:
    """Strings drawn from 4 letters, so that most have repeats to drop."""
    return _letters(rng, "".join(rng.sample(letters, 4)))


def _swap_pairs(s: str, a: str) -> str:
    return "".join(s[i : i + 2][::-1] for i in range(0, len(s), 2))


Task = tuple[Callable[[random.Random, str], str], Callable[[str, str], str]]
TASKS: dict[str, Task] = {
    # name: (input generator, answer from (input, the task's alphabet))
    "reverse": (_letters, lambda s, a: s[::-1]),
    "sort": (_letters, lambda s, a: "".join(sorted(s, key=a.index))),
    "successor": (_letters, lambda s, a: "".join(a[(a.index(c) + 1) % WINDOW] for c in s)),
    "cipher": (_letters, lambda s, a: "".join(a[CIPHER[a.index(c)]] for c in s)),
    "dedup": (_repeating, lambda s, a: "".join(dict.fromkeys(s))),
    "rotate": (_letters, lambda s, a: s[1:] + s[0]),
    "swap": (_letters, _swap_pairs),
    "alternate": (_letters, lambda s, a: s[::2]),
}
PRETRAIN_TASK = "copy"

# Vocabulary: padding, end, "=", letters, then one token per task.
PAD, EOS = 0, 1
SYMBOLS = ["<pad>", "<eos>", "=", *LETTERS, PRETRAIN_TASK, *TASKS]
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
        hidden=96,
        layers=2,
        heads=4,
        intermediate=256,
        pretrain=Recipe(epochs=8, lr=3e-3, batch_size=64, warmup_steps=30, weight_decay=0.01),
        expert=Recipe(epochs=2, lr=3e-4, batch_size=64, warmup_steps=10, weight_decay=0.01),
    ),
    "llama-micro": ModelConfig(
        hidden=32,
        layers=1,
        heads=2,
        intermediate=64,
        pretrain=Recipe(epochs=1, lr=3e-3, batch_size=64, warmup_steps=5, weight_decay=0.01),
        expert=Recipe(epochs=0.25, lr=1e-3, batch_size=64, warmup_steps=2, weight_decay=0.01),
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


def _examples(
    task: str, generate, answer, splits: dict[str, tuple[int, str]]
) -> dict[str, TensorDataset]:
    """Disjoint splits of distinct prompts, drawn in the order given: split -> (size, letters)."""
    rng = random.Random(f"{SUITE}-{task}")
    seen: set[str] = set()
    out = {}
    for split, (size, letters) in splits.items():
        rows = []
        while len(rows) < size:
            text = generate(rng, letters)
            if text in seen:
                continue
            seen.add(text)
            prompt = [TOKEN[task], *encode(text), TOKEN["="]]
            rows.append(
                encode_example(prompt, encode(answer(text)), (PROMPT_LEN, ANSWER_LEN), PAD, EOS)
            )
        out[split] = TensorDataset(*(torch.stack(column) for column in zip(*rows, strict=True)))
        out[split].inputs = INPUTS
    return out


class TextBenchmark(EmbeddedBenchmark):
    """text8 loaded for one tiny model; all data lives in memory."""

    SUITE, VERSION = SUITE, VERSION

    def __init__(self, model: str, home: Path, device: torch.device):
        super().__init__(model, MODELS[model], home, device)
        self.tasks = tuple(TASKS)
        copy = _examples(PRETRAIN_TASK, _letters, lambda s: s, {"copy": (PRETRAIN_COPY, LETTERS)})
        corpus = [copy["copy"]]
        for i, (task, (generate, answer)) in enumerate(TASKS.items()):
            letters = alphabet(i)
            splits = {split: (size, letters) for split, size in SIZES.items()}
            splits["pretrain"] = (PRETRAIN_PER_TASK, letters[: WINDOW - HELD_OUT])
            data = _examples(task, generate, functools.partial(answer, a=letters), splits)
            corpus.append(data.pop("pretrain"))
            self._data.update({(task, split): d for split, d in data.items()})
        self._pretrain_data = ConcatDataset(corpus)
        self._load_base()

    def build(self) -> nn.Module:
        return _build(self.config)

    def pretraining_model(self, backbone: nn.Module) -> GenerativeTask:
        """The mixture corpus (copy and every task's pretraining examples) as one task."""
        return self.task_model(PRETRAIN_TASK, backbone)

    def task_model(
        self, task: str, backbone: nn.Module, private: dict[str, Tensor] | None = None
    ) -> GenerativeTask:
        return GenerativeTask(backbone, decode, PAD, EOS)

    def metrics(self, task: str) -> tuple[Metric, ...]:
        return (EXACT_MATCH, CHAR_ACCURACY)

    def residual_blocks(self, backbone: nn.Module) -> list[str]:
        """The Llama's decoder layers (each is also handed rotary position embeddings and
        the causal mask by the model)."""
        return blocks_of(backbone, "model.layers")


@hookimpl
def register_suites(register):
    register(
        Suite(
            name=SUITE,
            tasks=tuple(TASKS),
            models=tuple(MODELS),
            load=TextBenchmark,
            version=VERSION,
            metric=EXACT_MATCH.name,
            description="8 generated text tasks; tiny transformers Llama; exact match; CPU",
        )
    )
