"""A fresh environment's first merges: run with an empty ``NUMBA_CACHE_DIR``.

    NUMBA_CACHE_DIR=$(mktemp -d) python benchmarks/first_merge.py ties,dare_ties,breadcrumbs

Prints the import time and each merge's seconds (3 tasks, 64 x 256 + 256 entries); with
``--wait`` also how long the background compile still took after them.
"""

from __future__ import annotations

import sys
import time

started = time.perf_counter()
import torch  # noqa: E402

import atmbench  # noqa: E402
from atmbench import kernels  # noqa: E402

figures = [f"import {time.perf_counter() - started:.1f}s"]
gen = torch.Generator().manual_seed(0)
base = {"w": torch.randn(64, 256, generator=gen), "b": torch.randn(256, generator=gen)}
experts = {t: {k: v + torch.randn(v.shape, generator=gen) for k, v in base.items()} for t in "abc"}
for spec in sys.argv[1].split(","):
    began = time.perf_counter()
    atmbench.merge(spec, base, experts)
    figures.append(f"{spec} {time.perf_counter() - began:.2f}s")
if "--wait" in sys.argv:
    began = time.perf_counter()
    kernels.compile_kernels()
    figures.append(f"compile still took {time.perf_counter() - began:.1f}s")
print(" | ".join(figures))
