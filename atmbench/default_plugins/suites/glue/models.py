"""The GLUE models: which weights, how each family answers a task, how experts are tuned.

* ``flan-t5-base`` / ``flan-t5-large`` answer text-to-text: FusionBench's prompt in, the
  label word (or STS-B's score) out by greedy generation (``max_length=10``, FusionBench's
  ``glue_evaluation``); the whole ``T5ForConditionalGeneration`` is shared, nothing is
  private. Trained with cross-entropy on the answer tokens.
* ``roberta-base`` and ``gpt2`` classify: the encoder (``RobertaModel`` without pooler,
  ``GPT2Model``) is shared and merged; the classification head (RoBERTa's
  ``RobertaClassificationHead``, GPT-2's bias-free ``score`` on the last real token) is
  task-private, trained with its expert and kept per task, as FusionBench's
  ``*ForSequenceClassification`` experts carry theirs. STS-B is a 1-output regression head
  trained with mean squared error, as ``transformers`` does for ``num_labels=1``.

A local folder holding a ``transformers`` checkpoint (``config.json``) is accepted as a
model name too; its family comes from ``model_type``.

Fine-tuning recipe (:data:`RECIPE`, every model): AdamW, learning rate 5e-5, 3 epochs,
batch 8, linear decay without warm-up, no weight decay, gradient-norm clip 1.0. The
learning rate and epochs are FusionBench's published ones for its GPT-2 GLUE experts
(``docs/modelpool/gpt2_classification.md``: "learning rate of 5e-5 for 3 epochs"); the
rest is unpublished, and these are the ``transformers`` ``Trainer`` defaults that those
two numbers are. FusionBench publishes no recipe for its Flan-T5 experts (none in its
``config/`` or docs) nor RoBERTa ones, so the same recipe is used for every model: a
documented choice, not FusionBench's. Its published Flan-T5 experts can be imported with
``--experts`` instead (:mod:`.experts`).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from atmbench.default_plugins.suites.glue.tasks import GlueTask
from atmbench.finetune import Recipe, state_on_cpu
from atmbench.metrics import ACCURACY, EXACT_MATCH, MATTHEWS, PEARSON, SPEARMAN, Metric
from atmbench.suite import IGNORE, Batch, SuiteDataError, TaskModel

RECIPE = Recipe(
    epochs=3,
    lr=5e-5,
    batch_size=8,
    weight_decay=0.0,
    warmup_steps=0,
    schedule="linear",
    grad_clip=1.0,
)
MAX_LENGTH = 512
"""Input tokens kept (FusionBench truncates to 512 for every family)."""
GENERATE_MAX_LENGTH = 10
FAMILIES = ("t5", "roberta", "gpt2")
BLOCKS = {"t5": ("encoder.block", "decoder.block"), "roberta": ("encoder.layer",), "gpt2": ("h",)}
"""Each family's lists of residual blocks in the shared module, in the order a forward runs
them (T5: the whole encoder before the decoder)."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str
    """Hub id of the pretrained weights, or a local folder."""
    family: str
    expert_repo: str
    """Published expert of a task: ``{prefix}`` and ``{task}`` filled in (see experts.py)."""


MODELS: dict[str, ModelSpec] = {
    "flan-t5-base": ModelSpec("flan-t5-base", "google/flan-t5-base", "t5", "{prefix}_glue-{task}"),
    "flan-t5-large": ModelSpec(
        "flan-t5-large", "google/flan-t5-large", "t5", "{prefix}_glue-{task}"
    ),
    "roberta-base": ModelSpec(
        "roberta-base", "FacebookAI/roberta-base", "roberta", "{prefix}_glue-{task}"
    ),
    "gpt2": ModelSpec("gpt2", "openai-community/gpt2", "gpt2", "{prefix}_{task}"),
}
"""FusionBench names its experts ``tanganke/flan-t5-base_glue-cola`` (Flan-T5, full and
``_lora-16``: ``config/model/flan-t5/*.yaml``) and ``tanganke/gpt2_cola`` (GPT-2, seven
tasks: no STS-B). Its RoBERTa hub ids are unpublished: ``config/modelpool/
SequenceClassificationModelPool/roberta-base_glue.yaml`` (last changed 2025-08-13, a5fe433)
lists the pretrained ``roberta-base`` and experts ``roberta_glue-<task>`` from a
``/model/roberta`` config group that no branch of tanganke/fusion_bench contains (checked at
54c9e8c), and no other file names a RoBERTa repository. So RoBERTa's ``{prefix}_glue-{task}``
(e.g. ``tanganke/roberta-base_glue-cola``) is the Flan-T5 form, unverified."""


