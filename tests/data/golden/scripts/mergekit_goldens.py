"""Goldens from mergekit 0.1.5's own implementations: ``tox -e goldens-mergekit``.

Writes model_stock_cosine.safetensors, della.safetensors and della_uniforms.safetensors
(RECIPE.md says what each holds). mergekit draws DELLA's masks with ``torch.bernoulli(p)``;
here that call is replaced by ``uniform < p`` with uniforms stored next to the golden, so a
test can feed atmbench the same uniforms and compare the whole merge. mergekit ranks
magnitudes with an unstable ``torch.argsort``, whose order among equal magnitudes is torch's
(index order on CPU for rows of up to 16 entries, not beyond); it is made stable here, so
that ties follow index order, atmbench's documented rule.
"""

from __future__ import annotations

import torch
from common import GOLDEN, TASKS, inputs, save
from mergekit.merge_methods.api import merge_tensors
from safetensors.torch import save_file

DELLA = {"density": 0.5, "epsilon": 0.2, "weight": 1.0}
"""Wider than the README's ε = 0.07, so that p spans 0.3 … 0.7 and the ranks matter."""


def merged(method: str, key: str, parameters: dict | None = None) -> torch.Tensor:
    base, experts = inputs()
    tensors = [base[key]] + [experts[t][key] for t in TASKS]
    return merge_tensors(tensors, method, parameters=parameters, base_index=0) - base[key]


def main() -> None:
    base, _ = inputs()
    save("model_stock_cosine", {k: merged("model_stock", k) for k in base})

    gen = torch.Generator().manual_seed(42)
    uniforms = {
        f"{t}.{k}": torch.rand(v.shape, generator=gen) for t in TASKS for k, v in base.items()
    }
    queue: list[torch.Tensor] = []
    bernoulli = torch.bernoulli

    def draw(p: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        u = queue.pop(0)
        return (u.reshape(p.shape) < p).to(p.dtype)  # P(u < p) = p, as Bernoulli(p)

    def stable_argsort(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return argsort(tensor, *args, stable=True, **kwargs)

    argsort = torch.argsort
    torch.bernoulli, torch.argsort = draw, stable_argsort
    try:
        delta = {}
        for k in base:
            queue[:] = [uniforms[f"{t}.{k}"] for t in TASKS]  # mergekit prunes in input order
            delta[k] = merged("della", k, DELLA)
            assert not queue, k
    finally:
        torch.bernoulli, torch.argsort = bernoulli, argsort
    save("della", delta)
    save_file(uniforms, GOLDEN / "della_uniforms.safetensors")


if __name__ == "__main__":
    main()
