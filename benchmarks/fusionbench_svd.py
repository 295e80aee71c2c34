"""FusionBench 0.2.33's TSV-M, Iso-C or Iso-CTS on the tower's task vectors, in a fresh process.

Run with the Python of a throwaway venv that has ``fusion-bench==0.2.33`` (never a
dependency of atmbench): ``PYTHON benchmarks/fusionbench_svd.py DIR METHOD``. Prints the
merge's seconds, peak RSS (GB) and peak anonymous RSS (GB) like ``tower.py``. The task
vectors are read into memory before the clock starts (FusionBench takes state dicts), so
the figure is FusionBench's linear algebra alone; its default hyperparameters are used
(TSV-M α = 1, Iso-CTS common_space_fraction = 0.8), on the CPU.
"""

from __future__ import annotations

import contextlib
import io
import resource
import sys
import threading
import time
from pathlib import Path

from safetensors.torch import load_file

TASKS = 8


def _anonymous_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def main(directory: Path, name: str) -> None:
    from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
    from fusion_bench.method.task_singular_vector.utils.TSVM_utils import (
        compute_and_sum_svd_mem_reduction,
    )

    vectors = [load_file(str(directory / f"task{t}.safetensors")) for t in range(TASKS)]
    merge = {
        "tsv": lambda: compute_and_sum_svd_mem_reduction(vectors, accelerator="cpu"),
        "iso_c": lambda: iso_c(vectors, accelerator="cpu"),
        "iso_cts": lambda: iso_cts(vectors, common_space_fraction=0.8, accelerator="cpu"),
    }[name]
    peak_anon = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak_anon[0] = max(peak_anon[0], _anonymous_rss_gb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # Iso prints a line per parameter
        merge()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{seconds:.3f} {peak:.3f} {max(peak_anon[0], _anonymous_rss_gb()):.3f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