def parse_model(model: str) -> ModelSpec:
    """A known name, or a local ``transformers`` checkpoint folder (family from its config)."""
    if model in MODELS:
        return MODELS[model]
    config = Path(model) / "config.json"
    if config.is_file():
        model_type = json.loads(config.read_text()).get("model_type")
        if model_type not in FAMILIES:
            raise ValueError(
                f"model {model!r}: model_type {model_type!r} is not supported "
                f"(valid: {', '.join(FAMILIES)})"
            )
        return ModelSpec(model, model, model_type, "{prefix}_glue-{task}")
    raise ValueError(
        f"unknown GLUE model {model!r} (valid: {', '.join(MODELS)}, or a folder holding a "
        "transformers checkpoint of one of those families)"
    )


def canonical_state(module: nn.Module) -> dict[str, Tensor]:
    """The state dict without tied aliases (see :func:`atmbench.finetune.state_on_cpu`)."""
    return state_on_cpu(module)


def _aliases(module: nn.Module) -> set[str]:
    every = dict(module.named_parameters(remove_duplicate=False))
    return set(every) - set(dict(module.named_parameters()))


def load_canonical(module: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = sorted(set(missing) - _aliases(module))
    if missing or unexpected:
        raise KeyError(
            f"state does not fit the model: missing {missing[:3]}, extra {unexpected[:3]}"
        )
    return module


def cache_dir(home: Path) -> Path:
    return Path(home) / "hf"


def _pretrained(loader: Any, spec: ModelSpec, home: Path, command: str, **kwargs) -> Any:
    try:
        return loader.from_pretrained(spec.source, cache_dir=str(cache_dir(home)), **kwargs)
    except (OSError, ValueError) as exc:
        raise SuiteDataError(
            f"{spec.source} is not in {cache_dir(home)} and could not be downloaded "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            f"fetch it with: {command}"
        ) from None


@dataclass
class Pretrained:
    """What a GLUE benchmark builds its models from, on the CPU."""

    backbone: nn.Module
    tokenizer: Any
    config: Any


def load_pretrained(spec: ModelSpec, home: Path, command: str) -> Pretrained:
    """The pretrained shared module and tokenizer, from the cache or the hub."""
    import transformers

    tokenizer = _pretrained(transformers.AutoTokenizer, spec, home, command)
    if spec.family == "t5":
        model = _pretrained(transformers.AutoModelForSeq2SeqLM, spec, home, command)
        return Pretrained(model.eval(), tokenizer, model.config)
    if tokenizer.pad_token is None:  # GPT-2: FusionBench pads with <|endoftext|>
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    model = _pretrained(
        transformers.AutoModelForSequenceClassification, spec, home, command, num_labels=2
    )
    return Pretrained(model.base_model.eval(), tokenizer, model.config)


def new_head(family: str, config: Any, labels: int, task: str) -> nn.Module:
    """A task's classification head, initialised as ``transformers`` does (normal(0, σ)).

    Seeded by the task's name alone: every expert and every merged model of a task starts
    from the same head.
    """
    hidden = config.hidden_size if family == "roberta" else config.n_embd
    generator = torch.Generator().manual_seed(int.from_bytes(task.encode(), "little") % 2**31)
    if family == "roberta":
        from transformers.models.roberta.modeling_roberta import RobertaClassificationHead

        head_config = copy.deepcopy(config)
        head_config.num_labels = labels
        head = RobertaClassificationHead(head_config)
    else:
        head = nn.Linear(hidden, labels, bias=False)
    with torch.no_grad():
        for module in head.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, config.initializer_range, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
    return head


class TextToText(TaskModel):
    """A text-to-text task of a seq2seq model: items (input_ids, attention_mask, labels)."""

    def __init__(self, backbone: nn.Module, tokenizer: Any):
        super().__init__(backbone)
        self.tokenizer = tokenizer

    def features(self, batch: Batch) -> Tensor:
        decoder_input_ids = self.backbone.prepare_decoder_input_ids_from_labels(labels=batch[2])
        return self.backbone(
            input_ids=batch[0], attention_mask=batch[1], decoder_input_ids=decoder_input_ids
        ).logits

    def logits(self, features: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        return features.float(), batch[2]

    def unlabeled_features(self, batch: Batch) -> Tensor:
        """The decoder's first-step logits [examples, vocabulary] from the input alone, as
        greedy generation's first step computes them (from the decoder start token).
        FusionBench's AdaMerging for Flan-T5 reads the same position but feeds token id 1
        (``torch.ones``: T5's end token) as the decoder input; the start token is what the
        model was trained and is evaluated with."""
        start = self.backbone.config.decoder_start_token_id
        decoder_input_ids = torch.full((len(batch[0]), 1), start, device=batch[0].device)
        out = self.backbone(
            input_ids=batch[0], attention_mask=batch[1], decoder_input_ids=decoder_input_ids
        )
        return out.logits[:, 0]

    def prediction_logits(self, features: Tensor, batch: Batch) -> Tensor:
        """The first answer token's distribution (the label word's first token)."""
        return features.float()

    @torch.no_grad()
    def predict(self, batch: Batch) -> tuple[list[str], list[str]]:
        """Greedy answers and references as text, special tokens dropped."""
        out = self.backbone.generate(
            input_ids=batch[0],
            attention_mask=batch[1],
            max_length=GENERATE_MAX_LENGTH,
            do_sample=False,
            num_beams=1,
        )
        labels = batch[2].masked_fill(batch[2] == IGNORE, self.tokenizer.pad_token_id)
        decode = self.tokenizer.batch_decode
        return decode(out, skip_special_tokens=True), decode(labels, skip_special_tokens=True)


class SequenceClassifier(TaskModel):
    """A classification (or STS-B regression) task: items (input_ids, attention_mask, label)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, family: str, regression: bool):
        super().__init__(backbone, nn.ModuleDict({"head": head}))
        self.family, self.regression = family, regression

    def features(self, batch: Batch) -> Tensor:
        return self.backbone(input_ids=batch[0], attention_mask=batch[1]).last_hidden_state

    def logits(self, features: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        head = self.private["head"]
        if self.family == "roberta":
            out = head(features)  # RobertaClassificationHead reads the <s> position
        else:  # GPT-2 scores its last real token (right padding)
            last = batch[1].long().sum(-1) - 1
            out = head(features[torch.arange(len(features), device=features.device), last])
        out = out.float()
        return (out[:, 0], batch[2].float()) if self.regression else (out, batch[2].long())

    def loss(self, batch: Batch, features: Any = None) -> Tensor:
        if not self.regression:
            return super().loss(batch, features)
        scores, labels = self.logits(self.features(batch) if features is None else features, batch)
        return nn.functional.mse_loss(scores, labels.float())

    @torch.no_grad()
    def predict(self, batch: Batch) -> tuple[Tensor, Tensor]:
        scores, labels = self(batch)
        return (scores, labels) if self.regression else (scores.argmax(-1), labels)


def _floats(texts: Sequence[str]) -> Tensor:
    """Generated scores as numbers; an answer that is none scores 0.0 (FusionBench's rule)."""

    def parse(text: str) -> float:
        try:
            return float(text)
        except ValueError:
            return 0.0

    return torch.tensor([parse(t) for t in texts], dtype=torch.float64)


def _indices(words: Sequence[str]) -> Any:
    """Answer text -> class index; anything but a label word is a class of its own."""

    def convert(texts: Sequence[str]) -> Tensor:
        return torch.tensor(
            [words.index(t.strip()) if t.strip() in words else len(words) for t in texts]
        )

    return convert


def metrics(spec: GlueTask, family: str) -> tuple[Metric, ...]:
    """The task's metrics on what the family's ``predict`` returns (text or tensors).

    The first is GLUE's (ranked); CoLA adds accuracy (what FusionBench reports for it) and
    STS-B Pearson correlation (GLUE reports both correlations)."""
    convert = None  # classifiers' tensors already are classes or scores
    if family == "t5":
        convert = _floats if spec.regression else _indices(spec.words)
    if spec.regression:
        return (_on(SPEARMAN, convert), _on(PEARSON, convert))
    if spec.metric == "matthews":
        return (_on(MATTHEWS, convert), _on(ACCURACY, convert))
    return (EXACT_MATCH,) if family == "t5" else (ACCURACY,)


def _on(metric: Metric, convert: Callable[[Sequence], Any] | None) -> Metric:
    """``metric`` on converted predictions and references, under its own name."""
    if convert is None:
        return metric
    return Metric(metric.name, lambda p, r: metric(convert(p), convert(r)))
