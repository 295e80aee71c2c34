"""PCB-Merging golden from the official code: ``python pcb_golden.py PATH/TO/pcb-merging``.

PATH is a checkout of duguodong7/pcb-merging at 5897888 (RECIPE.md); ``tox -e goldens-pcb --
PATH`` installs what it needs. The official ``pcb-merging.py`` defines ``PCB_merge`` and its
helpers, then runs an evolution-strategy search on names it never defines (checkpoints,
datasets), so importing it fails: only its imports and function definitions are executed
here (the file's leading imports and function definitions), read with ``ast``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import torch
from common import TASKS, inputs, save


def official(repo: str) -> dict:
    """The names ``pcb-merging.py`` defines before its script part (its first statement that
    is neither an import nor a function definition): ``PCB_merge`` and its helpers."""
    source = (Path(repo) / "pcb-merging.py").read_text()
    tree = ast.parse(source)
    kept = (ast.Import, ast.ImportFrom, ast.FunctionDef)
    prefix = []
    for node in tree.body:  # up to the first statement of the script part
        if not isinstance(node, kept):
            break
        prefix.append(node)
    tree.body = prefix
    namespace: dict = {}
    exec(compile(tree, "pcb-merging.py", "exec"), namespace)  # noqa: S102 - the official code
    return namespace


def main(repo: str) -> None:
    pcb_merge = official(repo)["PCB_merge"]
    base, experts = inputs()
    keys = sorted(base)  # the order does not matter: every step is per entry or per task
    flat = torch.stack(
        [torch.cat([(experts[t][k] - base[k]).reshape(-1) for k in keys]) for t in TASKS]
    )
    for name, ratio in (("pcb_r01", 0.1), ("pcb_r03", 0.3)):
        merged, _, _ = pcb_merge(flat, pcb_ratio=ratio)
        delta, start = {}, 0
        for k in keys:
            count = base[k].numel()
            delta[k] = merged[start : start + count].reshape(base[k].shape)
            start += count
        save(name, delta)


if __name__ == "__main__":
    main(sys.argv[1])
