"""Task vectors with the exact shapes of open_clip ViT-B-32's image tower, written once.

Random values (the speed of a merge does not depend on them); 8 tasks, float32, one
safetensors file per task, exactly what the expert cache holds for vision8.
"""

from __future__ import annotations

import resource
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

TASKS = 8


def tower_shapes(blocks: int | None = None) -> dict[str, torch.Size]:
    """The image tower's parameter shapes; with ``blocks``, only its first ``blocks`` of
    the 12 residual blocks (and every tensor outside them)."""
    import open_clip

    model = open_clip.create_model("ViT-B-32")  # random init: no download
    shapes = {k: v.shape for k, v in model.visual.state_dict().items()}
    if blocks is None:
        return shapes
    kept = tuple(f"transformer.resblocks.{i}." for i in range(blocks))
    return {
        k: s
        for k, s in shapes.items()
        if not k.startswith("transformer.resblocks.") or k.startswith(kept)
    }


def write_tower(directory: Path, blocks: int | None = None) -> tuple[Path, list[Path]]:
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    shapes = tower_shapes(blocks)
    base = {k: torch.randn(s, generator=generator) * 0.02 for k, s in shapes.items()}
    save_file(base, directory / "base.safetensors")
    files = []
    for t in range(TASKS):
        vectors = {k: torch.randn(s, generator=generator) * 1e-3 for k, s in shapes.items()}
        files.append(directory / f"task{t}.safetensors")
        save_file(vectors, files[-1])
    return directory / "base.safetensors", files


def read_all(files: list[Path]) -> float:
    """The floor: every task-vector byte read once (summed: a bandwidth-bound pass).

    ``get_tensor`` alone may hand back a view of the memory map without touching the
    bytes, so the floor reduces each tensor: the least work that reads all of them.
    """
    from safetensors import safe_open

    total = 0.0
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                total += float(f.get_tensor(key).sum())
    return total


def merge_once(directory: Path, name: str) -> float:
    """Stream ``name`` over the tower with its default hyperparameters; return seconds."""
    from safetensors.torch import load_file

    import atmbench
    from atmbench import kernels
    from atmbench.method import FileTaskVectors, combine
    from atmbench.streaming import merged_task_vector

    method = atmbench.methods()[name]
    hparams = {h.name: h.default for h in method.hparams}
    base = load_file(str(directory / "base.safetensors"))
    files = {f"task{t}": directory / f"task{t}.safetensors" for t in range(TASKS)}
    kernels.compile_kernels()  # loaded from the cache; not the torch forms' speed
    started = time.perf_counter()
    delta = merged_task_vector(method, base, FileTaskVectors(files), hparams, seed=0)
    combine(base, delta, method.scale.default if method.scale else 1.0, consume=True)
    return time.perf_counter() - started


def _anonymous_rss_gb() -> float:
    """Resident memory the process allocated itself (not pages of mapped files)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


if __name__ == "__main__":
    # python benchmarks/tower.py DIR METHOD: one merge in a fresh process, for peak memory.
    # Prints seconds, peak RSS (GB, including the memory-mapped task-vector pages the
    # kernel counts as resident) and peak anonymous RSS (GB, sampled every 5 ms).
    peak_anon = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak_anon[0] = max(peak_anon[0], _anonymous_rss_gb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    seconds = merge_once(Path(sys.argv[1]), sys.argv[2])
    done.set()
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{seconds:.3f} {peak:.3f} {max(peak_anon[0], _anonymous_rss_gb()):.3f}")
