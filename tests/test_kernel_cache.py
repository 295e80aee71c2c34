"""The compiled kernels are cached on disk: only a fresh environment's first merge compiles
them, and every later process loads them (milliseconds instead of ~30 s of compiling)."""

from __future__ import annotations

import json
import subprocess
import sys

import numba

from atmbench import kernels

MERGES = r"""
import json, sys
import numba, torch
import atmbench
from atmbench import kernels

kernels.compile_kernels()  # else the merges below run the torch forms while they load
gen = torch.Generator().manual_seed(0)
base = {"w": torch.randn(8, 300, generator=gen), "b": torch.randn(300, generator=gen)}
experts = {t: {k: v + torch.randn(v.shape, generator=gen) for k, v in base.items()} for t in "abc"}
for spec in ("ties", "dare_ta", "dare_ties", "breadcrumbs", "consensus_ta", "consensus_ties"):
    atmbench.merge(spec, base, experts)
stats = {
    name: [sum(f.stats.cache_hits.values()), sum(f.stats.cache_misses.values())]
    for name, f in vars(kernels).items()
    if isinstance(f, numba.core.registry.CPUDispatcher)
}
print(json.dumps(stats))
"""


def _merge_in_a_fresh_process() -> dict[str, list[int]]:
    done = subprocess.run(
        [sys.executable, "-c", MERGES], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.splitlines()[-1])


def test_every_kernel_is_cached():
    jitted = [f for f in vars(kernels).values() if isinstance(f, numba.core.registry.CPUDispatcher)]
    called = [f for f in jitted if f.targetoptions.get("inline") != "always"]  # not inlined
    assert len(called) >= 7 and all(f.stats.cache_path for f in called)  # None: no cache


def test_a_second_process_loads_every_kernel_from_the_cache():
    first = _merge_in_a_fresh_process()  # compiles whatever no earlier process cached
    second = _merge_in_a_fresh_process()
    used = {name for name, (hits, misses) in first.items() if hits + misses}
    assert used >= {"_ties", "_bracket", "_kth_smallest", "_dare", "_consensus", "_band_sum"}
    assert {name: misses for name, (_, misses) in second.items() if misses} == {}
    assert all(second[name][0] > 0 for name in used)
