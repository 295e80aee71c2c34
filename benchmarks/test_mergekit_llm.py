"""``atmbench merge`` against mergekit 0.1.5 on Llama-3.2-1B-shaped bf16 checkpoints (CPU).

A base and 4 experts (random, :mod:`llm_checkpoints`, 2.5 GB each in 1 GB shards) are
merged by both tools, each in a fresh process under ``/usr/bin/time -v`` (wall time and
peak RSS), next to the read floor (a fresh process reading every input byte once). Same
settings: float32 arithmetic, bf16 output, 1 GB output shards, weights 1, λ 1.

- ``ta``: mergekit ``task_arithmetic``; the same definition (outputs compared).
- ``ties``: mergekit ``ties`` (density 0.2, ``normalize``: the disjoint mean). Not the same
  definition: mergekit keeps the top 20% *per tensor*, atmbench (like the official code)
  per task over the *whole model*; mergekit sends a zero sign sum to +, atmbench to the
  model-wide majority. The fraction of equal outputs is reported, not asserted.
- ``dare_ties``: mergekit ``dare_ties`` (density 0.5, no magnitude trim, disjoint *sum*,
  ``rescale: false`` with weight 2 = atmbench's 1/(1 − p)) vs ``dare_ties:p=0.5,k=1,
  merge=sum``: the same law, different random streams (masks are not comparable).

Run (needs mergekit in a separate environment; ~12 GB of disk for the inputs)::

    MERGEKIT=/path/to/venv/bin/mergekit-yaml LLM_BENCH_DIR=/scratch/llm \\
        pytest benchmarks/test_mergekit_llm.py --benchmark-enable -s
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))
from llm_checkpoints import EXPERTS, ensure  # noqa: E402

MERGEKIT = os.environ.get("MERGEKIT")
CASES = {
    "ta": (
        "ta:lam=1.0",
        {"merge_method": "task_arithmetic", "parameters": {"lambda": 1.0}},
        {"weight": 1.0},
    ),
    "ties": (
        "ties:k=0.2",
        {"merge_method": "ties", "parameters": {"normalize": True, "lambda": 1.0}},
        {"weight": 1.0, "density": 0.2},
    ),
    "dare_ties": (
        "dare_ties:p=0.5,k=1.0,merge=sum",
        {
            "merge_method": "dare_ties",
            "parameters": {"normalize": False, "rescale": False, "lambda": 1.0},
        },
        {"weight": 2.0, "density": 0.5},
    ),
}
RESULTS: dict[str, dict] = {}

pytestmark = pytest.mark.skipif(
    not MERGEKIT or not Path(MERGEKIT).exists(),
    reason="set MERGEKIT to a mergekit-yaml executable (mergekit 0.1.5, separate venv)",
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = Path(os.environ.get("LLM_BENCH_DIR") or tmp_path_factory.mktemp("llm"))
    return ensure(root)


def _timed(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of ``command`` in a fresh process."""
    started = time.perf_counter()
    done = subprocess.run(
        ["/usr/bin/time", "-v", *command], capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"{command[0]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    return seconds, kb / 1e6


READ = """
import sys
buffer = bytearray(1 << 26)
for path in sys.argv[1:]:
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass
"""


def _floor(models: dict[str, Path]) -> tuple[float, float]:
    files = [str(f) for folder in models.values() for f in sorted(folder.glob("*.safetensors"))]
    return _timed([sys.executable, "-c", READ, *files])


def _mergekit_config(models, case: str, folder: Path) -> Path:
    _, config, per_model = CASES[case]
    document = dict(
        config,
        base_model=str(models["base"]),
        models=[{"model": str(models[e]), "parameters": per_model} for e in EXPERTS],
        dtype="float32",
        out_dtype="bfloat16",
    )
    path = folder / f"{case}.yml"
    path.write_text(json.dumps(document))  # JSON is YAML
    return path


def _tensors(folder: Path):
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def _agreement(ours: Path, theirs: Path) -> tuple[float, float]:
    """Fraction of bit-equal output entries and the largest |difference|."""
    other = dict(_tensors(theirs))
    equal = total = 0
    largest = 0.0
    for key, tensor in _tensors(ours):
        mine, them = tensor.float(), other.pop(key).float()
        equal += int((mine == them).sum())
        total += mine.numel()
        largest = max(largest, float((mine - them).abs().max()))
    assert not other, f"mergekit wrote tensors atmbench did not: {sorted(other)[:3]}"
    return equal / total, largest


@pytest.mark.parametrize("case", list(CASES))
def test_mergekit_llm(benchmark, models, tmp_path, case):
    spec = CASES[case][0]
    ours_out, theirs_out = tmp_path / "atmbench", tmp_path / "mergekit"
    experts = ",".join(str(models[e]) for e in EXPERTS)
    ours_cmd = [shutil.which("atmbench") or "atmbench", "merge", spec, "--base",
                str(models["base"]), "--experts", experts, "--out", str(ours_out),
                "--shard-size", "1GB"]  # fmt: skip
    theirs_cmd = [MERGEKIT, str(_mergekit_config(models, case, tmp_path)), str(theirs_out),
                  "--out-shard-size", "1B", "--no-copy-tokenizer", "--no-write-model-card",
                  "--random-seed", "0"]  # fmt: skip
    floor = _floor(models)
    runs: dict[str, tuple[float, float]] = {}
    benchmark.pedantic(lambda: runs.update(atmbench=_timed(ours_cmd)), rounds=1, iterations=1)
    runs["mergekit"] = _timed(theirs_cmd)
    equal, largest = _agreement(ours_out, theirs_out)
    result = {
        "floor_s": floor[0],
        "atmbench_s": runs["atmbench"][0],
        "atmbench_rss_gb": runs["atmbench"][1],
        "mergekit_s": runs["mergekit"][0],
        "mergekit_rss_gb": runs["mergekit"][1],
        "time_ratio": runs["atmbench"][0] / runs["mergekit"][0],
        "rss_ratio": runs["atmbench"][1] / runs["mergekit"][1],
        "equal_fraction": equal,
        "max_abs_diff": largest,
    }
    RESULTS[case] = result
    benchmark.extra_info.update(result)
    print(f"\n{case}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
    if case == "ta":  # the same definition: equal up to the order of float32 sums
        assert equal > 0.99 and largest < 0.02
