"""Task vectors with the exact shapes of open_clip ViT-B-32's image tower, written once.

Random values (the speed of a merge does not depend on them); 8 tasks, float32, one
safetensors file per task, exactly what the expert cache holds for vision8.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
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


def merge_once(directory: Path, spec: str) -> float:
    """Stream the data-free ``spec`` over the tower; return seconds.

    Hyperparameters are the method's defaults unless the spec fixes them. A per-task method
    (``emr``, ``tall_masks``) builds every task's model in turn, one in memory at a time, as
    the runner scores them; ``METHOD+lines`` scales the method's unscaled merge by LiNeS.
    """
    from safetensors.torch import load_file

    from atmbench import kernels, registry
    from atmbench.default_plugins.refiners.lines import lines
    from atmbench.method import FileTaskVectors, combine
    from atmbench.spec import parse_spec
    from atmbench.streaming import merged_with_state, task_vector

    parsed = parse_spec(spec, registry.methods(), registry.refiners())
    method = registry.methods()[parsed.method.name]
    hparams = {h.name: parsed.method.fixed.get(h.name, h.default) for h in method.all_hparams()}
    scale = hparams.pop(method.scale.name) if method.scale else 1.0
    base = load_file(str(directory / "base.safetensors"))
    vectors = FileTaskVectors(
        {f"task{t}": directory / f"task{t}.safetensors" for t in range(TASKS)}
    )
    kernels.compile_kernels()  # loaded from the cache; not the torch forms' speed
    started = time.perf_counter()
    delta, state = merged_with_state(method, base, vectors, hparams, seed=0)
    if method.per_task:
        for task in vectors.tasks:
            combine(base, task_vector(method, base, vectors, delta, hparams, state, task), scale)
    elif [r.name for r in parsed.refiners] == ["lines"]:
        beta = {h.name: h.default for h in registry.refiners()["lines"].hparams}["beta"]
        lines(base, delta, vectors, parsed.refiners[0].fixed.get("beta", beta))
    else:
        combine(base, delta, scale, consume=True)
    return time.perf_counter() - started


def _status_gb(field: str) -> float:
    """A memory figure of ``/proc/self/status`` in GB: ``RssAnon`` (resident memory the
    process allocated itself, not pages of mapped files) or ``VmHWM`` (peak RSS; not
    ``ru_maxrss``, which a process started by fork and exec inherits from its parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def measured(merge: Callable[[], object]) -> str:
    """The line a fresh merge process prints for ``test_merge_speed``: seconds, peak RSS and
    peak anonymous RSS (GB, sampled every 5 ms) of one call of ``merge``; the seconds are
    those ``merge`` returns where it times itself (:func:`merge_once`: after its set-up)."""
    peak_anon = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak_anon[0] = max(peak_anon[0], _status_gb("RssAnon"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    timed = merge()
    seconds = timed if isinstance(timed, float) else time.perf_counter() - started
    done.set()
    sampler.join()
    anon = max(peak_anon[0], _status_gb("RssAnon"))
    return f"{seconds:.3f} {_status_gb('VmHWM'):.3f} {anon:.3f}"


if __name__ == "__main__":
    # python benchmarks/tower.py DIR SPEC: one merge in a fresh process, for peak memory.
    # Prints seconds, peak RSS (GB, including the memory-mapped task-vector pages the
    # kernel counts as resident) and peak anonymous RSS (GB).
    print(measured(lambda: merge_once(Path(sys.argv[1]), sys.argv[2])))
