"""MergeBench's published experts (``--experts hub:MergeBench``) or a folder of checkpoints.

MergeBench names its 40 experts ``MergeBench/<base>_<domain>``, ``<base>`` the last part of
the base model's hub id (``merging/main.py::get_ft_ckpts``): ``hub:MergeBench`` on
Llama-3.2-3B reads ``MergeBench/Llama-3.2-3B_math`` and so on. A folder holds one
``transformers`` checkpoint per domain, ``<folder>/<domain>/``. Checkpoints are read with
``from_pretrained`` (sharded safetensors, memory-mapped) in bf16, one domain at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from atmbench.default_plugins.suites.glue.experts import check
from atmbench.default_plugins.suites.vision.experts import snapshot
from atmbench.finetune import state_on_cpu
from atmbench.suite import SuiteDataError

HUB = "hub:"


def repositories(source: str, base: str, domains: Sequence[str]) -> dict[str, str]:
    """domain -> hub repository of its expert, for ``hub:ORG`` and a base model id."""
    org = source[len(HUB) :].strip("/")
    if not org or "/" in org:
        raise ValueError(f"expert source {source!r}: expected hub:ORG (e.g. hub:MergeBench)")
    name = base.rstrip("/").rsplit("/", 1)[-1]
    return {d: f"{org}/{name}_{d}" for d in domains}


def folders(source: str, base: str, domains: Sequence[str], cache_dir: Path | None) -> dict:
    """domain -> local checkpoint folder (downloaded for ``hub:`` sources)."""
    if source.startswith(HUB):
        return {d: snapshot(r, cache_dir) for d, r in repositories(source, base, domains).items()}
    root = Path(source)
    if not root.is_dir():
        raise ValueError(f"expert source {source!r}: neither hub:ORG nor a folder")
    missing = [d for d in domains if not (root / d / "config.json").is_file()]
    if missing:
        raise SuiteDataError(
            f"no checkpoint for {', '.join(missing)} in {root} (looked for <domain>/config.json)"
        )
    return {d: root / d for d in domains}


class Published(Mapping[str, dict[str, Tensor]]):
    """domain -> the expert's state dict, read when asked for and not kept: the import
    holds one expert in memory at a time, not five."""

    def __init__(
        self,
        source: str,
        base: str,
        domains: Sequence[str],
        base_state: Mapping[str, Tensor],
        cache_dir: Path | None = None,
    ):
        self.source, self.base, self.domains = source, base, tuple(domains)
        self.base_state, self.cache_dir = base_state, cache_dir

    def __getitem__(self, domain: str) -> dict[str, Tensor]:
        import transformers

        if domain not in self.domains:
            raise KeyError(domain)
        folder = folders(self.source, self.base, [domain], self.cache_dir)[domain]
        floats = [v.dtype for v in self.base_state.values() if v.is_floating_point()]
        dtype = floats[0] if floats else torch.bfloat16  # θ0's: bf16 unless a study says
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
        state = state_on_cpu(model)
        check(domain, state, self.base_state)
        return state

    def __iter__(self) -> Iterator[str]:
        return iter(self.domains)

    def __len__(self) -> int:
        return len(self.domains)
