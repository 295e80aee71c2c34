"""open_clip backbones: ``NAME[:TAG]`` to a CLIP model, its image tower and preprocessing.

Only the image tower (``model.visual``) is the encoder that is fine-tuned and merged; the
text tower is used once, to build the zero-shot heads, and then dropped.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from atmbench.suite import SuiteDataError

DEFAULT_TAGS = {"ViT-B-32": "openai", "ViT-B-16": "openai", "ViT-L-14": "openai"}
"""The papers' backbones: OpenAI's CLIP weights."""
RANDOM = "random"
"""Tag for a randomly initialised model (seed 0): tests and throughput runs, not results."""
GRAD_CHECKPOINTING = frozenset({"ViT-L-14"})
"""Architectures whose image tower trains with gradient checkpointing by default."""


@dataclass(frozen=True)
class ModelId:
    name: str
    tag: str

    @property
    def pretrained(self) -> str | None:
        return None if self.tag == RANDOM else self.tag

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}"


def parse_model(model: str) -> ModelId:
    """``ViT-B-32`` -> ``ViT-B-32:openai``; ``NAME:TAG`` as given; ``NAME:random``: no weights."""
    name, _, tag = model.partition(":")
    if not tag:
        if name not in DEFAULT_TAGS:
            raise ValueError(
                f"model {model!r} needs a pretrained tag, NAME:TAG (defaults exist for: "
                f"{', '.join(DEFAULT_TAGS)}; use NAME:{RANDOM} for random weights)"
            )
        tag = DEFAULT_TAGS[name]
    return ModelId(name, tag)


def quick_gelu(model_id: ModelId) -> bool:
    """Whether ``model_id``'s weights were trained with QuickGELU (OpenAI's CLIP weights).

    open_clip >= 2.29 records it as ``quick_gelu`` in the pretrained config but builds the
    plain ``NAME`` with ``nn.GELU`` and only warns; older releases lack the field and load
    the ``openai`` tag through their OpenAI loader, which uses QuickGELU. Asking both makes
    every allowed release build the network the weights were trained as.
    """
    if model_id.pretrained is None:
        return False
    import open_clip

    config = open_clip.get_pretrained_cfg(model_id.name, model_id.pretrained)
    return bool(config.get("quick_gelu")) or model_id.pretrained.lower() == "openai"


def open_clip_options(model_id: ModelId) -> dict[str, Any]:
    """Keyword arguments to ``open_clip.create_model*`` that make the architecture match the
    weights; models whose config already says QuickGELU (``NAME-quickgelu``) keep it."""
    return {"force_quick_gelu": quick_gelu(model_id)}


def activation(tower: nn.Module) -> str:
    """The MLP activation a tower runs (``QuickGELU``, ``GELU``, ...): part of cache keys."""
    names = sorted({type(m).__name__ for m in tower.modules() if "GELU" in type(m).__name__})
    return "+".join(names) or "none"


def weights_dir(home: Path) -> Path:
    return Path(home) / "open_clip"


def fetch_command(suite: str, model: str) -> str:
    return f"atmbench download --suite {suite} --model {model}"


@dataclass
class Backbone:
    """A CLIP model split into what the suite needs."""

    model: nn.Module
    """The whole CLIP model (text tower included), on the CPU."""
    preprocess_train: Any
    preprocess_eval: Any
    tokenizer: Any

    @property
    def activation(self) -> str:
        """The activation of the whole model (both towers): what heads and experts ran."""
        return activation(self.model)

    def visual(self) -> nn.Module:
        """A fresh copy of the image tower, so callers may train it freely."""
        return copy.deepcopy(self.model.visual)


def create(model_id: ModelId, home: Path, suite: str) -> Backbone:
    """Build the model from the local weight cache, downloading unless HF_HUB_OFFLINE=1.

    Missing weights become a :class:`SuiteDataError` naming the command that fetches them.
    """
    import open_clip

    if model_id.name not in open_clip.list_models():
        raise ValueError(
            f"unknown open_clip model {model_id.name!r} (valid: see open_clip.list_models(); "
            f"e.g. {', '.join(DEFAULT_TAGS)})"
        )
    tags = open_clip.list_pretrained_tags_by_model(model_id.name)
    if model_id.pretrained is not None and model_id.pretrained not in tags:
        raise ValueError(
            f"unknown pretrained tag {model_id.tag!r} for {model_id.name} "
            f"(valid: {', '.join([*tags, RANDOM])})"
        )
    torch.manual_seed(0)  # random-init runs get the same θ0 every time
    try:
        model, train_tf, eval_tf = open_clip.create_model_and_transforms(
            model_id.name,
            pretrained=model_id.pretrained,
            cache_dir=str(weights_dir(home)),
            **open_clip_options(model_id),
        )
    except (OSError, RuntimeError) as exc:
        if model_id.pretrained is None:
            raise
        raise SuiteDataError(
            f"open_clip weights {model_id} are not in {weights_dir(home)} and could not be "
            f"downloaded ({type(exc).__name__}: {exc}); fetch them with: "
            f"{fetch_command(suite, str(model_id))}"
        ) from None
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_id.name, cache_dir=str(weights_dir(home)))
    return Backbone(model, train_tf, eval_tf, tokenizer)
