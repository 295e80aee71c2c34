"""Published GLUE experts (``--experts hub:ORG/PREFIX`` or a folder) as full state dicts.

FusionBench's experts on the hub (``config/model/flan-t5/*.yaml``,
``config/modelpool/gpt-2_glue.yaml``):

* ``tanganke/flan-t5-base_glue-<task>``: full fine-tunes (``T5ForConditionalGeneration``,
  safetensors) — ``--experts hub:tanganke/flan-t5-base``;
* ``tanganke/flan-t5-{base,large}_glue-<task>_lora-16``: LoRA adapters (peft, r = 16) —
  ``--experts 'hub:tanganke/flan-t5-large_glue-{task}_lora-16'`` (a ``{task}`` in the
  source is the whole repository name's template);
* ``tanganke/gpt2_<task>``: ``GPT2ForSequenceClassification`` (PyTorch ``.bin``) for seven
  tasks, no STS-B — ``--experts hub:tanganke/gpt2`` on ``glue7``.

Full checkpoints are read with ``transformers``' ``from_pretrained`` (safetensors, or
``.bin`` through ``torch.load(weights_only=True)``), which resolves tied and renamed
keys; the classification head (``classifier`` / ``score``) becomes the task's private
``head``. LoRA adapters are folded into dense weights on import with peft
(``merge_and_unload``: W + B·A·α/r), so every method sees an ordinary task vector.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import Tensor, nn

from atmbench.default_plugins.suites.glue.models import ModelSpec, canonical_state
from atmbench.default_plugins.suites.glue.tasks import TASKS
from atmbench.default_plugins.suites.vision.experts import snapshot
from atmbench.suite import PRIVATE, SuiteDataError

HUB = "hub:"
ADAPTER = "adapter_config.json"
HEADS = {"roberta": "classifier", "gpt2": "score"}


def repositories(source: str, spec: ModelSpec, tasks: Sequence[str]) -> dict[str, str]:
    """task -> hub repository of its expert, from ``hub:ORG/PREFIX`` or a ``{task}`` template."""
    body = source[len(HUB) :]
    template = (
        body
        if "{task}" in body
        else spec.expert_repo.format(prefix=body.rstrip("_"), task="{task}")
    )
    if template.split("{task}")[0].count("/") != 1:
        raise ValueError(
            f"expert source {source!r}: expected hub:ORG/PREFIX or hub:ORG/NAME-WITH-{{task}}"
        )
    if spec.family == "gpt2" and "stsb" in tasks and "{task}" not in body:
        raise SuiteDataError(
            f"--experts {source}: FusionBench's GPT-2 experts cover seven tasks, not STS-B; "
            "use --suite glue7, or fine-tune (omit --experts)"
        )
    return {t: template.format(task=t) for t in tasks}


def folders(source: str, spec: ModelSpec, tasks: Sequence[str], cache_dir: Path | None) -> dict:
    """task -> local folder of its expert checkpoint (downloaded for ``hub:`` sources)."""
    if source.startswith(HUB):
        repos = repositories(source, spec, tasks)
        return {t: snapshot(r, cache_dir) for t, r in repos.items()}
    root = Path(source)
    if not root.is_dir():
        raise ValueError(f"expert source {source!r}: neither hub:ORG/PREFIX nor a folder")
    missing = [t for t in tasks if not (root / t / "config.json").is_file()]
    missing = [t for t in missing if not (root / t / ADAPTER).is_file()]
    if missing:
        raise SuiteDataError(
            f"no checkpoint for {', '.join(missing)} in {root} (looked for <task>/config.json "
            f"or <task>/{ADAPTER})"
        )
    return {t: root / t for t in tasks}


def _lora(folder: Path, spec: ModelSpec, backbone: nn.Module) -> dict[str, Tensor]:
    if spec.family != "t5":
        raise SuiteDataError(
            f"expert {folder}: LoRA adapters are supported for Flan-T5 only (got {spec.family})"
        )
    try:
        from peft import PeftModel
    except ImportError:
        raise SuiteDataError(
            f"expert {folder} is a LoRA adapter: install peft (pip install 'atmbench[glue]')"
        ) from None
    merged = PeftModel.from_pretrained(copy.deepcopy(backbone), str(folder)).merge_and_unload()
    return canonical_state(merged)


def _full(folder: Path, spec: ModelSpec, task: str) -> dict[str, Tensor]:
    import transformers

    if spec.family == "t5":
        model = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(folder)).float()
        return canonical_state(model)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(folder)).float()
    labels = TASKS[task].labels
    if model.config.num_labels != labels:
        raise SuiteDataError(
            f"expert {folder}: {model.config.num_labels} labels, task {task} has {labels}"
        )
    head = getattr(model, HEADS[spec.family])
    private = {f"{PRIVATE}head.{k}": v for k, v in canonical_state(head).items()}
    return {**canonical_state(model.base_model), **private}


def check(task: str, expert: Mapping[str, Tensor], base: Mapping[str, Tensor]) -> None:
    shared = {k: v for k, v in expert.items() if not k.startswith(PRIVATE)}
    missing = sorted(set(base) - set(shared))
    extra = sorted(set(shared) - set(base))
    wrong = [k for k in set(base) & set(shared) if shared[k].shape != base[k].shape]
    if missing or extra or wrong:
        raise SuiteDataError(
            f"expert for {task} does not fit the pretrained model: missing {missing[:3]}, "
            f"unexpected {extra[:3]}, other shapes {wrong[:3]}"
        )


def load_experts(
    source: str,
    spec: ModelSpec,
    tasks: Sequence[str],
    backbone: nn.Module,
    cache_dir: Path | None = None,
) -> dict[str, dict[str, Tensor]]:
    """task -> the expert's shared state (names as θ0's) plus ``PRIVATE`` head tensors."""
    base = canonical_state(backbone)
    out = {}
    for task, folder in folders(source, spec, tasks, cache_dir).items():
        is_lora = (folder / ADAPTER).is_file()
        expert = _lora(folder, spec, backbone) if is_lora else _full(folder, spec, task)
        check(task, expert, base)
        out[task] = expert
    return out
