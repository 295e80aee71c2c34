"""``atmbench.merge``: merge state dicts with a method spec, on the runner's code path."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from atmbench import hparams as hp
from atmbench import registry
from atmbench.finetune import task_vector
from atmbench.method import InMemoryTaskVectors, combine
from atmbench.spec import SpecError, parse_spec
from atmbench.streaming import merged_task_vector


def merge(
    spec: str,
    base: Mapping[str, Tensor],
    experts: Mapping[str, Mapping[str, Tensor]],
    seed: int = 0,
    **hparams: Any,
) -> dict[str, Tensor]:
    """Merge fine-tuned ``experts`` (task -> state dict) of ``base`` with the method ``spec``.

    Hyperparameters come from the spec string and ``hparams`` (keyword wins) and are used
    as given; missing ones take the method's default. No validation search happens here,
    and specs that need data (refiners such as ``+atm``) are refused: use the runner.
    """
    parsed = parse_spec(spec, registry.methods(), registry.refiners())
    if parsed.method is None or parsed.refiners:
        raise SpecError(
            f"{spec!r} needs training or validation data; atmbench.merge only runs data-free "
            "merges (use 'atmbench run' or the runner for refiners)"
        )
    method = registry.methods()[parsed.method.name]
    if method.needs:
        raise SpecError(f"method {method.name!r} needs data statistics {method.needs}")
    given = dict(parsed.method.fixed, **hp.resolve(method.all_hparams(), hparams, method.name))
    values = hp.defaults(method.all_hparams(), given)
    scale = values.pop(method.scale.name) if method.scale else 1.0
    vectors = InMemoryTaskVectors({t: task_vector(s, base) for t, s in experts.items()})
    delta = merged_task_vector(method, base, vectors, values, seed)
    return combine(base, delta, scale, consume=True)
