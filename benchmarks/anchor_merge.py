"""Another implementation's merge of the tower's task vectors, in a fresh process: the anchor.

``PYTHON benchmarks/anchor_merge.py DIR ANCHOR [STEPS]`` runs one of :data:`ANCHORS` on the
task vectors ``benchmarks/tower.py`` wrote to DIR and prints the merge's seconds, peak RSS
(GB) and peak anonymous RSS (GB) like ``tower.py``. PYTHON is a throwaway venv that has
the anchor's code (never a dependency of atmbench):

- ``fusionbench.*``: ``fusion-bench==0.2.33`` (its functions on task vectors where it has
  them, its algorithm classes on ``nn.Module`` pools where it takes models);
- ``mergekit.*``: ``mergekit==0.1.5`` (``merge_tensors`` per parameter, as its executor);
- ``official.*``: the authors' code from a checkout named by ``ATMBENCH_CART_SRC``
  (JH-GEECS/CART), ``ATMBENCH_PCB_SRC`` (duguodong7/pcb-merging) or ``ATMBENCH_LINES_SRC``
  (wang-kee/LiNeS), run as the golden scripts run it (``tests/data/golden/scripts``), in a
  venv with torch, omegaconf and pandas (FusionBench's has them).

Inputs (θ0, the task vectors, and θ_t = θ0 + τ_t where the anchor takes models) are built
before the clock starts, so the figure is the anchor's merge alone. Hyperparameters are
atmbench's defaults for the row it is compared with (``test_merge_speed.ANCHORED``).
"""

from __future__ import annotations

import ast
import contextlib
import copy
import io
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch
from safetensors.torch import load_file
from tower import TASKS, measured  # this directory, first on sys.path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "data" / "golden" / "scripts"))
from common import module  # noqa: E402  (the golden scripts' module builder)

State = dict[str, torch.Tensor]
Setup = Callable[[State, list[State], int], Callable[[], object]]
"""(θ0, task vectors, steps) -> the merge to time."""


def _experts(base: State, vectors: list[State]) -> list[State]:
    return [{k: base[k] + v[k] for k in base} for v in vectors]


def _pool(base: State, vectors: list[State], buffers: bool = False) -> dict:
    experts = _experts(base, vectors)
    pool = {"_pretrained_": module(base, buffers)}
    return pool | {f"t{t}": module(e, buffers) for t, e in enumerate(experts)}


def _fb_svd(name: str) -> Setup:
    def setup(base: State, vectors: list[State], steps: int) -> Callable[[], object]:
        from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
        from fusion_bench.method.task_singular_vector.utils.TSVM_utils import (
            compute_and_sum_svd_mem_reduction,
        )

        return {
            "tsv": lambda: compute_and_sum_svd_mem_reduction(vectors, accelerator="cpu"),
            "iso_c": lambda: iso_c(vectors, accelerator="cpu"),
            "iso_cts": lambda: iso_cts(vectors, common_space_fraction=0.8, accelerator="cpu"),
        }[name]

    return setup


def _fb_wudi(base: State, vectors: list[State], steps: int) -> Callable[[], object]:
    from fusion_bench.method.wudi.wudi import wudi_merging

    return lambda: wudi_merging(vectors, accelerator="cpu", iter_num=steps)


def _fb_magmax(base: State, vectors: list[State], steps: int) -> Callable[[], object]:
    from fusion_bench.method.magmax.magmax import MagMaxAlgorithm

    pool = _pool(base, vectors)
    return lambda: MagMaxAlgorithm(scaling_factor=0.5).run(pool)


def _fb_model_stock(base: State, vectors: list[State], steps: int) -> Callable[[], object]:
    from fusion_bench.method.model_stock.model_stock import ModelStock
    from fusion_bench.modelpool import BaseModelPool

    pool = BaseModelPool(_pool(base, vectors))
    return lambda: ModelStock(ignore_keys=[]).run(pool)


def _fb_emr(base: State, vectors: list[State], steps: int) -> Callable[[], object]:
    """``emr_merge``, then every task's model θ0 + γ_t·(M_t ⊙ τ_uni) in turn (what
    ``EMRTaskModulator.apply`` computes), as atmbench builds them for scoring."""
    from fusion_bench.method.emr_merging.utils import emr_merge

    def run() -> None:
        unified, masks, rescalers = emr_merge(vectors)
        for t in range(len(vectors)):
            _ = {k: base[k] + unified[k] * masks[k][t] * rescalers[t] for k in base}

    return run


def _fb_tall_masks(base: State, vectors: list[State], steps: int) -> Callable[[], object]:
    """FusionBench's algorithm returns every task's model (held together), λ 0.6."""
    from fusion_bench.method.tall_mask.task_arithmetic import TallMaskTaskArithmeticAlgorithm

    pool = _pool(base, vectors, buffers=True)
    return lambda: TallMaskTaskArithmeticAlgorithm(tall_mask_lambda=0.6).run(pool)


def _mergekit(method: str, parameters: dict | None) -> Setup:
    def setup(base: State, vectors: list[State], steps: int) -> Callable[[], object]:
        from mergekit.merge_methods.api import merge_tensors

        experts = _experts(base, vectors)

        def run() -> None:
            for key in base:
                tensors = [base[key]] + [e[key] for e in experts]
                merge_tensors(tensors, method, parameters=parameters, base_index=0)

        return run

    return setup


