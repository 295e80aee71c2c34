"""Published fine-tuned experts instead of fine-tuning: ``hub:ORG/PREFIX`` or a local folder.

``hub:tanganke/clip-vit-base-patch32`` reads ``tanganke/clip-vit-base-patch32_<task>`` for
each task (the task's FusionBench suffix, e.g. ``stanford-cars``); a local folder holds one
sub-folder or file per task, named by the task or its suffix. Checkpoints are transformers
CLIP vision models, converted to open_clip names; only safetensors, or ``torch.load`` with
``weights_only=True``, are read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from atmbench.default_plugins.suites.vision.convert import complete_from_base, hf_to_open_clip
from atmbench.default_plugins.suites.vision.tasks import TASKS
from atmbench.suite import SuiteDataError

HUB = "hub:"
_FILES = ("model.safetensors", "pytorch_model.bin")
_ACTIVATIONS = {"quick_gelu": "QuickGELU", "gelu": "GELU"}
"""transformers' ``hidden_act`` to the open_clip module it corresponds to."""


def _read(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _checkpoint_in(folder: Path) -> Path | None:
    for name in _FILES:
        if (folder / name).exists():
            return folder / name
    shards = sorted(folder.glob("*.safetensors"))
    return shards[0] if len(shards) == 1 else None


def _local(folder: Path, task: str) -> Path:
    for name in dict.fromkeys(n for n in (task, TASKS[task].expert) if n):
        for candidate in (folder / name, folder / f"{name}.safetensors", folder / f"{name}.bin"):
            if candidate.is_file():
                return candidate
            if candidate.is_dir() and (found := _checkpoint_in(candidate)):
                return found
    other = f" or {TASKS[task].expert}/" if TASKS[task].expert else ""
    raise SuiteDataError(
        f"no checkpoint for task {task!r} in {folder} (looked for {task}/{other} "
        f"with {' or '.join(_FILES)}, or {task}.safetensors)"
    )


def snapshot(repo: str, cache_dir: Path | None) -> Path:
    """The local folder of a hub repository's weights and configs, downloaded if needed."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            repo, allow_patterns=["*.safetensors", "*.bin", "*.json"], cache_dir=cache_dir
        )
    except Exception as exc:  # noqa: BLE001 - offline, missing repo, auth: one message
        raise SuiteDataError(
            f"expert {repo} not available ({type(exc).__name__}: {exc}); run once online "
            "(without HF_HUB_OFFLINE) to cache it"
        ) from None
    return Path(folder)


def _hub(repo: str, cache_dir: Path | None) -> Path:
    folder = snapshot(repo, cache_dir)
    found = _checkpoint_in(folder)
    if found is None:
        raise SuiteDataError(f"expert {repo}: no {' or '.join(_FILES)} in the repository")
    return found


def checkpoint_paths(
    source: str, tasks: Sequence[str], cache_dir: Path | None = None
) -> dict[str, Path]:
    """task -> checkpoint file, downloading hub repositories into ``cache_dir``."""
    if source.startswith(HUB):
        prefix = source[len(HUB) :].rstrip("_")
        if prefix.count("/") != 1:
            raise ValueError(f"expert source {source!r}: expected hub:ORG/PREFIX")
        unpublished = [t for t in tasks if TASKS[t].expert is None]
        if unpublished:
            raise SuiteDataError(
                f"--experts {source}: no published expert matches the data of "
                f"{', '.join(unpublished)} (FusionBench's 20-task EMNIST expert is "
                "emnist_letters, 26 letters; this suite's EMNIST is 10 digits): fine-tune "
                "it (omit --experts) or give a folder holding an emnist/ checkpoint"
            )
        return {t: _hub(f"{prefix}_{TASKS[t].expert}", cache_dir) for t in tasks}
    folder = Path(source)
    if not folder.is_dir():
        raise ValueError(f"expert source {source!r}: neither hub:ORG/PREFIX nor a folder")
    return {t: _local(folder, t) for t in tasks}


def check_activation(path: Path, activation: str) -> None:
    """Refuse an expert trained with another activation than the backbone runs.

    A transformers checkpoint's ``config.json`` names it (``hidden_act``; FusionBench's
    OpenAI-based experts say ``quick_gelu``); a checkpoint without one is not checked.
    """
    config = path.parent / "config.json"
    if not config.is_file():
        return
    fields = json.loads(config.read_text())
    hidden_act = fields.get("hidden_act", fields.get("vision_config", {}).get("hidden_act"))
    if hidden_act is not None and _ACTIVATIONS.get(hidden_act, hidden_act) != activation:
        raise SuiteDataError(
            f"expert {path.parent}: trained with hidden_act={hidden_act!r} but the backbone "
            f"runs {activation} (check the model's pretrained tag)"
        )


def load_experts(
    source: str,
    tasks: Sequence[str],
    base: Mapping[str, Tensor],
    cache_dir: Path | None = None,
    activation: str | None = None,
) -> dict[str, dict[str, Tensor]]:
    """task -> the expert's full open_clip image-tower state dict, matching ``base``'s names.

    ``base`` is θ0 (``Benchmark.base_state()``): it checks names and shapes, and supplies
    the tensors a ``CLIPVisionModel`` lacks (the visual projection). ``activation`` is the
    backbone's (``QuickGELU`` for OpenAI weights): an expert whose config says otherwise
    is refused rather than merged into a network it was not trained as.
    """
    paths = checkpoint_paths(source, tasks, cache_dir)
    if activation is not None:
        for path in paths.values():
            check_activation(path, activation)
    return {t: complete_from_base(hf_to_open_clip(_read(p)), base) for t, p in paths.items()}
