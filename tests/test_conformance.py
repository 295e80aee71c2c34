"""The conformance kit over every registered method, and the kit's own teeth.

The method list is read at collection time, so methods added by any plugin (built-in or
installed) are checked without touching this file.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import atmbench
from atmbench.hookspecs import hookimpl
from atmbench.hparams import HParam
from atmbench.method import MergeMethod
from atmbench.testing import (
    CHECKS,
    ConformanceError,
    check_method,
    gram_like,
    run_pytest,
    sample_model,
    subject,
)

FAST = {"doge": {"steps": 3}}
"""Hyperparameters that keep slow methods quick on the kit's tiny tensors."""


def _coefficients(base, tasks):
    """What AdaMerging could learn: a coefficient per task and parameter, some negative."""
    return {k: torch.linspace(-0.5, 1.0, len(tasks)) * (i + 1) for i, k in enumerate(base)}


LEARNED = {
    "adamerging": _coefficients,
    "adamerging_layer": _coefficients,
    "regmean_pp": lambda base, tasks: {  # the Grams it takes block by block
        k: {"gram": g} for k, g in gram_like(base, tasks).items()
    },
    "localize_stitch": lambda base, tasks: {  # overlapping per-task masks
        k: torch.rand((len(tasks), *b.shape), generator=torch.Generator().manual_seed(i)) > 0.5
        for i, (k, b) in enumerate(base.items())
    },
}
"""States for the methods that learn theirs from a benchmark (adapt)."""


@pytest.mark.parametrize("check", CHECKS, ids=str)
@pytest.mark.parametrize("name", sorted(atmbench.methods()))
def test_registered_method_conforms(name, check):
    run_pytest(check, subject(name, FAST.get(name), learned=LEARNED.get(name)))


def _method(merge, name="bad", **fields) -> MergeMethod:
    return MergeMethod(name=name, merge=merge, data="none", description="test", **fields)


def _sum(base, task_vectors, ctx):
    return task_vectors.sum(0)


def test_a_conforming_method_passes_every_check():
    outcome = check_method(_method(_sum))
    assert outcome["structure"] == "passed"
    assert outcome["public_api"].startswith("skipped: the method is not registered")
    assert set(outcome) == {c.name for c in CHECKS}


def test_public_api_is_checked_when_the_method_is_registered(register):
    class Plugin:
        @hookimpl
        def register_methods(self, register):
            register(_method(_sum, name="kit_sum"))

    with register(Plugin(), "kit_sum"):
        assert check_method("kit_sum")["public_api"] == "passed"


@pytest.mark.parametrize(
    ("merge", "check", "message"),
    [
        (lambda b, tv, ctx: b.add_(1.0) - b, "no_mutation", r"modified its input \(base\)"),
        (lambda b, tv, ctx: tv.sum(0) + torch.rand(b.shape), "deterministic", "differ"),
        (lambda b, tv, ctx: tv.sum(0) / tv.abs().amax(), "zero_task_vectors", "NaN"),
        (lambda b, tv, ctx: tv.sum(0).flatten(), "structure", "returned shape"),
    ],
    ids=["mutates", "random", "divides_by_zero", "flattens"],
)
def test_the_kit_catches_a_broken_method(merge, check, message):
    with pytest.raises(ConformanceError, match=message) as info:
        check_method(_method(merge))
    assert f"check {check}" in str(info.value)


def test_a_false_rowwise_claim_is_caught():
    """Normalising by a whole-tensor statistic is not rowwise: each block would use its own."""
    method = _method(lambda b, tv, ctx: tv.sum(0) / tv.std().clamp_min(1e-6), rowwise=True)
    with pytest.raises(ConformanceError, match=r"check rowwise: declares rowwise=True, but"):
        check_method(method)
    honest = dataclasses.replace(method, rowwise=False)
    assert check_method(honest)["rowwise"] == "skipped: the method does not declare rowwise=True"
    per_row = _method(
        lambda b, tv, ctx: tv.sum(0) / tv.std(dim=(0, -1), keepdim=True)[0].clamp_min(1e-6),
        rowwise=True,
    )
    assert check_method(per_row)["rowwise"] == "passed"


def test_an_empty_prepare_crash_is_caught():
    def prepare(vectors, seed):
        return vectors.stacked(next(iter(vectors.keys(vectors.tasks[0]))))

    with pytest.raises(ConformanceError, match="check no_experts: IndexError"):
        check_method(_method(_sum, prepare=prepare))


def test_undeclared_hyperparameter_is_a_registration_failure():
    method = _method(_sum, hparams=(HParam("alpha", default=1.0),))
    with pytest.raises(ConformanceError, match=r"check registration: .*\['alpha'\]"):
        check_method(method)


def test_methods_needing_statistics_get_synthetic_ones_or_a_stated_skip():
    def fisher_weighted(base, task_vectors, ctx):
        fisher = ctx.stats["fisher"]
        return (fisher * task_vectors).sum(0) / fisher.sum(0)

    outcome = check_method(_method(fisher_weighted, needs=("fisher",)))
    assert outcome["dtypes"] == "passed"
    assert outcome["public_api"].startswith("skipped:")

    outcome = check_method(_method(_sum, needs=("activations",)))
    assert outcome["structure"] == (
        "skipped: method 'bad' needs data statistics ['activations'] that the kit cannot "
        "synthesise: pass statistics={name: factory(base, tasks)}"
    )
    custom = {"activations": lambda base, tasks: {}}
    method = _method(_sum, needs=("activations",))
    assert check_method(method, statistics=custom)["structure"] == "passed"


def test_sample_model_is_the_documented_miniature():
    base, experts = sample_model(torch.bfloat16, tasks=2)
    assert base["positional_embedding"].shape == (5, 4) and base["proj"].dtype == torch.bfloat16
    tau = experts["task1"]["proj"].float() - base["proj"].float()
    assert 0.0 < tau.abs().mean() < 0.3  # N(0, 0.1²) noise: mean |τ| ≈ 0.08