def _checkout(variable: str) -> Path:
    path = os.environ.get(variable)
    if not path:
        raise SystemExit(f"set {variable} to the official checkout")
    return Path(path)


def _official_cart(base: State, vectors: list[State], steps: int) -> Callable[[], object]:
    """``StaticMergeModule._merge_weights("CART")`` (λ 2.0, rank 0.12: the 8-task config);
    the modules it imports for data, evaluation and logging are empty stand-ins."""
    from omegaconf import OmegaConf

    sys.path.insert(0, str(_checkout("ATMBENCH_CART_SRC")))
    stubs = ("ray", "wandb", "src.dataset.common", "src.dataset.registry", "src.eval")
    stubs += ("src.models.heads", "src.models.modeling", "src.utils", "src.logger")
    sys.modules.update({name: mock.MagicMock() for name in stubs})
    from src.merging import StaticMergeModule
    from src.models.task_vectors import TaskVector

    config = OmegaConf.create(
        {"tasks": [f"t{t}" for t in range(len(vectors))], "device": "cpu"}
        | {"prior": 2.0, "initial_rank_ratio": 0.12}
    )
    encoder = module(base)

    def run() -> None:
        merger = StaticMergeModule(config, encoder, [TaskVector(vector=v) for v in vectors])
        with torch.no_grad():
            merger._merge_weights("CART")

    return run


def _definitions(path: Path, names: set[str] | None = None) -> dict:
    """A script's leading imports and function definitions (``names``: only those
    functions), executed alone: the official files run experiments at import."""
    tree = ast.parse(path.read_text())
    kept = []
    for node in tree.body:
        if not isinstance(node, ast.Import | ast.ImportFrom | ast.FunctionDef):
            break
        if names is None or isinstance(node, ast.FunctionDef) and node.name in names:
            kept.append(node)
    tree.body = kept
    namespace: dict = {"copy": copy}
    exec(compile(tree, path.name, "exec"), namespace)  # noqa: S102 - the official code
    return namespace


def _flat(vectors: list[State], keys: list[str]) -> torch.Tensor:
    return torch.stack([torch.cat([v[k].reshape(-1) for k in keys]) for v in vectors])


def _unflat(flat: torch.Tensor, base: State, keys: list[str]) -> State:
    out, start = {}, 0
    for k in keys:
        out[k] = flat[start : start + base[k].numel()].reshape(base[k].shape)
        start += base[k].numel()
    return out


def _official_pcb(base: State, vectors: list[State], steps: int) -> Callable[[], object]:
    """``pcb-merging.py::PCB_merge`` (ratio 0.05) on the flattened task vectors, as its
    script calls it, θ0 + λ τ_m back per parameter (λ 1.2)."""
    pcb_merge = _definitions(_checkout("ATMBENCH_PCB_SRC") / "pcb-merging.py")["PCB_merge"]
    keys = list(base)

    def run() -> None:
        merged, _, _ = pcb_merge(_flat(vectors, keys), pcb_ratio=0.05)
        delta = _unflat(merged, base, keys)
        _ = {k: base[k] + 1.2 * delta[k] for k in keys}

    return run


def _official_lines(base: State, vectors: list[State], steps: int) -> Callable[[], object]:
    """Task Arithmetic's sum scaled by ``src/eval/eval.py::LiNeS_scaling`` (β 0.5; α the
    multi-task rule of ``evaluate``: ‖Σ_t τ_t‖₁ / ‖τ_m‖₁ / T), on the flattened vectors as
    ``aggregation.py`` builds them."""
    src = _checkout("ATMBENCH_LINES_SRC") / "src" / "eval" / "eval.py"
    scaling = _definitions(src, {"LiNeS_scaling"})["LiNeS_scaling"]
    keys = list(base)
    blocks = 1 + max(int(k.split(".")[2]) for k in keys if k.startswith("transformer.resblocks"))

    def run() -> None:
        flat = _flat(vectors, keys)
        merged = flat.sum(0)
        alpha = (flat.sum(0).abs().sum().item() / merged.abs().sum().item()) / len(vectors)
        vector = SimpleNamespace(vector=_unflat(merged, base, keys))
        scaled = scaling(vector, alpha=alpha, beta=0.5, num_blocks=blocks)
        _ = {k: base[k] + scaled.vector[k] for k in keys}

    return run


ANCHORS: dict[str, Setup] = {
    **{f"fusionbench.{name}": _fb_svd(name) for name in ("tsv", "iso_c", "iso_cts")},
    "fusionbench.wudi": _fb_wudi,
    "fusionbench.magmax": _fb_magmax,
    "fusionbench.model_stock": _fb_model_stock,
    "fusionbench.emr": _fb_emr,
    "fusionbench.tall_masks": _fb_tall_masks,
    "mergekit.model_stock": _mergekit("model_stock", None),
    "mergekit.della": _mergekit(
        "della", {"density": 0.7, "epsilon": 0.07, "lambda": 1.1, "weight": 1.0}
    ),
    "official.cart": _official_cart,
    "official.pcb": _official_pcb,
    "official.lines": _official_lines,
}


def main(directory: Path, name: str, steps: int) -> None:
    base = load_file(str(directory / "base.safetensors"))
    vectors = [load_file(str(directory / f"task{t}.safetensors")) for t in range(TASKS)]
    merge = ANCHORS[name](base, vectors, steps)
    with contextlib.redirect_stdout(io.StringIO()):  # Iso, TALL, LiNeS print per parameter
        line = measured(merge)
    print(line)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 300)
